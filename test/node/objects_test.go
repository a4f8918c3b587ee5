package node

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// The few fields of Kubernetes objects the test reads.

type objectMeta struct {
	Name              string            `json:"name"`
	Namespace         string            `json:"namespace"`
	UID               string            `json:"uid"`
	Labels            map[string]string `json:"labels"`
	Annotations       map[string]string `json:"annotations"`
	DeletionTimestamp *time.Time        `json:"deletionTimestamp"`
	CreationTimestamp time.Time         `json:"creationTimestamp"`
}

type condition struct {
	Type               string    `json:"type"`
	Status             string    `json:"status"`
	Reason             string    `json:"reason"`
	Message            string    `json:"message"`
	LastTransitionTime time.Time `json:"lastTransitionTime"`
}

type nodeObject struct {
	Metadata objectMeta `json:"metadata"`
	Status   struct {
		Conditions []condition `json:"conditions"`
	} `json:"status"`
}

// ready returns the node's Ready condition.
func (n nodeObject) ready() condition {
	for _, c := range n.Status.Conditions {
		if c.Type == "Ready" {
			return c
		}
	}
	return condition{Type: "Ready", Status: "Unknown", Reason: "no Ready condition"}
}

type containerStatus struct {
	Name         string                     `json:"name"`
	Ready        bool                       `json:"ready"`
	RestartCount int                        `json:"restartCount"`
	Image        string                     `json:"image"`
	ContainerID  string                     `json:"containerID"`
	State        map[string]json.RawMessage `json:"state"`
}

type podObject struct {
	Metadata objectMeta `json:"metadata"`
	Spec     struct {
		NodeName   string           `json:"nodeName"`
		Containers []map[string]any `json:"containers"`
	} `json:"spec"`
	Status struct {
		Phase             string            `json:"phase"`
		Conditions        []condition       `json:"conditions"`
		ContainerStatuses []containerStatus `json:"containerStatuses"`
	} `json:"status"`
}

// ready reports whether the pod is Running with its Ready condition true.
func (p podObject) ready() bool {
	if p.Status.Phase != "Running" || p.Metadata.DeletionTimestamp != nil {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == "Ready" {
			return c.Status == "True"
		}
	}
	return false
}

// restarts sums the restart counts of the pod's containers.
func (p podObject) restarts() int {
	n := 0
	for _, s := range p.Status.ContainerStatuses {
		n += s.RestartCount
	}
	return n
}

type podList struct {
	Items []podObject `json:"items"`
}

type leaseObject struct {
	Spec struct {
		RenewTime time.Time `json:"renewTime"`
	} `json:"spec"`
}

// getNode reads the node from server.
func getNode(server string) (nodeObject, error) {
	var n nodeObject
	err := env.getObject(server, "/api/v1/nodes/"+nodeName, &n)
	return n, err
}

// getPod reads a pod from server.
func getPod(server, ns, name string) (podObject, error) {
	var p podObject
	err := env.getObject(server, fmt.Sprintf("/api/v1/namespaces/%s/pods/%s", ns, name), &p)
	return p, err
}

// listPods lists the pods of ns matching selector.
func listPods(server, ns, selector string) ([]podObject, error) {
	var l podList
	err := env.getObject(server, fmt.Sprintf("/api/v1/namespaces/%s/pods?labelSelector=%s", ns, selector), &l)
	return l.Items, err
}

// exists reports whether GET path answers 200 (false on 404).
func exists(server, path string) (bool, error) {
	code, b, err := env.api(server, http.MethodGet, path, nil)
	if err != nil {
		return false, err
	}
	switch code {
	case http.StatusOK:
		return true, nil
	case http.StatusNotFound:
		return false, nil
	}
	return false, fmt.Errorf("GET %s: HTTP %d: %s", path, code, b)
}
