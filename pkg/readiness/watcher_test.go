package readiness

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// logBuffer collects log output safely across goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func configMap(name string, data string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ep"},
		Data:       map[string]string{DataKey: data},
	}
}

func encoded(t *testing.T, seq uint64, entries map[string]Entry) string {
	t.Helper()
	b, err := Encode(Document{Format: 1, Publisher: "p", Sequence: seq, Interval: time.Second, Heartbeat: 10 * time.Second, APIServers: entries})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

var (
	ready500 = map[string]Entry{
		"10.0.0.1:6443": {Ready: true, Code: 200},
		"10.0.0.2:6443": {Code: 500, Reason: "[-]etcd failed: reason withheld"},
	}
	allReady = map[string]Entry{
		"10.0.0.1:6443": {Ready: true, Code: 200},
		"10.0.0.2:6443": {Ready: true, Code: 200},
	}
)

// watcherRig runs a Watcher on a fake clientset.
type watcherRig struct {
	t       *testing.T
	client  *fake.Clientset
	clock   *fakeClock
	w       *Watcher
	changes atomic.Int64
	logs    *logBuffer
	version int
}

func startWatcher(t *testing.T, client *fake.Clientset) *watcherRig {
	t.Helper()
	r := &watcherRig{t: t, client: client, clock: newFakeClock(), logs: &logBuffer{}}
	r.w = NewWatcher(WatcherOptions{
		Client: client, Namespace: "ep", Name: "readiness", StaleAfter: 30 * time.Second,
		Now: r.clock.Now, Logger: slog.New(slog.NewTextHandler(r.logs, nil)),
		OnChange: func() { r.changes.Add(1) },
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return r
}

// watching waits until the Watcher has asked to watch n times.
func (r *watcherRig) watching(n int) {
	r.t.Helper()
	waitFor(r.t, fmt.Sprintf("%d watch requests", n), func() bool {
		c := 0
		for _, a := range r.client.Actions() {
			if a.GetVerb() == "watch" {
				c++
			}
		}
		return c >= n
	})
}

// update writes a new version of the ConfigMap and waits until the
// Watcher has received it (the fake's watch delivers asynchronously, and
// the clock must not move before the Watcher stamped the update).
func (r *watcherRig) update(data string) {
	r.t.Helper()
	r.version++
	rv := fmt.Sprint(r.version)
	cms := r.client.CoreV1().ConfigMaps("ep")
	cm, err := cms.Get(context.Background(), "readiness", metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		cm = configMap("readiness", data)
		cm.ResourceVersion = rv
		_, err = cms.Create(context.Background(), cm, metav1.CreateOptions{})
	case err == nil:
		cm.Data[DataKey] = data
		cm.ResourceVersion = rv
		_, err = cms.Update(context.Background(), cm, metav1.UpdateOptions{})
	}
	if err != nil {
		r.t.Fatal(err)
	}
	waitFor(r.t, "the Watcher to receive version "+rv, func() bool {
		r.w.mu.Lock()
		defer r.w.mu.Unlock()
		return r.w.rv == rv
	})
}

func (r *watcherRig) lookupIs(addr string, want Verdict, wantFresh bool) {
	r.t.Helper()
	waitFor(r.t, fmt.Sprintf("Lookup(%s) = %+v, %t", addr, want, wantFresh), func() bool {
		v, ok := r.w.Lookup(addr)
		return ok == wantFresh && v == want
	})
}

func TestWatcherSharesVerdictsAndAgesThem(t *testing.T) {
	r := startWatcher(t, fake.NewClientset())
	r.watching(1)
	if _, ok := r.w.Lookup("10.0.0.1:6443"); ok {
		t.Fatal("a verdict without any ConfigMap")
	}
	r.update(encoded(t, 1, ready500))
	r.lookupIs("10.0.0.2:6443", Verdict{Code: 500, Reason: "[-]etcd failed: reason withheld"}, true)
	r.lookupIs("10.0.0.1:6443", Verdict{Ready: true, Code: 200}, true)
	if _, ok := r.w.Lookup("10.0.0.3:6443"); ok {
		t.Error("a verdict for an address the publisher did not publish")
	}
	waitFor(t, "OnChange after the first verdicts", func() bool { return r.changes.Load() >= 1 })

	// Heartbeats keep the verdicts fresh without calling OnChange.
	before := r.changes.Load()
	for seq := uint64(2); seq < 5; seq++ {
		r.clock.Advance(20 * time.Second)
		r.update(encoded(t, seq, ready500))
	}
	r.clock.Advance(20 * time.Second) // 20 s since the last heartbeat: still fresh
	if _, ok := r.w.Lookup("10.0.0.2:6443"); !ok {
		t.Error("verdict not fresh 20 s after the last update (StaleAfter 30 s)")
	}
	if got := r.changes.Load(); got != before {
		t.Errorf("OnChange called %d times for heartbeats that changed no verdict", got-before)
	}

	// No update for longer than StaleAfter: no shared verdict, and OnChange.
	r.clock.Advance(11 * time.Second)
	r.lookupIs("10.0.0.2:6443", Verdict{}, false)
	waitFor(t, "OnChange when the verdicts turn stale", func() bool { return r.changes.Load() > before })

	// A verdict that changes reaches Lookup and OnChange.
	n := r.changes.Load()
	r.update(encoded(t, 5, allReady))
	r.lookupIs("10.0.0.2:6443", Verdict{Ready: true, Code: 200}, true)
	waitFor(t, "OnChange for the new verdict", func() bool { return r.changes.Load() > n })
}

func TestWatcherDoesNotTrustTheFirstListedVersion(t *testing.T) {
	client := fake.NewClientset(configMap("readiness", encoded(t, 40, ready500)))
	r := startWatcher(t, client)
	r.watching(1)
	if _, ok := r.w.Lookup("10.0.0.2:6443"); ok {
		t.Fatal("a ConfigMap listed at start (its publisher may be long gone) gave a fresh verdict")
	}
	r.update(encoded(t, 41, ready500))
	r.lookupIs("10.0.0.2:6443", Verdict{Code: 500, Reason: "[-]etcd failed: reason withheld"}, true)
}

func TestWatcherMalformedAndDeleted(t *testing.T) {
	r := startWatcher(t, fake.NewClientset())
	r.watching(1)
	r.update(encoded(t, 1, ready500))
	r.lookupIs("10.0.0.2:6443", Verdict{Code: 500, Reason: "[-]etcd failed: reason withheld"}, true)

	r.update(`{"format":1,"publisher":"p","sequence":2,"interval":"1s","heartbeat":"10s","apiservers":{"api.example.com:443":{"ready":true,"code":200}}}`)
	r.lookupIs("10.0.0.2:6443", Verdict{}, false)
	if got := r.w.Malformed(); got != 1 {
		t.Errorf("Malformed() = %d, want 1", got)
	}
	waitFor(t, "a log line about the malformed ConfigMap", func() bool { return r.logs.count("unusable") == 1 })

	r.update(encoded(t, 3, allReady))
	r.lookupIs("10.0.0.2:6443", Verdict{Ready: true, Code: 200}, true)

	if err := r.client.CoreV1().ConfigMaps("ep").Delete(context.Background(), "readiness", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	r.lookupIs("10.0.0.2:6443", Verdict{}, false)
}

func TestWatcherForbiddenIsLoggedOnce(t *testing.T) {
	client := fake.NewClientset()
	var denied atomic.Bool
	denied.Store(true)
	client.PrependReactor("list", "configmaps", func(k8stesting.Action) (bool, runtime.Object, error) {
		if denied.Load() {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "configmaps"}, "readiness", fmt.Errorf("RBAC"))
		}
		return false, nil, nil
	})
	r := startWatcher(t, client)
	waitFor(t, "two refused lists", func() bool {
		c := 0
		for _, a := range client.Actions() {
			if a.GetVerb() == "list" {
				c++
			}
		}
		return c >= 2
	})
	if got := r.logs.count("not allowed"); got != 1 {
		t.Errorf("%d log lines about the refusal, want 1:\n%s", got, r.logs.b.String())
	}
	if _, ok := r.w.Lookup("10.0.0.1:6443"); ok {
		t.Error("a verdict while forbidden")
	}
	denied.Store(false)
	r.watching(1)
	r.update(encoded(t, 1, ready500))
	r.lookupIs("10.0.0.1:6443", Verdict{Ready: true, Code: 200}, true)
}

func TestWatcherLookupCanonicalAddresses(t *testing.T) {
	r := startWatcher(t, fake.NewClientset())
	r.watching(1)
	r.update(encoded(t, 1, map[string]Entry{"[fd00::1]:6443": {Code: 503, Reason: "shutting down"}}))
	r.lookupIs("[fd00:0::1]:6443", Verdict{Code: 503, Reason: "shutting down"}, true)
}

func TestWatcherBacksOffWhenWatchesEndAtOnce(t *testing.T) {
	client := fake.NewClientset()
	client.PrependWatchReactor("configmaps", func(k8stesting.Action) (bool, watch.Interface, error) {
		return true, watch.NewEmptyWatch(), nil
	})
	startWatcher(t, client)
	count := func(verb string) int {
		n := 0
		for _, a := range client.Actions() {
			if a.GetVerb() == verb {
				n++
			}
		}
		return n
	}
	waitFor(t, "three lists", func() bool { return count("list") >= 3 })
	// Every watch that ended at once was followed by a list after the
	// backoff, not by another watch at once.
	if l, w := count("list"), count("watch"); w > l+1 {
		t.Errorf("%d watches for %d lists: watches that end at once are renewed without backoff", w, l)
	}
}
