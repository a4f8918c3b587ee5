package readiness

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/extractedprism/extractedprism/internal/standin"
)

// targets are apiservers of every kind of answer, on loopback.
type targets struct {
	ready, unready *standin.Server
	denied         *httptest.Server // 401 to everyone
	hung           net.Listener     // accepts, never answers
	pool           *x509.CertPool
	bearer         chan string // Authorization headers the 401 server saw
}

func startTargets(t *testing.T) *targets {
	t.Helper()
	ctx := context.Background()
	tg := &targets{pool: x509.NewCertPool(), bearer: make(chan string, 100)}
	var err error
	if tg.ready, err = standin.Start(ctx, standin.Options{Name: "ready"}); err != nil {
		t.Fatal(err)
	}
	if tg.unready, err = standin.Start(ctx, standin.Options{Name: "unready", Unready: true}); err != nil {
		t.Fatal(err)
	}
	tg.denied = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case tg.bearer <- r.Header.Get("Authorization"):
		default:
		}
		http.Error(w, "Unauthorized", http.StatusUnauthorized)
	}))
	if tg.hung, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	var held sync.WaitGroup
	conns := make(chan net.Conn, 16)
	held.Go(func() {
		for {
			c, err := tg.hung.Accept()
			if err != nil {
				return
			}
			conns <- c
		}
	})
	tg.pool.AddCert(tg.ready.Certificate())
	tg.pool.AddCert(tg.unready.Certificate())
	tg.pool.AddCert(tg.denied.Certificate())
	t.Cleanup(func() {
		_ = tg.ready.Close()
		_ = tg.unready.Close()
		tg.denied.Close()
		_ = tg.hung.Close()
		held.Wait()
		close(conns)
		for c := range conns {
			_ = c.Close()
		}
	})
	return tg
}

func (tg *targets) endpoints() []string {
	return []string{tg.ready.Addr(), tg.unready.Addr(), tg.denied.Listener.Addr().String(), tg.hung.Addr().String()}
}

func publisherOptions(client *fake.Clientset, id string, tg *targets) PublisherOptions {
	return PublisherOptions{
		Client: client, Namespace: "ep", ConfigMap: "readiness", Identity: id,
		Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond, Heartbeat: 300 * time.Millisecond,
		LeaseDuration: time.Second, RenewDeadline: 500 * time.Millisecond, RetryPeriod: 100 * time.Millisecond,
		Endpoints: tg.endpoints(), DisableSlice: true,
		TLS: &tls.Config{RootCAs: tg.pool, MinVersion: tls.VersionTLS12},
		Auth: func(rt http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				r = r.Clone(r.Context())
				r.Header.Set("Authorization", "Bearer sa-token")
				return rt.RoundTrip(r)
			})
		},
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// runPublisher runs p until the returned stop is called (or the test ends).
func runPublisher(t *testing.T, p *Publisher) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// published reads and decodes the ConfigMap ("" if absent).
func published(t *testing.T, client *fake.Clientset) (Document, bool) {
	t.Helper()
	cm, err := client.CoreV1().ConfigMaps("ep").Get(context.Background(), "readiness", metav1.GetOptions{})
	if err != nil {
		return Document{}, false
	}
	d, err := Decode([]byte(cm.Data[DataKey]))
	if err != nil {
		t.Fatalf("published ConfigMap does not decode: %v\n%s", err, cm.Data[DataKey])
	}
	return d, true
}

func TestPublisherPublishesOnlyExplicitAnswers(t *testing.T) {
	tg := startTargets(t)
	client := fake.NewClientset()
	runPublisher(t, NewPublisher(publisherOptions(client, "publisher-0", tg)))

	var d Document
	waitFor(t, "the first document", func() bool {
		var ok bool
		d, ok = published(t, client)
		return ok
	})
	want := map[string]Verdict{
		tg.ready.Addr():   {Ready: true, Code: 200},
		tg.unready.Addr(): {Code: 500, Reason: "[-]standin-ready failed: reason withheld"},
	}
	got := map[string]Verdict{}
	for a, e := range d.APIServers {
		got[a] = e.Verdict()
	}
	if len(got) != len(want) || got[tg.ready.Addr()] != want[tg.ready.Addr()] || got[tg.unready.Addr()] != want[tg.unready.Addr()] {
		t.Errorf("published %v, want %v (nothing for the 401 and the hung apiserver)", got, want)
	}
	if d.Publisher != "publisher-0" || d.Interval != 100*time.Millisecond || d.Heartbeat != 300*time.Millisecond || d.Sequence < 1 {
		t.Errorf("document header %+v", d)
	}
	if h := <-tg.bearer; h != "Bearer sa-token" {
		t.Errorf("the probe carried Authorization %q", h)
	}
	cm, err := client.CoreV1().ConfigMaps("ep").Get(context.Background(), "readiness", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Labels["app.kubernetes.io/component"] != "readiness" {
		t.Errorf("labels %v", cm.Labels)
	}

	// A change is published at once; the sequence only grows.
	tg.ready.SetReady(false)
	waitFor(t, "the change of the first apiserver", func() bool {
		n, _ := published(t, client)
		return n.APIServers[tg.ready.Addr()].Code == 500 && n.Sequence > d.Sequence
	})

	// Heartbeats: the sequence grows without a change.
	n0, _ := published(t, client)
	waitFor(t, "two heartbeats", func() bool {
		n, _ := published(t, client)
		return n.Sequence >= n0.Sequence+2
	})
}

func TestPublisherProbesTheKubernetesEndpointSlice(t *testing.T) {
	tg := startTargets(t)
	host, port, err := net.SplitHostPort(tg.unready.Addr())
	if err != nil {
		t.Fatal(err)
	}
	p32 := func(s string) *int32 {
		n, err := strconv.ParseInt(s, 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		v := int32(n)
		return &v
	}
	_, readyPort, err := net.SplitHostPort(tg.ready.Addr())
	if err != nil {
		t.Fatal(err)
	}
	name, tru := "https", true
	client := fake.NewClientset(
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: p32(port)}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{host}, Conditions: discoveryv1.EndpointConditions{Ready: &tru}}},
		},
		// Another slice of the same service is not read.
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes-extra", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: p32(readyPort)}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"127.0.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &tru}}},
		},
	)
	o := publisherOptions(client, "publisher-0", tg)
	o.Endpoints, o.DisableSlice = nil, false
	runPublisher(t, NewPublisher(o))
	waitFor(t, "the slice's apiserver published", func() bool {
		d, ok := published(t, client)
		return ok && d.APIServers[tg.unready.Addr()].Code == 500
	})
	if d, _ := published(t, client); len(d.APIServers) != 1 {
		t.Errorf("published %v, want only the kubernetes slice's address", d.APIServers)
	}
}

func TestPublisherHandsOverOnStop(t *testing.T) {
	tg := startTargets(t)
	client := fake.NewClientset()
	a := NewPublisher(publisherOptions(client, "publisher-a", tg))
	b := NewPublisher(publisherOptions(client, "publisher-b", tg))
	stopA := runPublisher(t, a)
	waitFor(t, "publisher-a to lead", func() bool {
		d, ok := published(t, client)
		return ok && d.Publisher == "publisher-a"
	})
	runPublisher(t, b)
	// b stands by while a leads: every write stays a's.
	seen, _ := published(t, client)
	waitFor(t, "three more writes", func() bool {
		d, _ := published(t, client)
		if d.Publisher != "publisher-a" {
			t.Fatalf("publisher-b wrote while publisher-a led: %+v", d)
		}
		return d.Sequence >= seen.Sequence+3
	})
	if b.Leading() || !a.Leading() {
		t.Fatalf("leading: a=%t b=%t", a.Leading(), b.Leading())
	}
	last, _ := published(t, client)
	stopA()
	waitFor(t, "publisher-b to take over", func() bool {
		d, _ := published(t, client)
		return d.Publisher == "publisher-b"
	})
	d, _ := published(t, client)
	if d.Sequence <= last.Sequence {
		t.Errorf("sequence went from %d to %d across the handover", last.Sequence, d.Sequence)
	}
}

func TestPublisherOptionsRejected(t *testing.T) {
	client := fake.NewClientset()
	tests := map[string]PublisherOptions{
		"no identity":           {Client: client, Namespace: "ep"},
		"timeout over interval": {Client: client, Namespace: "ep", Identity: "x", Interval: time.Second, Timeout: 2 * time.Second},
		"bad endpoint":          {Client: client, Namespace: "ep", Identity: "x", Endpoints: []string{"api.example.com:6443"}},
		"nothing to probe":      {Client: client, Namespace: "ep", Identity: "x", DisableSlice: true},
	}
	for name, o := range tests {
		if err := NewPublisher(o).Run(context.Background()); err == nil {
			t.Errorf("%s: Run accepted the options", name)
		}
	}
}

func TestPublisherStopsWritingWhenTheLeaseIsTaken(t *testing.T) {
	tg := startTargets(t)
	client := fake.NewClientset()
	// The fake client does not check resource versions: once another
	// holder has the Lease, this reactor refuses the old leader's renewals
	// as an apiserver would (a conflict with the newer holder).
	var taken atomic.Bool
	client.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		if taken.Load() {
			return true, nil, apierrors.NewConflict(schema.GroupResource{Group: "coordination.k8s.io", Resource: "leases"}, DefaultLease, errors.New("held by intruder"))
		}
		return false, nil, nil
	})
	p := NewPublisher(publisherOptions(client, "publisher-a", tg))
	runPublisher(t, p)
	waitFor(t, "publisher-a to lead", func() bool { return p.Leading() })

	// Another holder takes the Lease for a minute (below).
	leases := client.CoordinationV1().Leases("ep")
	l, err := leases.Get(context.Background(), DefaultLease, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	holder, secs, now := "intruder", int32(60), metav1.NewMicroTime(time.Now())
	l.Spec.HolderIdentity, l.Spec.LeaseDurationSeconds, l.Spec.RenewTime, l.Spec.AcquireTime = &holder, &secs, &now, &now
	if _, err := leases.Update(context.Background(), l, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	taken.Store(true)
	waitFor(t, "publisher-a to stop leading", func() bool { return !p.Leading() })
	last, _ := published(t, client)
	// Over ten heartbeats (3 s), nothing more is written.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if d, _ := published(t, client); d.Sequence != last.Sequence {
			t.Fatalf("publisher-a wrote sequence %d after losing the Lease (last %d)", d.Sequence, last.Sequence)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
