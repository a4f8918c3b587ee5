package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const swagger = `{
  "definitions": {
    "io.k8s.api.apps.v1.DaemonSet": {
      "type": "object",
      "properties": {
        "apiVersion": {"type": "string"},
        "spec": {"$ref": "#/definitions/io.k8s.api.apps.v1.DaemonSetSpec"}
      },
      "x-kubernetes-group-version-kind": [{"group": "apps", "kind": "DaemonSet", "version": "v1"}]
    },
    "io.k8s.api.apps.v1.DaemonSetSpec": {
      "type": "object",
      "properties": {
        "maxSurge": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}}
      }
    },
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
    "io.k8s.api.core.v1.ConfigMap": {
      "type": "object",
      "properties": {"data": {"type": "object", "additionalProperties": {"type": "string"}}},
      "x-kubernetes-group-version-kind": [{"group": "", "kind": "ConfigMap", "version": "v1"}]
    },
    "io.k8s.api.rbac.v1.Role": {
      "type": "object",
      "properties": {"rules": {"type": "array"}},
      "x-kubernetes-group-version-kind": [{"group": "rbac.authorization.k8s.io", "kind": "Role", "version": "v1"}]
    },
    "io.k8s.unused.Thing": {"type": "object", "properties": {"x": {"type": "string"}}}
  }
}`

func TestRunWritesStrictStandaloneSchemas(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "swagger.json")
	if err := os.WriteFile(in, []byte(swagger), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "schemas")
	n, err := run(in, out)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Fatalf("wrote %d schemas, want 3", n)
	}
	for _, name := range []string{"daemonset-apps-v1.json", "configmap-v1.json", "role-rbac-v1.json"} {
		if _, err := os.Stat(filepath.Join(out, name)); err != nil {
			t.Errorf("schema file kubeconform looks for: %v", err)
		}
	}
	b, err := os.ReadFile(filepath.Join(out, "daemonset-apps-v1.json"))
	if err != nil {
		t.Fatal(err)
	}
	var s map[string]any
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	if s["additionalProperties"] != false {
		t.Error("DaemonSet schema accepts unknown fields")
	}
	defs, _ := s["definitions"].(map[string]any)
	if _, ok := defs["io.k8s.unused.Thing"]; ok {
		t.Error("schema embeds a definition it does not reach")
	}
	spec, _ := defs["io.k8s.api.apps.v1.DaemonSetSpec"].(map[string]any)
	if spec["additionalProperties"] != false {
		t.Error("nested object accepts unknown fields")
	}
	labels, _ := spec["properties"].(map[string]any)["labels"].(map[string]any)
	if _, isSchema := labels["additionalProperties"].(map[string]any); !isSchema {
		t.Error("a map's value schema was replaced")
	}
	ios, _ := defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"].(map[string]any)
	if _, ok := ios["oneOf"]; !ok || ios["type"] != nil {
		t.Errorf("int-or-string does not accept both forms: %v", ios)
	}
}

func TestRunRejectsMissingInput(t *testing.T) {
	if _, err := run("", t.TempDir()); err == nil {
		t.Error("run without -in succeeded")
	}
	if _, err := run(filepath.Join(t.TempDir(), "none.json"), t.TempDir()); err == nil {
		t.Error("run with a missing document succeeded")
	}
}
