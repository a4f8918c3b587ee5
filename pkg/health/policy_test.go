package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	errRefused = &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	errTimeout = fmt.Errorf("probe: %w", context.DeadlineExceeded)
	errUnready = fmt.Errorf("probe /readyz: %w 500", failure.ErrUnready)
	errReset   = errors.New("read: connection reset by peer")
)

// call is one CloseUpstream request.
type call struct {
	addr   string
	spread time.Duration
	at     time.Time
	still  bool // what still() said when the closer asked
}

// closer records requests; it asks still() once, as the proxy does before
// its first close.
type closer struct {
	mu    sync.Mutex
	calls []call
}

func (c *closer) CloseUpstream(_ context.Context, u *upstream.Upstream, spread time.Duration, still func() bool) (int, bool) {
	ok := still()
	c.mu.Lock()
	c.calls = append(c.calls, call{addr: u.Addr(), spread: spread, at: time.Now(), still: ok})
	c.mu.Unlock()
	if !ok {
		return 0, false
	}
	return int(u.Active()), true
}

func (c *closer) get() []call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]call(nil), c.calls...)
}

type rig struct {
	set *upstream.Set
	pol *Policy
	cl  *closer
}

// newRig builds a set of three up upstreams, each carrying one
// connection, and a running policy fed by the set.
func newRig(t *testing.T, o Options) *rig {
	t.Helper()
	return newRigFall(t, o, 1)
}

// newRigFall is newRig with the set's fall threshold.
func newRigFall(t *testing.T, o Options, fall int) *rig {
	t.Helper()
	r := &rig{cl: &closer{}}
	r.set = upstream.NewSet(upstream.Options{Rise: 2, Fall: fall, OnTransition: func(tr upstream.Transition) { r.pol.Transition(tr) }})
	o.Set, o.Closer = r.set, r.cl
	r.pol = New(o)
	r.set.Reconcile([]upstream.Endpoint{{Address: "a:1"}, {Address: "b:1"}, {Address: "c:1"}})
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		r.set.Report(a, true, 0, nil)
		r.set.Report(a, true, 0, nil) // rise: answering
		// one connection each
		r.set.Pick(func(u *upstream.Upstream) bool { return u.Addr() != a })
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = r.pol.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

func waitCalls(t *testing.T, c *closer, n int, within time.Duration) []call {
	t.Helper()
	deadline := time.Now().Add(within)
	for len(c.get()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d close requests after %s, want %d: %+v", len(c.get()), within, n, c.get())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return c.get()
}

func TestHungUpstreamClosesAtOnceSpread(t *testing.T) {
	r := newRig(t, Options{CloseOnDown: true, Spread: 3 * time.Second})
	start := time.Now()
	r.set.Report("a:1", false, 0, errTimeout)
	calls := waitCalls(t, r.cl, 1, 5*time.Second)
	if c := calls[0]; c.addr != "a:1" || c.spread != 3*time.Second || !c.still || c.at.Sub(start) > 2*time.Second {
		t.Fatalf("close request = %+v; want a:1 at once, spread 3s", c)
	}
}

func TestRefusingUpstreamWaitsTheLongGrace(t *testing.T) {
	const grace = 400 * time.Millisecond
	r := newRig(t, Options{CloseOnDown: true, RefusedGrace: grace})
	start := time.Now()
	r.set.Report("a:1", false, 0, errRefused)
	calls := waitCalls(t, r.cl, 1, 10*time.Second)
	if el := calls[0].at.Sub(start); el < grace {
		t.Fatalf("connections of a refusing upstream closed after %s, before the %s grace", el, grace)
	}
}

func TestUnreadyThatComesBackClosesNothing(t *testing.T) {
	r := newRig(t, Options{CloseOnDown: true, UnreadyGrace: 300 * time.Millisecond})
	r.set.Report("a:1", false, 0, errUnready)
	r.set.Report("a:1", true, 0, nil)
	r.set.Report("a:1", true, 0, nil) // up again within the grace
	// A later failure of another upstream proves the policy is running.
	r.set.Report("b:1", false, 0, errReset)
	calls := waitCalls(t, r.cl, 1, 10*time.Second)
	for _, c := range calls {
		if c.addr == "a:1" {
			t.Fatalf("closed connections of an upstream that came back within the grace: %+v", calls)
		}
	}
}

func TestEveryUpstreamDownKeepsEveryConnection(t *testing.T) {
	r := newRig(t, Options{CloseOnDown: true, UnreadyGrace: 100 * time.Millisecond})
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		r.set.Report(a, false, 0, errUnready) // an etcd outage: every apiserver unready
	}
	// The outage ends: each upstream answers again; none of their
	// connections may be cut on the way back.
	for range 2 {
		for _, a := range []string{"a:1", "b:1", "c:1"} {
			r.set.Report(a, true, 0, nil)
		}
	}
	// Then b really fails, with the others up: that one is closed.
	r.set.Report("b:1", false, 0, errReset)
	calls := waitCalls(t, r.cl, 1, 10*time.Second)
	for _, c := range calls {
		if c.addr != "b:1" {
			t.Fatalf("the outage and the recovery cut connections: %+v", calls)
		}
	}
}

func TestDownWhileAllDownIsClosedOnlyIfStillFailingAfterRecovery(t *testing.T) {
	r := newRig(t, Options{CloseOnDown: true, UnreadyGrace: 50 * time.Millisecond})
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		r.set.Report(a, false, 0, errUnready)
	}
	r.set.Report("b:1", true, 0, nil)
	r.set.Report("b:1", true, 0, nil) // b recovers; a and c still answer not ready
	r.set.Report("c:1", true, 0, nil)
	r.set.Report("c:1", true, 0, nil)
	probed := time.Now()
	r.set.Report("a:1", false, 0, errUnready) // the probe after the recovery
	calls := waitCalls(t, r.cl, 1, 10*time.Second)
	if calls[0].addr != "a:1" || !calls[0].still || calls[0].at.Before(probed) {
		t.Fatalf("close requests = %+v, want a:1 only after a probe after the recovery found it failing (%s)", calls, probed)
	}
}

func TestRemovedUpstreamClosesAfterGrace(t *testing.T) {
	const grace = 200 * time.Millisecond
	r := newRig(t, Options{CloseOnDown: true, UnreadyGrace: grace})
	u := r.set.Lookup("c:1")
	start := time.Now()
	r.set.Reconcile([]upstream.Endpoint{{Address: "a:1"}, {Address: "b:1"}})
	r.pol.Removed(u)
	calls := waitCalls(t, r.cl, 1, 10*time.Second)
	if calls[0].addr != "c:1" || calls[0].at.Sub(start) < grace {
		t.Fatalf("close requests = %+v, want c:1 after %s", calls, grace)
	}
}

func TestCloseOnDownOff(t *testing.T) {
	r := newRig(t, Options{CloseOnDown: false})
	r.set.Report("a:1", false, 0, errTimeout)
	r.pol.SetOptions(Options{CloseOnDown: true}) // a reload turns it on: the next failure counts
	r.set.Report("b:1", false, 0, errTimeout)
	calls := waitCalls(t, r.cl, 1, 10*time.Second)
	if calls[0].addr != "b:1" {
		t.Fatalf("close requests = %+v; with close_on_down off nothing is closed", calls)
	}
}

func TestAnUpUpstreamAnsweringAgainGivesSomewhereToGo(t *testing.T) {
	r := newRigFall(t, Options{CloseOnDown: true}, 2)
	// b and c slow (one timeout each: still up, no longer answering),
	// then a fails for real: nowhere better to go, nothing is closed.
	r.set.Report("b:1", false, 0, errTimeout)
	r.set.Report("c:1", false, 0, errTimeout)
	r.set.Report("a:1", false, 0, errReset)
	r.set.Report("a:1", false, 0, errReset)
	// c answers again (rise) without any state transition, and a's probes
	// keep failing: a's connections now have somewhere to go.
	answered := time.Now()
	r.set.Report("c:1", true, 0, nil)
	r.set.Report("c:1", true, 0, nil)
	deadline := time.Now().Add(10 * time.Second)
	for len(r.cl.get()) == 0 && time.Now().Before(deadline) {
		r.set.Report("a:1", false, 0, errReset) // the prober's next rounds
		time.Sleep(100 * time.Millisecond)      // a probe interval, not synchronisation
	}
	calls := waitCalls(t, r.cl, 1, time.Second)
	if calls[0].addr != "a:1" || calls[0].at.Before(answered) {
		t.Fatalf("close requests = %+v, want a:1 once c answers again", calls)
	}
}
