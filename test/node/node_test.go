package node

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestNode boots the cluster and the node (the kubelet reaching its
// apiservers through the kubeadm static pod) and runs the scenarios in
// order. Each scenario can run alone (-run 'TestNode/4-'): the boot always
// runs, and the Helm scenarios install the release when it is not there.
func TestNode(t *testing.T) {
	c := startCluster(t)
	c.bootNode(t)
	t.Run("1-static-pod-bootstrap", c.staticPodBootstrap)
	t.Run("2-apiserver-sigkill", c.apiserverSigkill)
	t.Run("8-static-pod-upgrade", c.staticPodUpgrade)
	t.Run("9-node-reboot", c.nodeReboot)
	t.Run("3-helm-daemonset", c.helmDaemonSet)
	t.Run("7-probes-security-context", c.probesAndSecurityContext)
	t.Run("5-config-reload", c.configReload)
	t.Run("4-surge-upgrade", c.surgeUpgrade)
	t.Run("6-uninstall", c.uninstall)
}

// statusDoc is the part of extractedprism's /status the test reads.
type statusDoc struct {
	Ready     bool   `json:"ready"`
	Reason    string `json:"reason"`
	Version   string `json:"version"`
	Upstreams []struct {
		Address           string `json:"address"`
		Source            string `json:"source"`
		State             string `json:"state"`
		ActiveConnections int64  `json:"active_connections"`
		TotalConnections  uint64 `json:"total_connections"`
		ReadinessShared   bool   `json:"readiness_shared"`
	} `json:"upstreams"`
	Discovery struct {
		State      string   `json:"state"`
		Discovered []string `json:"discovered"`
	} `json:"discovery"`
	Config struct {
		LastReload      time.Time `json:"last_reload"`
		LastReloadOK    bool      `json:"last_reload_ok"`
		LastReloadError string    `json:"last_reload_error"`
	} `json:"config"`
}

// up lists the upstreams in state up.
func (s statusDoc) up() []string {
	var out []string
	for _, u := range s.Upstreams {
		if u.State == "up" {
			out = append(out, u.Address)
		}
	}
	return out
}

// describe renders the upstreams as addr(source,state,active).
func (s statusDoc) describe() string {
	parts := make([]string, 0, len(s.Upstreams))
	for _, u := range s.Upstreams {
		parts = append(parts, fmt.Sprintf("%s(%s,%s,%d active)", u.Address, u.Source, u.State, u.ActiveConnections))
	}
	return strings.Join(parts, " ")
}

// getStatus fetches /status from an extractedprism admin address.
func getStatus(addr string) (statusDoc, error) {
	var doc statusDoc
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/status")
	if err != nil {
		return doc, fmt.Errorf("GET /status: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return doc, fmt.Errorf("decode /status: %w", err)
	}
	return doc, nil
}

// allUp reports whether every test apiserver is up in doc.
func allUp(doc statusDoc) bool {
	up := doc.up()
	for _, ip := range apiserverIPs {
		found := false
		for _, a := range up {
			if a == ip+":6443" {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// imageRef is the image reference the manifests are rendered with.
func imageRef() string { return env.imageRepo + ":" + env.imageTag }

// renderKubeadmManifest returns the file users copy with only its image
// line set to the image under test.
func renderKubeadmManifest(repo string) ([]byte, error) {
	src, err := os.ReadFile(repo + "/manifests/kubeadm/extractedprism.yaml")
	if err != nil {
		return nil, err
	}
	re := regexp.MustCompile(`(?m)^(\s+image: ).*$`)
	if n := len(re.FindAll(src, -1)); n != 1 {
		return nil, fmt.Errorf("manifests/kubeadm/extractedprism.yaml has %d image lines, want 1", n)
	}
	return re.ReplaceAll(src, []byte("${1}"+imageRef())), nil
}

// bootNode prepares the node the way docs/kubeadm.md says (config file,
// state directory, the manifest in the static pod folder), starts the
// kubelet and waits for the node to turn Ready through the balancer; then
// starts the controller manager and the scheduler.
func (c *cluster) bootNode(t *testing.T) {
	t.Helper()
	etc := hostDir("/etc/extractedprism")
	ca, err := os.ReadFile(env.caFile)
	if err != nil {
		t.Fatal(err)
	}
	var eps []string
	for _, ip := range apiserverIPs {
		eps = append(eps, fmt.Sprintf("%q", ip+":6443"))
	}
	cfg := fmt.Sprintf("endpoints: [%s]\nprobe:\n  ca_file: /etc/extractedprism/ca.crt\n  server_name: kubernetes\n", strings.Join(eps, ", "))
	for name, data := range map[string][]byte{"config.yaml": []byte(cfg), "ca.crt": ca} {
		if err := os.WriteFile(etc+"/"+name, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	state := hostDir("/var/lib/extractedprism")
	if err := os.Chown(state, 60745, 60745); err != nil { // the static pod's UID/GID
		t.Fatal(err)
	}
	if err := os.Chmod(state, 0o750); err != nil {
		t.Fatal(err)
	}
	manifest, err := renderKubeadmManifest(c.repo)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(env.path("manifests"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env.path("manifests", "extractedprism.yaml"), manifest, 0o644); err != nil {
		t.Fatal(err)
	}
	c.startKubelet(t)
	start := time.Now()
	env.kubeletStarted = start
	var balancerUp time.Time
	ready := poll(t, "node Ready", 5*time.Minute, 250*time.Millisecond, func() (bool, string) {
		c.checkAlive(t)
		if balancerUp.IsZero() {
			if _, err := getStatus(adminAddr); err == nil {
				balancerUp = time.Now()
			}
		}
		n, err := getNode(c.liveAPIServer())
		if err != nil {
			return false, err.Error()
		}
		r := n.ready()
		return r.Status == "True", fmt.Sprintf("Ready=%s %s: %s", r.Status, r.Reason, r.Message)
	})
	env.nodeReady = ready
	// A misspelt kubelet setting is only logged, and then silently not
	// applied: refuse it.
	if b, err := os.ReadFile(c.kubelet.Log); err == nil && strings.Contains(string(b), "strict decoding error") {
		t.Fatalf("the kubelet ignored part of its configuration:\n%s", firstLine(string(b), "strict decoding error"))
	}
	if !balancerUp.IsZero() {
		env.record("kubelet start -> static pod answers /status: %.1f s", balancerUp.Sub(start).Seconds())
	}
	env.record("kubelet start -> node Ready through the balancer: %.1f s", ready.Sub(start).Seconds())
	c.startControllers(t)
	// The controllers are up once they created the default service
	// accounts and the CA bundle pods mount.
	for _, p := range []string{
		"/api/v1/namespaces/default/serviceaccounts/default",
		"/api/v1/namespaces/kube-system/serviceaccounts/default",
		"/api/v1/namespaces/kube-system/configmaps/kube-root-ca.crt",
	} {
		poll(t, p, 2*time.Minute, 250*time.Millisecond, func() (bool, string) {
			c.checkAlive(t)
			ok, err := exists(c.liveAPIServer(), p)
			if err != nil {
				return false, err.Error()
			}
			return ok, "not found"
		})
	}
}

// mirrorPod is the name of the static pod's mirror pod.
const mirrorPod = "extractedprism-" + nodeName

// staticPodBootstrap: the mirror pod runs the image under test and is
// Ready, the node is Ready, /status shows the three apiservers up, and the
// kubelet's own connections go through the balancer.
func (c *cluster) staticPodBootstrap(t *testing.T) {
	var p podObject
	poll(t, "mirror pod Running and Ready", 2*time.Minute, 500*time.Millisecond, func() (bool, string) {
		var err error
		p, err = getPod(c.liveAPIServer(), "kube-system", mirrorPod)
		if err != nil {
			return false, err.Error()
		}
		return p.ready(), fmt.Sprintf("phase %s, conditions %+v", p.Status.Phase, p.Status.Conditions)
	})
	if _, ok := p.Metadata.Annotations["kubernetes.io/config.mirror"]; !ok {
		t.Errorf("pod %s has no kubernetes.io/config.mirror annotation: not the static pod", mirrorPod)
	}
	if len(p.Status.ContainerStatuses) != 1 || p.Status.ContainerStatuses[0].Image != imageRef() {
		t.Errorf("mirror pod runs %+v, want image %s", p.Status.ContainerStatuses, imageRef())
	}
	n, err := getNode(c.liveAPIServer())
	if err != nil {
		t.Fatal(err)
	}
	if r := n.ready(); r.Status != "True" {
		t.Errorf("node Ready=%s (%s)", r.Status, r.Message)
	}
	doc, err := getStatus(adminAddr)
	if err != nil {
		t.Fatal(err)
	}
	if !allUp(doc) {
		t.Errorf("/status upstreams: %s; want all of %v up", doc.describe(), apiserverIPs)
	}
	if doc.Version != env.imageTag {
		t.Errorf("/status version %q, want %q (the image under test)", doc.Version, env.imageTag)
	}
	var active int64
	for _, u := range doc.Upstreams {
		active += u.ActiveConnections
	}
	if active == 0 {
		t.Errorf("no active connection through the balancer: %s", doc.describe())
	}
	env.record("static pod: mirror pod Ready, /status %s", doc.describe())
}
