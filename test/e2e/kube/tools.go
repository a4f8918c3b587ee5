//go:build tools

// Package kube records the Kubernetes commands the end-to-end tests build.
package kube

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
