package staticpod

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/extractedprism/extractedprism/pkg/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// shipped is the shape of manifests/kubeadm/extractedprism.yaml.
const shipped = `# The balancer as a static pod.
apiVersion: v1
kind: Pod
metadata:
  name: extractedprism
  namespace: kube-system
spec:
  hostNetwork: true
  containers:
    - name: extractedprism
      image: IMAGE
      args:
        - --config=/etc/extractedprism/config.yaml
        # The next version binds beside this one.
        - --reuse-port=true
`

func manifestWith(image string) string { return strings.Replace(shipped, "IMAGE", image, 1) }

// fakeKubelet runs the static pods of a directory the way the kubelet
// does where it matters here: pods of different names run side by side; a
// changed pod of the same name starts only after the old one has exited;
// a removed pod terminates. Each pod is an "instance" that answers
// /status on the shared admin address once it is up (the newest running
// one answers, as reuse-port steering does), and counts as a listener
// until it is told to stop (it then steps aside when another one serves).
// A pod whose image is "broken" never turns ready.
type fakeKubelet struct {
	t       *testing.T
	dir     string
	srv     *httptest.Server
	mu      sync.Mutex
	pods    map[string]*fakePod // by pod name
	serial  int
	gap     time.Duration // between the old version's exit and the new one's start
	drain   time.Duration // how long a stopped pod takes to exit
	unready int           // ticks with no pod serving the port
	ticks   int
	stop    chan struct{}
	done    chan struct{}
}

type fakePod struct {
	name, content, instance string
	reuse, broken           bool
	startAt, exitAt         time.Time // zero exitAt: running
	next                    *fakePod  // the changed version waiting for this one to exit
}

func newFakeKubelet(t *testing.T) *fakeKubelet {
	t.Helper()
	k := &fakeKubelet{t: t, dir: t.TempDir(), pods: map[string]*fakePod{}, gap: 300 * time.Millisecond,
		drain: 200 * time.Millisecond, stop: make(chan struct{}), done: make(chan struct{})}
	k.srv = httptest.NewServer(http.HandlerFunc(k.status))
	t.Cleanup(func() {
		close(k.stop)
		<-k.done
		k.srv.Close()
	})
	go k.run()
	return k
}

func (k *fakeKubelet) admin() string { return strings.TrimPrefix(k.srv.URL, "http://") }

func (k *fakeKubelet) install(t *testing.T, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(k.dir, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (k *fakeKubelet) run() {
	defer close(k.done)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-k.stop:
			return
		case <-tick.C:
		}
		k.sync(time.Now())
	}
}

// sync reconciles the pods with the directory.
func (k *fakeKubelet) sync(now time.Time) {
	want := map[string]string{}
	entries, _ := os.ReadDir(k.dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(k.dir, e.Name()))
		if err != nil {
			continue
		}
		m, err := parseManifest(b, e.Name())
		if err != nil {
			continue
		}
		want[m.name] = string(b)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for name, p := range k.pods {
		if !p.exitAt.IsZero() && now.After(p.exitAt) {
			delete(k.pods, name)
			if p.next != nil {
				p.next.startAt = now.Add(k.gap)
				k.pods[name] = p.next
			}
		}
	}
	for name, content := range want {
		p := k.pods[name]
		switch {
		case p == nil:
			k.pods[name] = k.newPod(name, content, now)
		case p.exitAt.IsZero() && p.content != content:
			p.exitAt = now.Add(k.drain)
			p.next = k.newPod(name, content, time.Time{})
		case !p.exitAt.IsZero() && (p.next == nil || p.next.content != content):
			p.next = k.newPod(name, content, time.Time{})
		}
	}
	for name, p := range k.pods {
		if _, ok := want[name]; !ok {
			if p.exitAt.IsZero() {
				p.exitAt = now.Add(k.drain)
			}
			p.next = nil
		}
	}
	k.ticks++
	if len(k.serving(now)) == 0 {
		k.unready++
	}
}

func (k *fakeKubelet) newPod(name, content string, start time.Time) *fakePod {
	k.serial++
	m, _ := parseManifest([]byte(content), name)
	reuse, _ := m.reusePort()
	return &fakePod{name: name, content: content, instance: fmt.Sprintf("instance-%d", k.serial), reuse: reuse,
		broken: strings.Contains(content, "image: broken"), startAt: start}
}

// serving returns the pods that listen on the port, newest first: started
// ones not yet told to stop, and a stopped one while no other serves (it
// steps aside only for a successor).
func (k *fakeKubelet) serving(now time.Time) []*fakePod {
	var running, stopping []*fakePod
	for _, p := range k.pods {
		switch {
		case p.startAt.IsZero() || now.Before(p.startAt):
		case p.exitAt.IsZero():
			running = append(running, p)
		default:
			stopping = append(stopping, p)
		}
	}
	if len(running) == 0 {
		return stopping
	}
	newest := running[0]
	for _, p := range running {
		if p.startAt.After(newest.startAt) {
			newest = p
		}
	}
	out := []*fakePod{newest}
	for _, p := range running {
		if p != newest {
			out = append(out, p)
		}
	}
	return out
}

func (k *fakeKubelet) status(w http.ResponseWriter, _ *http.Request) {
	k.mu.Lock()
	s := k.serving(time.Now())
	k.mu.Unlock()
	if len(s) == 0 {
		// Nobody holds the port: the connect is refused.
		hj, ok := w.(http.Hijacker)
		if ok {
			if c, _, err := hj.Hijack(); err == nil {
				_ = c.Close()
			}
		}
		return
	}
	p := s[0]
	_ = json.NewEncoder(w).Encode(status.Document{Ready: !p.broken, Reason: "fake", Version: "v", Listen: "127.0.0.1:7445",
		Instance: p.instance, ReusePort: p.reuse, ShuttingDown: !p.exitAt.IsZero()})
}

// listeners counts the pods on the port.
func (k *fakeKubelet) listeners(string) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.serving(time.Now())), nil
}

// gaps reports the kubelet ticks in which no pod served the port.
func (k *fakeKubelet) gaps() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.unready
}

func (k *fakeKubelet) waitServing(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		k.mu.Lock()
		n := len(k.serving(time.Now()))
		k.mu.Unlock()
		if n > 0 {
			return
		}
		time.Sleep(10 * time.Millisecond) // polling the fake's state
	}
	t.Fatal("the fake kubelet never started the installed pod")
}

func (k *fakeKubelet) options(manifest string) Options {
	return Options{Dir: k.dir, Manifest: []byte(manifest), Admin: k.admin(), Listeners: k.listeners,
		Poll: 10 * time.Millisecond, ReadyTimeout: 30 * time.Second, StepAsideTimeout: 30 * time.Second}
}

func files(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func TestUpgradeAlternatesSlotsWithoutAGap(t *testing.T) {
	k := newFakeKubelet(t)
	k.install(t, "extractedprism.yaml", manifestWith("img:1"))
	k.waitServing(t)

	res, err := Upgrade(context.Background(), k.options(manifestWith("img:2")))
	if err != nil {
		t.Fatal(err)
	}
	if got := files(t, k.dir); len(got) != 1 || got[0] != "extractedprism-b.yaml" {
		t.Fatalf("after the first upgrade the directory holds %v, want [extractedprism-b.yaml]", got)
	}
	b, _ := os.ReadFile(filepath.Join(k.dir, "extractedprism-b.yaml"))
	for _, want := range []string{"name: extractedprism-b\n", "image: img:2\n", "# The next version binds beside this one.", "- --reuse-port=true"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the new slot's manifest lacks %q:\n%s", want, b)
		}
	}
	if res.Old.Instance == res.New.Instance || res.New.Instance == "" {
		t.Errorf("old instance %q, new %q: the upgrade did not wait for a new instance", res.Old.Instance, res.New.Instance)
	}

	// The next upgrade goes back to the first slot, from the file the
	// first one wrote.
	next := strings.Replace(string(b), "- --reuse-port=true\n", "- --reuse-port=true\n        - --log-format=json\n", 1)
	res, err = Upgrade(context.Background(), k.options(next))
	if err != nil {
		t.Fatal(err)
	}
	if got := files(t, k.dir); len(got) != 1 || got[0] != "extractedprism.yaml" || res.To != filepath.Join(k.dir, "extractedprism.yaml") {
		t.Fatalf("after the second upgrade the directory holds %v (to %s), want [extractedprism.yaml]", got, res.To)
	}
	a, _ := os.ReadFile(filepath.Join(k.dir, "extractedprism.yaml"))
	if !strings.Contains(string(a), "name: extractedprism\n") || !strings.Contains(string(a), "--log-format=json") {
		t.Errorf("the first slot's manifest after the second upgrade:\n%s", a)
	}
	if n := k.gaps(); n != 0 {
		t.Errorf("no pod served the port in %d of the fake kubelet's ticks", n)
	}
}

func TestUpgradeInPlaceLeavesTheKubeletsGap(t *testing.T) {
	// The same change made by editing the manifest, for comparison: the
	// fake kubelet, like the real one, leaves the port unserved.
	k := newFakeKubelet(t)
	k.install(t, "extractedprism.yaml", manifestWith("img:1"))
	k.waitServing(t)
	k.install(t, "extractedprism.yaml", manifestWith("img:2"))
	deadline := time.Now().Add(30 * time.Second)
	for k.gaps() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling the fake's state
	}
	if k.gaps() == 0 {
		t.Fatal("an edit in place left no gap: the fake kubelet does not model the real one")
	}
}

func TestUpgradeRollsBackANewPodThatIsNeverReady(t *testing.T) {
	k := newFakeKubelet(t)
	k.install(t, "extractedprism.yaml", manifestWith("img:1"))
	k.waitServing(t)
	o := k.options(manifestWith("broken"))
	o.ReadyTimeout = 500 * time.Millisecond
	_, err := Upgrade(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "removed again") || !strings.Contains(err.Error(), "is not ready") {
		t.Fatalf("Upgrade = %v; want an error that says the new pod is not ready and its manifest was removed", err)
	}
	if got := files(t, k.dir); len(got) != 1 || got[0] != "extractedprism.yaml" {
		t.Fatalf("after the rollback the directory holds %v, want [extractedprism.yaml]", got)
	}
	a, _ := os.ReadFile(filepath.Join(k.dir, "extractedprism.yaml"))
	if !strings.Contains(string(a), "image: img:1") {
		t.Errorf("the running pod's manifest changed:\n%s", a)
	}
	if n := k.gaps(); n != 0 {
		t.Errorf("no pod served the port in %d ticks", n)
	}
}

func TestUpgradeOfAPodWithoutReusePortNeedsAllowGap(t *testing.T) {
	k := newFakeKubelet(t)
	old := strings.Replace(manifestWith("img:1"), "        - --reuse-port=true\n", "", 1)
	k.install(t, "extractedprism.yaml", old)
	k.waitServing(t)
	_, err := Upgrade(context.Background(), k.options(manifestWith("img:2")))
	if err == nil || !strings.Contains(err.Error(), "--allow-gap") || !strings.Contains(err.Error(), "SO_REUSEPORT") {
		t.Fatalf("Upgrade = %v; want an error naming SO_REUSEPORT and --allow-gap", err)
	}
	if got := files(t, k.dir); len(got) != 1 {
		t.Fatalf("a refused upgrade changed the directory: %v", got)
	}
	o := k.options(manifestWith("img:2"))
	o.AllowGap = true
	res, err := Upgrade(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if !res.InPlace || res.To != filepath.Join(k.dir, "extractedprism.yaml") {
		t.Fatalf("result %+v; want an in-place replacement of extractedprism.yaml", res)
	}
	a, _ := os.ReadFile(res.To)
	if !strings.Contains(string(a), "image: img:2") || !strings.Contains(string(a), "--reuse-port=true") {
		t.Errorf("the replaced manifest:\n%s", a)
	}
}

func TestUpgradeRefusesBadManifests(t *testing.T) {
	k := newFakeKubelet(t)
	k.install(t, "extractedprism.yaml", manifestWith("img:1"))
	k.waitServing(t)
	for _, tc := range []struct{ name, manifest, want string }{
		{"not yaml", "kind: [", "not YAML"},
		{"not a pod", strings.Replace(manifestWith("img:2"), "kind: Pod", "kind: Deployment", 1), `kind "Deployment", want Pod`},
		{"no name", strings.Replace(manifestWith("img:2"), "  name: extractedprism\n", "", 1), "metadata.name is empty"},
		{"no reuse-port", strings.Replace(manifestWith("img:2"), "        - --reuse-port=true\n", "", 1), "no container has --reuse-port=true"},
		{"reuse-port off", strings.Replace(manifestWith("img:2"), "--reuse-port=true", "--reuse-port=false", 1), `spec.containers[0].args has "--reuse-port=false"`},
		{"unchanged", manifestWith("img:1"), "nothing to upgrade"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Upgrade(context.Background(), k.options(tc.manifest))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Upgrade = %v; want an error with %q", err, tc.want)
			}
			if got := files(t, k.dir); len(got) != 1 || got[0] != "extractedprism.yaml" {
				t.Fatalf("a refused upgrade changed the directory: %v", got)
			}
		})
	}
}

func TestUpgradeWithoutAnInstalledPod(t *testing.T) {
	k := newFakeKubelet(t)
	_, err := Upgrade(context.Background(), k.options(manifestWith("img:2")))
	if err == nil || !strings.Contains(err.Error(), "install the manifest there first") {
		t.Fatalf("Upgrade = %v; want an error saying nothing is installed", err)
	}
}

func TestUpgradeFinishesAnInterruptedOne(t *testing.T) {
	k := newFakeKubelet(t)
	k.install(t, "extractedprism.yaml", manifestWith("img:1"))
	k.waitServing(t)
	next := strings.Replace(manifestWith("img:2"), "name: extractedprism\n", "name: extractedprism-b\n", 1)
	k.install(t, "extractedprism-b.yaml", next)
	res, err := Upgrade(context.Background(), k.options(manifestWith("img:2")))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Resumed {
		t.Errorf("result %+v; want Resumed", res)
	}
	if got := files(t, k.dir); len(got) != 1 || got[0] != "extractedprism-b.yaml" {
		t.Fatalf("after finishing, the directory holds %v, want [extractedprism-b.yaml]", got)
	}
	// Both in place, neither the new manifest: the operator decides.
	k.install(t, "extractedprism.yaml", manifestWith("img:3"))
	_, err = Upgrade(context.Background(), k.options(manifestWith("img:4")))
	if err == nil || !strings.Contains(err.Error(), "neither holds the new manifest") {
		t.Fatalf("Upgrade = %v; want an error naming both files", err)
	}
}

func TestUpgradeWhenTheAdminPortDoesNotAnswer(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "extractedprism.yaml"), []byte(manifestWith("img:1")), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // nothing listens there now
	_, err = Upgrade(context.Background(), Options{Dir: dir, Manifest: []byte(manifestWith("img:2")), Admin: addr})
	if err == nil || !strings.Contains(err.Error(), "does not answer") || !strings.Contains(err.Error(), "--allow-gap") {
		t.Fatalf("Upgrade = %v; want an error saying the running pod does not answer", err)
	}
}

// The manifest users copy must be one the upgrade can hand over from.
func TestShippedManifestCanHandOver(t *testing.T) {
	data, err := os.ReadFile("../../manifests/kubeadm/extractedprism.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseManifest(data, "manifests/kubeadm/extractedprism.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if ok, why := m.reusePort(); !ok {
		t.Fatalf("the shipped manifest cannot bind beside a running pod: %s", why)
	}
	if m.name != "extractedprism" {
		t.Fatalf("the shipped pod is named %q, want extractedprism (the first slot)", m.name)
	}
	b, err := m.withName("extractedprism" + SlotSuffix)
	if err != nil {
		t.Fatal(err)
	}
	other, err := parseManifest(b, "renamed")
	if err != nil {
		t.Fatal(err)
	}
	if other.name != "extractedprism-b" || !other.sameAs(m) {
		t.Fatalf("the renamed manifest is named %q and differs otherwise: %v", other.name, !other.sameAs(m))
	}
	if !strings.Contains(string(b), "# Upgrade with `extractedprism static-pod upgrade") {
		t.Errorf("renaming lost the manifest's comments:\n%s", b)
	}
}
