// Package charttest checks the rendered chart and the kubeadm static pod
// against the real daemon: the flags and configuration file the pods would
// start with must be accepted by `extractedprism validate`.
//
// It needs the helm and extractedprism binaries, named by the HELM and
// EXTRACTEDPRISM environment variables (`make chart-test` sets both).
package charttest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"gopkg.in/yaml.v3"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	chartDir   = "../extractedprism"
	kubeadmPod = "../../kubeadm/extractedprism.yaml"
	configFlag = "--config=/etc/extractedprism/config.yaml"
)

// object is the part of a Kubernetes object these tests read.
type object struct {
	Kind string            `yaml:"kind"`
	Data map[string]string `yaml:"data"`
	Spec struct {
		Containers []container `yaml:"containers"`
		Template   struct {
			Spec struct {
				Containers                    []container `yaml:"containers"`
				TerminationGracePeriodSeconds int         `yaml:"terminationGracePeriodSeconds"`
			} `yaml:"spec"`
		} `yaml:"template"`
	} `yaml:"spec"`
}

type container struct {
	Args           []string `yaml:"args"`
	LivenessProbe  probe    `yaml:"livenessProbe"`
	ReadinessProbe probe    `yaml:"readinessProbe"`
	Env            []struct {
		Name  string `yaml:"name"`
		Value string `yaml:"value"`
	} `yaml:"env"`
}

type probe struct {
	HTTPGet struct {
		Host string `yaml:"host"`
		Path string `yaml:"path"`
		Port int    `yaml:"port"`
	} `yaml:"httpGet"`
}

// url is where kubelet sends the probe.
func (p probe) url() string {
	return "http://" + net.JoinHostPort(p.HTTPGet.Host, strconv.Itoa(p.HTTPGet.Port)) + p.HTTPGet.Path
}

func tools(t *testing.T) (helm, daemon string) {
	t.Helper()
	helm, daemon = os.Getenv("HELM"), os.Getenv("EXTRACTEDPRISM")
	if helm == "" || daemon == "" {
		t.Skip("HELM and EXTRACTEDPRISM not set: run `make chart-test`")
	}
	return helm, daemon
}

func decode(t *testing.T, manifest []byte) []object {
	t.Helper()
	var objs []object
	dec := yaml.NewDecoder(bytes.NewReader(manifest))
	for {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatalf("decode manifest: %v", err)
		}
		if o.Kind != "" {
			objs = append(objs, o)
		}
	}
}

// validate runs `extractedprism validate` with the container's arguments,
// the configuration file moved to dir.
func validate(t *testing.T, daemon string, c container, configYAML, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(configYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"validate"}
	sawConfig := false
	for _, a := range c.Args {
		if a == configFlag {
			a, sawConfig = "--config="+path, true
		}
		args = append(args, a)
	}
	if !sawConfig {
		t.Fatalf("container args %q do not pass %s", c.Args, configFlag)
	}
	cmd := exec.Command(daemon, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for _, e := range c.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("extractedprism %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestChartStartsTheDaemonWithValidSettings(t *testing.T) {
	helm, daemon := tools(t)
	sets, err := filepath.Glob("values/*.yaml")
	if err != nil || len(sets) == 0 {
		t.Fatalf("no value sets in values/ (err %v)", err)
	}
	for _, set := range sets {
		t.Run(filepath.Base(set), func(t *testing.T) {
			r := render(t, helm, "-f", set)
			t.Log(strings.TrimSpace(validate(t, daemon, r.container, r.config, t.TempDir())))
		})
	}
}

// rendered is what a node gets from the chart.
type rendered struct {
	config    string
	container container
	grace     int
}

func render(t *testing.T, helm string, args ...string) rendered {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(helm, append([]string{"template", "extractedprism", chartDir}, args...)...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helm template %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	var r rendered
	var sawConfig, sawDaemonSet bool
	for _, o := range decode(t, out) {
		switch o.Kind {
		case "ConfigMap":
			r.config, sawConfig = o.Data["config.yaml"], true
		case "DaemonSet":
			if len(o.Spec.Template.Spec.Containers) != 1 {
				t.Fatalf("DaemonSet has %d containers", len(o.Spec.Template.Spec.Containers))
			}
			r.container, sawDaemonSet = o.Spec.Template.Spec.Containers[0], true
			r.grace = o.Spec.Template.Spec.TerminationGracePeriodSeconds
		}
	}
	if !sawConfig || !sawDaemonSet {
		t.Fatalf("rendered chart lacks the ConfigMap or the DaemonSet:\n%s", out)
	}
	return r
}

// freePort returns a loopback TCP port nobody listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return port
}

// get polls url until it answers want or the deadline passes.
func get(t *testing.T, url string, want int, deadline time.Duration) {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	end := time.Now().Add(deadline)
	var last string
	for time.Now().Before(end) {
		resp, err := client.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == want {
				return
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond) // poll interval, not synchronisation
	}
	t.Fatalf("GET %s: want %d within %v, last answer: %s", url, want, deadline, last)
}

// TestProbesReachTheRunningDaemon starts the daemon with the chart's
// arguments and sends the chart's probes where kubelet would: liveness must
// pass, readiness must fail while no API server is reachable, and SIGTERM
// must end the daemon within the pod's grace period.
func TestProbesReachTheRunningDaemon(t *testing.T) {
	helm, daemon := tools(t)
	// Loopback only: "" is 127.0.0.1 whatever bindAddress is; 127.0.0.3 is a
	// health address of its own. The wildcard mapping (0.0.0.0 probed on
	// 127.0.0.1) is covered by the unit tests.
	for _, health := range []string{"", "127.0.0.3"} {
		t.Run("healthBindAddress="+health, func(t *testing.T) {
			deadAPIServer := freePort(t)
			r := render(t, helm,
				"--set", fmt.Sprintf("endpoints=127.0.0.1:%d", deadAPIServer),
				"--set", "enableDiscovery=false",
				"--set", fmt.Sprintf("bindPort=%d", freePort(t)),
				"--set", fmt.Sprintf("healthPort=%d", freePort(t)),
				"--set", "healthBindAddress="+health)
			dir := t.TempDir()
			path := filepath.Join(dir, "config.yaml")
			if err := os.WriteFile(path, []byte(r.config), 0o600); err != nil {
				t.Fatal(err)
			}
			args := make([]string, 0, len(r.container.Args))
			for _, a := range r.container.Args {
				if a == configFlag {
					a = "--config=" + path
				}
				args = append(args, a)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cmd := exec.CommandContext(ctx, daemon, args...)
			var logs bytes.Buffer
			cmd.Stdout, cmd.Stderr = &logs, &logs
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			defer func() {
				cancel()
				if err := <-done; err != nil && t.Failed() {
					t.Logf("daemon exit: %v", err)
				}
				if t.Failed() {
					t.Logf("daemon output:\n%s", logs.String())
				}
			}()
			get(t, r.container.LivenessProbe.url(), http.StatusOK, 30*time.Second)
			get(t, r.container.ReadinessProbe.url(), http.StatusServiceUnavailable, 30*time.Second)
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				done <- err
				if err != nil {
					t.Fatalf("daemon exited with %v after SIGTERM", err)
				}
			case <-time.After(time.Duration(r.grace) * time.Second):
				t.Fatalf("daemon still running %d s (the grace period) after SIGTERM", r.grace)
			}
		})
	}
}

func TestKubeadmPodStartsTheDaemonWithValidSettings(t *testing.T) {
	_, daemon := tools(t)
	b, err := os.ReadFile(kubeadmPod)
	if err != nil {
		t.Fatal(err)
	}
	objs := decode(t, b)
	if len(objs) != 1 || objs[0].Kind != "Pod" || len(objs[0].Spec.Containers) != 1 {
		t.Fatalf("%s: want one Pod with one container", kubeadmPod)
	}
	// The configuration the manifest's comment tells users to write.
	const cfg = "endpoints: [\"10.0.0.1:6443\", \"10.0.0.2:6443\", \"10.0.0.3:6443\"]\n"
	t.Log(strings.TrimSpace(validate(t, daemon, objs[0].Spec.Containers[0], cfg, t.TempDir())))
}
