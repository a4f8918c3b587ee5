package discovery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitTimeout is generous: the tests must pass on a loaded machine.
const waitTimeout = 20 * time.Second

// recorder collects what a Manager emits.
type recorder struct {
	mu     sync.Mutex
	lists  [][]Endpoint
	events []Event
}

func (r *recorder) update(eps []Endpoint) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lists = append(r.lists, eps)
}

func (r *recorder) event(e Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
}

func (r *recorder) all() [][]Endpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.lists)
}

func (r *recorder) last() []Endpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.lists) == 0 {
		return nil
	}
	return r.lists[len(r.lists)-1]
}

func (r *recorder) countEvents(k EventKind) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if e.Kind == k {
			n++
		}
	}
	return n
}

// dropped sums the Count of the Dropped events of reason.
func (r *recorder) dropped(reason DropReason) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if e.Kind == EventDropped && e.Reason == reason {
			n += e.Count
		}
	}
	return n
}

// render writes a list as "addr/source addr/source".
func render(eps []Endpoint) string {
	parts := make([]string, len(eps))
	for i, e := range eps {
		parts[i] = e.Address + "/" + string(e.Source)
	}
	return strings.Join(parts, " ")
}

// waitLast polls until the last emitted list renders as want.
func waitLast(t *testing.T, r *recorder, want string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if render(r.last()) == want {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("last emitted list is %q, want %q (all: %v)", render(r.last()), want, r.all())
}

// waitFor polls cond until it holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// fakeClock is a settable clock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

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

// testLogger returns a logger writing into a buffer the test can read.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newManager builds a Manager wired to a recorder and, if client is not
// nil, to that client. It runs it until the test ends.
func newManager(t *testing.T, o Options, client kubernetes.Interface) (*Manager, *recorder, *logBuffer) {
	t.Helper()
	r := &recorder{}
	logs := &logBuffer{}
	o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	o.OnUpdate = r.update
	o.OnEvent = r.event
	m, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if client != nil {
		m.newClient = func() (kubernetes.Interface, func(), error) { return client, func() {}, nil }
	}
	m.checkEvery = 5 * time.Millisecond
	m.backoff = backoffPolicy{base: 5 * time.Millisecond, max: 20 * time.Millisecond}
	return m, r, logs
}

// run starts m.Run and stops it (checking it returned nil) at test end.
func run(t *testing.T, m *Manager) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v, want nil", err)
			}
		case <-time.After(waitTimeout):
			t.Errorf("Run did not return after its context was cancelled")
		}
	})
}

func ptr[T any](v T) *T { return &v }

// slice builds an EndpointSlice of the kubernetes service.
func slice(name string, family discoveryv1.AddressType, port int32, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:      name,
			Namespace: "default",
			Labels:    map[string]string{discoveryv1.LabelServiceName: "kubernetes"},
		},
		AddressType: family,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("https"), Port: ptr(port)}},
		Endpoints:   eps,
	}
}

func ready(addrs ...string) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: addrs, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}
}

func notReady(addrs ...string) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: addrs, Conditions: discoveryv1.EndpointConditions{Ready: ptr(false)}}
}

// waitWatching waits until the fake client has been asked to watch n times.
func waitWatching(t *testing.T, c *fake.Clientset, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d watch requests", n), func() bool {
		count := 0
		for _, a := range c.Actions() {
			if a.GetVerb() == "watch" {
				count++
			}
		}
		return count >= n
	})
}

func TestSliceEndpoints(t *testing.T) {
	tests := []struct {
		name    string
		slice   *discoveryv1.EndpointSlice
		want    []string
		wantErr string
	}{
		{
			name:  "IPv4 ready and unknown readiness, not-ready skipped",
			slice: slice("a", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.1"), notReady("10.0.0.2"), discoveryv1.Endpoint{Addresses: []string{"10.0.0.3"}}),
			want:  []string{"10.0.0.1:6443", "10.0.0.3:6443"},
		},
		{
			name:  "IPv6 is bracketed and canonical",
			slice: slice("b", discoveryv1.AddressTypeIPv6, 443, ready("fd00:0:0::0001"), ready("2001:db8::2")),
			want:  []string{"[fd00::1]:443", "[2001:db8::2]:443"},
		},
		{
			name: "port named https wins among several",
			slice: &discoveryv1.EndpointSlice{
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports: []discoveryv1.EndpointPort{
					{Name: ptr("metrics"), Port: ptr(int32(9090))},
					{Name: ptr("https"), Port: ptr(int32(8443))},
				},
				Endpoints: []discoveryv1.Endpoint{ready("10.0.0.1")},
			},
			want: []string{"10.0.0.1:8443"},
		},
		{
			name: "the only port is used whatever its name",
			slice: &discoveryv1.EndpointSlice{
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports:       []discoveryv1.EndpointPort{{Port: ptr(int32(6443))}},
				Endpoints:   []discoveryv1.Endpoint{ready("10.0.0.1")},
			},
			want: []string{"10.0.0.1:6443"},
		},
		{
			name: "several ports without https",
			slice: &discoveryv1.EndpointSlice{
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports:       []discoveryv1.EndpointPort{{Name: ptr("a"), Port: ptr(int32(1))}, {Name: ptr("b"), Port: ptr(int32(2))}},
				Endpoints:   []discoveryv1.Endpoint{ready("10.0.0.1")},
			},
			wantErr: `no port named "https"`,
		},
		{
			name:    "FQDN slices are not used",
			slice:   slice("c", discoveryv1.AddressTypeFQDN, 6443, ready("cp.example")),
			wantErr: "is not IPv4 or IPv6",
		},
		{
			name:    "address of the wrong family is skipped",
			slice:   slice("d", discoveryv1.AddressTypeIPv4, 6443, ready("fd00::1", "10.0.0.9")),
			want:    []string{"10.0.0.9:6443"},
			wantErr: "does not match address type",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := SliceEndpoints(tt.slice)
			if tt.wantErr == "" && err != nil {
				t.Fatalf("error %v", err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestNewValidates(t *testing.T) {
	_, err := New(Options{
		Static:             []string{"10.0.0.1:6443", "nope", "10.0.0.2:0"},
		StaticMode:         "sometimes",
		StaticRestoreAfter: -time.Second,
		Debounce:           -time.Second,
		Enabled:            true,
		ViaLocal:           true,
		LocalAddress:       "127.0.0.1",
	})
	if err == nil {
		t.Fatal("New accepted invalid options")
	}
	for _, want := range []string{
		`discovery.static: "sometimes"`,
		"discovery.static_restore_after: -1s",
		"discovery.debounce: -1s",
		`endpoints[1]: "nope" is not host:port`,
		`endpoints[2]: "10.0.0.2:0" has an invalid port`,
		`discovery.via_local: local address: "127.0.0.1" is not host:port`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	m, err := New(Options{Static: []string{" 10.0.0.1:6443", "[FD00::1]:6443", "10.0.0.1:6443"}})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if got := m.staticList(); !slices.Equal(got, []string{"10.0.0.1:6443", "[fd00::1]:6443"}) {
		t.Fatalf("static list %v", got)
	}
	if s := m.Status(); s.Enabled || s.State != StateDisabled {
		t.Fatalf("status of a disabled manager: %+v", s)
	}
}

func TestDisabledEmitsStaticOnlyAndFollowsSetStatic(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "endpoints.json")
	if err := saveStateFile(state, []string{"10.9.9.9:6443"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	m, r, _ := newManager(t, Options{Static: []string{"10.0.0.2:6443", "10.0.0.1:6443"}, StateFile: state}, nil)
	m.newClient = func() (kubernetes.Interface, func(), error) {
		t.Error("a disabled manager built an API client")
		return nil, nil, errors.New("disabled")
	}
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:6443/static")
	m.SetStatic([]string{"10.0.0.3:6443", "bad"})
	waitLast(t, r, "10.0.0.3:6443/static")
	if s := m.Status(); s.State != StateDisabled {
		t.Fatalf("state %q, want %q", s.State, StateDisabled)
	}
}

func TestDiscoversMergesAndWritesStateFile(t *testing.T) {
	state := filepath.Join(t.TempDir(), "sub", "endpoints.json")
	c := fake.NewClientset(
		slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.1"), ready("10.0.0.2"), notReady("10.0.0.3")),
		// Only the slice the apiservers write, named after the service,
		// counts: anyone may add another with the service's label.
		slice("kubernetes-extra", discoveryv1.AddressTypeIPv6, 6443, ready("fd00::1")),
		// Another service's slice must not leak in.
		func() *discoveryv1.EndpointSlice {
			s := slice("other", discoveryv1.AddressTypeIPv4, 443, ready("10.1.1.1"))
			s.Labels[discoveryv1.LabelServiceName] = "other"
			return s
		}(),
	)
	m, r, _ := newManager(t, Options{
		Static:    []string{"10.0.0.1:6443", "192.0.2.1:6443"},
		Enabled:   true,
		Debounce:  10 * time.Millisecond,
		StateFile: state,
	}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:6443/discovered 192.0.2.1:6443/static")
	if got := r.all()[0]; render(got) != "10.0.0.1:6443/static 192.0.2.1:6443/static" {
		t.Fatalf("first emitted list %q, want the static endpoints alone", render(got))
	}
	s := m.Status()
	if s.State != StateSynced || s.LastSync.IsZero() || !slices.Equal(s.Discovered, []string{"10.0.0.1:6443", "10.0.0.2:6443"}) {
		t.Fatalf("status %+v", s)
	}
	waitFor(t, "the state file", func() bool {
		eps, err := loadStateFile(state)
		return err == nil && slices.Equal(eps, s.Discovered)
	})
	if r.countEvents(EventSync) == 0 {
		t.Fatal("no sync event")
	}
}

func TestFollowsWatchWithDebounce(t *testing.T) {
	c := fake.NewClientset(slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.1")))
	m, r, _ := newManager(t, Options{
		Static:   []string{"10.0.0.1:6443"},
		Enabled:  true,
		Debounce: time.Second,
	}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static")
	waitWatching(t, c, 1)
	before := len(r.all())

	// A burst of changes is applied once, as its final state.
	api := c.DiscoveryV1().EndpointSlices("default")
	steps := [][]discoveryv1.Endpoint{
		{ready("10.0.0.1"), ready("10.0.0.2")},
		{ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3")},
		{ready("10.0.0.1"), notReady("10.0.0.2"), ready("10.0.0.3")},
	}
	for _, eps := range steps {
		if _, err := api.Update(context.Background(), slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, eps...), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.3:6443/discovered")
	if got := len(r.all()) - before; got != 1 {
		t.Fatalf("burst of %d changes emitted %d lists, want 1: %v", len(steps), got, r.all()[before:])
	}

	// Removing an endpoint removes it; a slice deletion that leaves nothing
	// keeps the known set.
	if _, err := api.Update(context.Background(), slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.1")), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "10.0.0.3 to leave", func() bool { return !slices.Contains(m.Status().Discovered, "10.0.0.3:6443") })
	waitLast(t, r, "10.0.0.1:6443/static")
	if err := api.Delete(context.Background(), "kubernetes", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the empty answer", func() bool { return r.countEvents(EventSync) >= 1 && lastSyncCount(r) == 0 })
	if got := render(r.last()); got != "10.0.0.1:6443/static" {
		t.Fatalf("after an empty answer the list is %q", got)
	}
	if got := m.Status().Discovered; !slices.Equal(got, []string{"10.0.0.1:6443"}) {
		t.Fatalf("after an empty answer discovered is %v, want the last non-empty answer", got)
	}
}

func lastSyncCount(r *recorder) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := len(r.events) - 1; i >= 0; i-- {
		if r.events[i].Kind == EventSync {
			return r.events[i].Count
		}
	}
	return -1
}

func TestEmptyDiscoveryNeverEmptiesTheSet(t *testing.T) {
	c := fake.NewClientset(slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, notReady("10.0.0.5")))
	m, r, logs := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, Enabled: true, StaticMode: StaticBootstrapOnly}, c)
	run(t, m)
	waitFor(t, "a sync", func() bool { return m.Status().State == StateSynced })
	waitWatching(t, c, 1)
	if got := render(r.last()); got != "10.0.0.1:6443/static" {
		t.Fatalf("list %q, want the static endpoint kept", got)
	}
	_ = logs
}

func TestFailingAPIKeepsStaticAndStateFileAndRetries(t *testing.T) {
	state := filepath.Join(t.TempDir(), "endpoints.json")
	if err := saveStateFile(state, []string{"10.0.0.7:6443", "10.0.0.8:6443"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientset(slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.8")))
	var mu sync.Mutex
	failing := true
	lists := 0
	c.PrependReactor("list", "endpointslices", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		lists++
		if failing {
			return true, nil, errors.New("connection refused")
		}
		return false, nil, nil
	})
	m, r, _ := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, Enabled: true, StateFile: state}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.7:6443/state-file 10.0.0.8:6443/state-file")
	waitFor(t, "several list attempts", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return lists >= 3
	})
	waitFor(t, "three error events", func() bool { return r.countEvents(EventError) >= 3 })
	waitFor(t, "the error state", func() bool {
		s := m.Status()
		return s.State == StateError && strings.Contains(s.LastError, "connection refused")
	})
	if got := render(r.last()); got != "10.0.0.1:6443/static 10.0.0.7:6443/state-file 10.0.0.8:6443/state-file" {
		t.Fatalf("failing discovery changed the list to %q", got)
	}

	mu.Lock()
	failing = false
	mu.Unlock()
	// Discovery replaces the state file's list.
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.8:6443/discovered")
	waitFor(t, "the state file to follow", func() bool {
		eps, err := loadStateFile(state)
		return err == nil && slices.Equal(eps, []string{"10.0.0.8:6443"})
	})
}

func TestClientBuildFailureIsRetried(t *testing.T) {
	m, r, _ := newManager(t, Options{
		Static:     []string{"10.0.0.1:6443"},
		Enabled:    true,
		Kubeconfig: filepath.Join(t.TempDir(), "missing-kubeconfig"),
	}, nil)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static")
	waitFor(t, "repeated errors", func() bool { return r.countEvents(EventError) >= 2 })
	if s := m.Status(); s.State != StateError || !strings.Contains(s.LastError, "missing-kubeconfig") {
		t.Fatalf("status %+v, want an error naming the kubeconfig", s)
	}
}

func TestStateFileEmittedBeforeAnyAPIAnswer(t *testing.T) {
	state := filepath.Join(t.TempDir(), "endpoints.json")
	if err := saveStateFile(state, []string{"[fd00::7]:6443"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientset()
	release := make(chan struct{})
	c.PrependReactor("list", "endpointslices", func(k8stesting.Action) (bool, runtime.Object, error) {
		<-release
		return false, nil, nil
	})
	m, r, _ := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, Enabled: true, StateFile: state}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static [fd00::7]:6443/state-file")
	if s := m.Status(); s.State != StateStarting {
		t.Fatalf("state %q before any answer, want %q", s.State, StateStarting)
	}
	close(release)
	waitFor(t, "a sync", func() bool { return m.Status().State == StateSynced })
	// An empty answer keeps the last-known-good list.
	if got := render(r.last()); got != "10.0.0.1:6443/static [fd00::7]:6443/state-file" {
		t.Fatalf("after an empty answer: %q", got)
	}
}

func TestCorruptStateFileIsIgnored(t *testing.T) {
	for name, content := range map[string]string{
		"not JSON":      "{\"endpoints\": [",
		"wrong version": `{"version": 7, "endpoints": ["10.0.0.9:6443"]}`,
		"bad endpoint":  `{"version": 1, "endpoints": ["10.0.0.9"]}`,
	} {
		t.Run(name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "endpoints.json")
			if err := os.WriteFile(state, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			c := fake.NewClientset()
			c.PrependReactor("list", "endpointslices", func(k8stesting.Action) (bool, runtime.Object, error) {
				return true, nil, errors.New("unreachable")
			})
			m, r, logs := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, Enabled: true, StateFile: state}, c)
			run(t, m)
			waitLast(t, r, "10.0.0.1:6443/static")
			waitFor(t, "the warning", func() bool { return strings.Contains(logs.String(), "ignoring unreadable state file") })
		})
	}
}

func TestSaveStateFileIsAtomic(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "endpoints.json")
	for i := range 3 {
		eps := []string{fmt.Sprintf("10.0.0.%d:6443", i+1)}
		if err := saveStateFile(state, eps, time.Unix(int64(i), 0)); err != nil {
			t.Fatal(err)
		}
		got, err := loadStateFile(state)
		if err != nil || !slices.Equal(got, eps) {
			t.Fatalf("read back %v, %v; want %v", got, err, eps)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries, want only the state file (no temporaries)", len(entries))
	}
	fi, err := os.Stat(state)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v", fi.Mode())
	}
	// A directory in the way is reported, not fatal.
	if err := saveStateFile(filepath.Join(state, "x.json"), []string{"10.0.0.1:6443"}, time.Now()); err == nil {
		t.Fatal("writing below a regular file succeeded")
	}
}

// controlledAPI answers lists from a settable slice and hands out watches the
// test can push events into and close.
type controlledAPI struct {
	mu      sync.Mutex
	failing bool
	current *discoveryv1.EndpointSlice
	watches []*watch.FakeWatcher
}

func (a *controlledAPI) install(c *fake.Clientset) {
	c.PrependReactor("list", "endpointslices", func(k8stesting.Action) (bool, runtime.Object, error) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.failing {
			return true, nil, errors.New("connection refused")
		}
		l := &discoveryv1.EndpointSliceList{ListMeta: metav1.ListMeta{ResourceVersion: "10"}}
		if a.current != nil {
			l.Items = append(l.Items, *a.current.DeepCopy())
		}
		return true, l, nil
	})
	c.PrependWatchReactor("endpointslices", func(k8stesting.Action) (bool, watch.Interface, error) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.failing {
			return true, nil, errors.New("connection refused")
		}
		w := watch.NewFakeWithChanSize(10, false)
		a.watches = append(a.watches, w)
		return true, w, nil
	})
}

// breakAPI makes lists and watches fail and closes the open watch.
func (a *controlledAPI) breakAPI() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failing = true
	for _, w := range a.watches {
		if !w.IsStopped() {
			w.Stop()
		}
	}
}

func (a *controlledAPI) heal() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failing = false
}

func TestBootstrapOnlyDropsAndRestoresStatic(t *testing.T) {
	clock := &fakeClock{now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	api := &controlledAPI{current: slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.2"), ready("10.0.0.3"))}
	c := fake.NewClientset()
	api.install(c)
	m, r, _ := newManager(t, Options{
		Static:             []string{"10.0.0.1:6443"},
		StaticMode:         StaticBootstrapOnly,
		StaticRestoreAfter: 5 * time.Minute,
		Enabled:            true,
		Clock:              clock.Now,
	}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.2:6443/discovered 10.0.0.3:6443/discovered")
	if first := render(r.all()[0]); first != "10.0.0.1:6443/static" {
		t.Fatalf("first list %q, want the static bootstrap endpoint", first)
	}

	api.breakAPI()
	waitFor(t, "the error state", func() bool { return m.Status().State == StateError })
	clock.Advance(4 * time.Minute)
	// Not yet: still on the discovered endpoints. Give the loop several
	// check periods to (wrongly) act.
	n := r.countEvents(EventError)
	waitFor(t, "more retries", func() bool { return r.countEvents(EventError) >= n+3 })
	if got := render(r.last()); got != "10.0.0.2:6443/discovered 10.0.0.3:6443/discovered" {
		t.Fatalf("static restored too early: %q", got)
	}
	clock.Advance(time.Minute + time.Second)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:6443/discovered 10.0.0.3:6443/discovered")

	// Discovery comes back: static is dropped again.
	api.heal()
	waitLast(t, r, "10.0.0.2:6443/discovered 10.0.0.3:6443/discovered")
}

func TestBootstrapOnlyKeepsStaticWhenDiscoveryIsEmpty(t *testing.T) {
	api := &controlledAPI{current: slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443)}
	c := fake.NewClientset()
	api.install(c)
	m, r, _ := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, StaticMode: StaticBootstrapOnly, Enabled: true}, c)
	run(t, m)
	waitFor(t, "a sync", func() bool { return m.Status().State == StateSynced })
	waitFor(t, "a watch", func() bool {
		api.mu.Lock()
		defer api.mu.Unlock()
		return len(api.watches) > 0
	})
	if got := render(r.last()); got != "10.0.0.1:6443/static" {
		t.Fatalf("list %q", got)
	}
	// An endpoint appears through the watch: static goes.
	api.mu.Lock()
	w := api.watches[0]
	api.mu.Unlock()
	s := slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.4"))
	s.ResourceVersion = "11"
	w.Modify(s)
	waitLast(t, r, "10.0.0.4:6443/discovered")
}

func TestWatchRestartsAndRelistsOnExpiry(t *testing.T) {
	api := &controlledAPI{current: slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.2"))}
	c := fake.NewClientset()
	api.install(c)
	m, r, _ := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, Enabled: true}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:6443/discovered")
	watchN := func() int {
		api.mu.Lock()
		defer api.mu.Unlock()
		return len(api.watches)
	}
	lastWatch := func() *watch.FakeWatcher {
		api.mu.Lock()
		defer api.mu.Unlock()
		return api.watches[len(api.watches)-1]
	}
	waitFor(t, "a watch", func() bool { return watchN() == 1 })

	// A bookmark moves the resource version; the next watch resumes there.
	bm := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{ResourceVersion: "42"}}
	lastWatch().Action(watch.Bookmark, bm)
	lastWatch().Stop()
	waitFor(t, "a second watch", func() bool { return watchN() == 2 })
	var rv string
	for _, a := range c.Actions() {
		if wa, ok := a.(k8stesting.WatchActionImpl); ok {
			rv = wa.ListOptions.ResourceVersion
			if !wa.ListOptions.AllowWatchBookmarks {
				t.Error("watch without bookmarks")
			}
			if wa.ListOptions.LabelSelector != "kubernetes.io/service-name=kubernetes" {
				t.Errorf("label selector %q", wa.ListOptions.LabelSelector)
			}
		}
	}
	if rv != "42" {
		t.Fatalf("second watch from resource version %q, want the bookmark's 42", rv)
	}
	waitFor(t, "a restart event", func() bool { return r.countEvents(EventWatchRestart) >= 1 })

	// An expired resource version makes it list again.
	listsBefore := countVerb(c, "list")
	api.mu.Lock()
	api.current = slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready("10.0.0.3"))
	api.mu.Unlock()
	lastWatch().Error(&metav1.Status{Status: metav1.StatusFailure, Code: 410, Reason: metav1.StatusReasonExpired, Message: "too old resource version"})
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.3:6443/discovered")
	if countVerb(c, "list") <= listsBefore {
		t.Fatal("no list after an expired watch")
	}
}

func countVerb(c *fake.Clientset, verb string) int {
	n := 0
	for _, a := range c.Actions() {
		if a.GetVerb() == verb {
			n++
		}
	}
	return n
}

func TestRestConfigViaLocal(t *testing.T) {
	dir := t.TempDir()
	kc := filepath.Join(dir, "kubeconfig")
	write := func(serverName string) {
		extra := ""
		if serverName != "" {
			extra = "\n    tls-server-name: " + serverName
		}
		doc := `apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://10.0.0.1:6443
    insecure-skip-tls-verify: false` + extra + `
users:
- name: u
  user:
    token: secret
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
`
		if err := os.WriteFile(kc, []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name, kubeconfigServerName, optServerName, local string
		viaLocal                                         bool
		wantHost, wantServerName                         string
	}{
		{"direct", "", "", "127.0.0.1:7445", false, "https://10.0.0.1:6443", ""},
		{"via local, default name", "", "", "127.0.0.1:7445", true, "https://127.0.0.1:7445", "kubernetes.default.svc"},
		{"via local, kubeconfig's name", "api.internal", "", "127.0.0.1:7445", true, "https://127.0.0.1:7445", "api.internal"},
		{"via local, option wins", "api.internal", "cp.example", "[::1]:7445", true, "https://[::1]:7445", "cp.example"},
		{"via local, unspecified bind", "", "", "0.0.0.0:7445", true, "https://127.0.0.1:7445", "kubernetes.default.svc"},
		{"via local, unspecified IPv6 bind", "", "", "[::]:7445", true, "https://[::1]:7445", "kubernetes.default.svc"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			write(tt.kubeconfigServerName)
			m, err := New(Options{Enabled: true, Kubeconfig: kc, ViaLocal: tt.viaLocal, LocalAddress: tt.local, ServerName: tt.optServerName})
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := m.restConfig()
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Host != tt.wantHost || cfg.ServerName != tt.wantServerName {
				t.Fatalf("host %q server name %q, want %q %q", cfg.Host, cfg.ServerName, tt.wantHost, tt.wantServerName)
			}
			if cfg.BearerToken != "secret" || cfg.UserAgent != userAgent {
				t.Fatalf("credentials or user agent lost: %q %q", cfg.BearerToken, cfg.UserAgent)
			}
			_, closeIdle, err := m.buildClient()
			if err != nil {
				t.Fatal(err)
			}
			closeIdle()
		})
	}
}

func TestBackoffIsCappedAndJittered(t *testing.T) {
	b := backoffPolicy{base: 500 * time.Millisecond, max: 15 * time.Second}
	seen := map[time.Duration]bool{}
	for attempt := range 40 {
		d := b.delay(attempt)
		if d > 15*time.Second || d < 250*time.Millisecond {
			t.Fatalf("attempt %d: delay %s out of bounds", attempt, d)
		}
		if attempt >= 6 && d < 7500*time.Millisecond {
			t.Fatalf("attempt %d: delay %s below half the cap", attempt, d)
		}
		seen[d] = true
	}
	if len(seen) < 10 {
		t.Fatalf("only %d distinct delays: no jitter", len(seen))
	}
}
