package charttest

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestChartStartsThePublisherWithValidFlags renders the readiness
// publisher's Deployment and runs `extractedprism` with its arguments:
// every flag must parse, so that the run gets as far as reading the
// credentials (a kubeconfig that does not exist here).
func TestChartStartsThePublisherWithValidFlags(t *testing.T) {
	helm, daemon := tools(t)
	sets, err := filepath.Glob("values/*.yaml")
	if err != nil || len(sets) == 0 {
		t.Fatalf("no value sets in values/ (err %v)", err)
	}
	for _, set := range sets {
		t.Run(filepath.Base(set), func(t *testing.T) {
			home := t.TempDir()
			cmd := exec.Command(helm, "template", "extractedprism", chartDir, "-f", set)
			cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("helm template: %v", err)
			}
			var pub *container
			for _, o := range decode(t, out) {
				if o.Kind == "Deployment" && len(o.Spec.Template.Spec.Containers) == 1 {
					pub = &o.Spec.Template.Spec.Containers[0]
				}
			}
			if pub == nil {
				t.Skip("no readiness publisher in this value set")
			}
			if len(pub.Args) == 0 || pub.Args[0] != "readiness-publisher" {
				t.Fatalf("publisher args %q do not start with the subcommand", pub.Args)
			}
			// What kubelet substitutes from the downward API.
			subst := strings.NewReplacer("$(POD_NAMESPACE)", "kube-system", "$(POD_NAME)", "publisher-0", "$(POD_IP)", "127.0.0.1")
			args := make([]string, 0, len(pub.Args)+1)
			for _, a := range pub.Args {
				args = append(args, subst.Replace(a))
			}
			args = append(args, "--kubeconfig="+filepath.Join(t.TempDir(), "absent.kubeconfig"))
			run := exec.Command(daemon, args...)
			var stderr bytes.Buffer
			run.Stderr = &stderr
			err = run.Run()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(stderr.String(), "--kubeconfig") {
				t.Fatalf("extractedprism %s: %v (want exit status 1 about the kubeconfig):\n%s", strings.Join(args, " "), err, stderr.String())
			}
		})
	}
}
