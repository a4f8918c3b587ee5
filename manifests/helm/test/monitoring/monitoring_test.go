// Package monitoring checks the chart's ServiceMonitor and PodMonitor
// against the prometheus-operator API types: every field the chart renders
// must exist there (strict decoding), so a misspelt field cannot slip into
// a cluster where the operator would silently ignore it. It is a module of
// its own so the operator's dependencies stay out of the daemon's go.mod.
//
// It needs the helm binary, named by the HELM environment variable
// (`make chart-test` sets it).
package monitoring

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"go.uber.org/goleak"
	"sigs.k8s.io/yaml"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestMonitorsMatchTheOperatorAPI(t *testing.T) {
	helm := os.Getenv("HELM")
	if helm == "" {
		t.Skip("HELM not set: run `make chart-test`")
	}
	home := t.TempDir()
	cmd := exec.Command(helm, "template", "extractedprism", "../../extractedprism",
		"--namespace", "kube-system", "--api-versions", "monitoring.coreos.com/v1",
		"--set", "endpoints=10.0.0.1:6443", "--set", "healthBindAddress=0.0.0.0", "--set", "allowNonLoopbackBind=true",
		"--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
		"--show-only", "templates/servicemonitor.yaml", "--show-only", "templates/podmonitor.yaml")
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, stderr.String())
	}
	seen := map[string]bool{}
	for _, doc := range strings.Split(string(out), "\n---\n") {
		var head struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("parse rendered object: %v", err)
		}
		switch head.Kind {
		case "ServiceMonitor":
			var sm monitoringv1.ServiceMonitor
			if err := yaml.UnmarshalStrict([]byte(doc), &sm); err != nil {
				t.Errorf("ServiceMonitor does not match the operator API: %v", err)
			}
			if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "metrics" || sm.Spec.Endpoints[0].Path != "/metrics" {
				t.Errorf("ServiceMonitor endpoints: %+v", sm.Spec.Endpoints)
			}
		case "PodMonitor":
			var pm monitoringv1.PodMonitor
			if err := yaml.UnmarshalStrict([]byte(doc), &pm); err != nil {
				t.Errorf("PodMonitor does not match the operator API: %v", err)
			}
			if len(pm.Spec.PodMetricsEndpoints) != 1 || len(pm.Spec.PodMetricsEndpoints[0].RelabelConfigs) != 3 {
				t.Errorf("PodMonitor endpoints: %+v", pm.Spec.PodMetricsEndpoints)
			}
		}
		seen[head.Kind] = true
	}
	for _, kind := range []string{"Service", "ServiceMonitor", "PodMonitor"} {
		if !seen[kind] {
			t.Errorf("chart rendered no %s:\n%s", kind, out)
		}
	}
}
