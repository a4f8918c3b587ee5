package upstream

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
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func eps(addrs ...string) []Endpoint {
	out := make([]Endpoint, len(addrs))
	for i, a := range addrs {
		out[i] = Endpoint{Address: a, Source: "static"}
	}
	return out
}

func TestFirstProbeDecidesThenRiseFall(t *testing.T) {
	var trs []Transition
	s := NewSet(Options{Rise: 2, Fall: 3, OnTransition: func(tr Transition) { trs = append(trs, tr) }})
	s.Reconcile(eps("a:1"))
	if up, unknown, total := s.Counts(); up != 0 || unknown != 1 || total != 1 {
		t.Fatalf("counts = %d %d %d, want 0 1 1", up, unknown, total)
	}
	s.Report("a:1", true, time.Millisecond, nil)
	if got := s.Snapshot()[0].State; got != Up {
		t.Fatalf("after first success state = %v, want up", got)
	}
	fail := errors.New("boom")
	s.Report("a:1", false, 0, fail)
	s.Report("a:1", false, 0, fail)
	if got := s.Snapshot()[0].State; got != Up {
		t.Fatalf("after 2 failures (fall 3) state = %v, want up", got)
	}
	s.Report("a:1", false, 0, fail)
	st := s.Snapshot()[0]
	if st.State != Down || st.Reason != "boom" || st.Failures != 3 {
		t.Fatalf("after 3 failures = %+v, want down with reason boom and 3 failures", st)
	}
	s.Report("a:1", true, 0, nil)
	if got := s.Snapshot()[0].State; got != Down {
		t.Fatalf("after 1 success (rise 2) state = %v, want down", got)
	}
	s.Report("a:1", true, 0, nil)
	if got := s.Snapshot()[0].State; got != Up {
		t.Fatalf("after 2 successes state = %v, want up", got)
	}
	want := []State{Up, Down, Up}
	if len(trs) != len(want) {
		t.Fatalf("transitions = %+v, want %v", trs, want)
	}
	for i, w := range want {
		if trs[i].To != w || trs[i].Cause != CauseProbe {
			t.Errorf("transition %d = %v (%v), want %v by probe", i, trs[i].To, trs[i].Cause, w)
		}
	}
}

func TestFirstFailureMarksDown(t *testing.T) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1"))
	s.Report("a:1", false, 0, errors.New("refused"))
	if got := s.Snapshot()[0].State; got != Down {
		t.Fatalf("state = %v, want down", got)
	}
}

// hold counts n connections on addr, as if picked and established.
func hold(s *Set, addr string, n int) {
	s.Lookup(addr).active.Add(int64(n))
}

// pickAddr picks and gives the reservation back at once.
func pickAddr(s *Set) string {
	u := s.Pick(nil)
	u.Release()
	return u.Addr()
}

var (
	errRefused = &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	errTimeout = fmt.Errorf("probe: %w", context.DeadlineExceeded)
)

func TestPassiveFailureNeedsAProbeToConfirm(t *testing.T) {
	var trs []Transition
	var asked []string
	s := NewSet(Options{Rise: 2, Fall: 2,
		OnTransition: func(tr Transition) { trs = append(trs, tr) },
		OnSuspect:    func(u *Upstream) { asked = append(asked, u.Addr()) }})
	s.Reconcile(eps("a:1", "b:1"))
	s.Report("a:1", true, 0, nil)
	s.Report("b:1", true, 0, nil)
	u := s.Lookup("a:1")
	s.Passive(u, "connect failed (refused)")
	s.Passive(u, "connect failed (refused)")
	st := s.Snapshot()[0]
	if st.State != Up || !st.Suspect || st.Failures != 2 {
		t.Fatalf("after two passive failures = %+v, want up, suspect, 2 failures", st)
	}
	if len(asked) != 1 {
		t.Fatalf("OnSuspect called %d times, want once until the next probe", len(asked))
	}
	s.Report("a:1", false, 0, errRefused)
	st = s.Snapshot()[0]
	if st.State != Down || st.Suspect {
		t.Fatalf("after the confirming probe = %+v, want down, no longer suspect", st)
	}
	last := trs[len(trs)-1]
	if last.Cause != CauseConfirmed || last.Kind != failure.Refused {
		t.Fatalf("transition = %+v, want confirmed, refused", last)
	}
	s.Report("a:1", true, 0, nil)
	if s.Snapshot()[0].State != Down {
		t.Fatal("one success brought it back; want rise=2")
	}
	s.Report("a:1", true, 0, nil)
	if s.Snapshot()[0].State != Up {
		t.Fatal("two successes did not bring it back")
	}
}

func TestPassiveFalseAlarmIsClearedByProbe(t *testing.T) {
	var asked int
	s := NewSet(Options{Fall: 2, OnSuspect: func(*Upstream) { asked++ }})
	s.Reconcile(eps("a:1"))
	s.Report("a:1", true, 0, nil)
	u := s.Lookup("a:1")
	for range 10 {
		s.Passive(u, "closed the connection before answering")
		s.Report("a:1", true, 0, nil) // the confirming probe finds it healthy
	}
	if asked != 10 {
		t.Fatalf("OnSuspect called %d times, want once per passive failure after a probe", asked)
	}
	s.Report("a:1", false, 0, errors.New("one bad probe"))
	if st := s.Snapshot()[0]; st.State != Up {
		t.Fatalf("false alarms plus one failed probe took it down: %+v", st)
	}
}

func TestPassiveOnDownUpstreamAsksNothing(t *testing.T) {
	var asked int
	s := NewSet(Options{OnSuspect: func(*Upstream) { asked++ }})
	s.Reconcile(eps("a:1"))
	s.Report("a:1", false, 0, errRefused)
	s.Passive(s.Lookup("a:1"), "refused")
	if asked != 0 || s.Snapshot()[0].Suspect {
		t.Fatal("a passive failure of a down upstream asked for a probe")
	}
}

func TestSuspectIsPickedLast(t *testing.T) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1", "b:1"))
	s.Report("a:1", true, 0, nil)
	s.Report("b:1", true, 0, nil)
	hold(s, "b:1", 5)
	s.Passive(s.Lookup("a:1"), "reset")
	for range 5 {
		if got := pickAddr(s); got != "b:1" {
			t.Fatalf("pick = %s, want b:1: a suspect upstream comes after every other up one", got)
		}
	}
	if got := s.Pick(func(u *Upstream) bool { return u.Addr() == "b:1" }); got == nil || got.Addr() != "a:1" {
		t.Fatal("a suspect upstream must still be picked when it is the only up one left")
	}
}

func TestTimeoutOnEveryUpstreamIsOverloadNotDeath(t *testing.T) {
	var trs []Transition
	s := NewSet(Options{Fall: 2, OnTransition: func(tr Transition) { trs = append(trs, tr) }})
	addrs := []string{"a:1", "b:1", "c:1"}
	s.Reconcile(eps(addrs...))
	for _, a := range addrs {
		s.Report(a, true, 0, nil)
	}
	for range 5 {
		for _, a := range addrs {
			s.Report(a, false, 2*time.Second, errTimeout)
		}
	}
	for _, st := range s.Snapshot() {
		if st.State != Up {
			t.Fatalf("%s = %+v; every upstream timing out must take none down", st.Address, st)
		}
	}
	if len(trs) != 3 {
		t.Fatalf("transitions = %+v, want only the three first ups", trs)
	}
	// One recovers: the others' next timeouts take them down now.
	s.Report("c:1", true, 0, nil)
	s.Report("a:1", false, 2*time.Second, errTimeout)
	if st := s.Snapshot()[0]; st.State != Down {
		t.Fatalf("a:1 = %+v, want down once another upstream answers", st)
	}
	if last := trs[len(trs)-1]; last.Kind != failure.Timeout {
		t.Fatalf("kind = %s, want timeout", last.Kind)
	}
}

func TestTimeoutTakesDownWhileAnotherAnswers(t *testing.T) {
	s := NewSet(Options{Fall: 2})
	s.Reconcile(eps("a:1", "b:1"))
	s.Report("a:1", true, 0, nil)
	s.Report("b:1", true, 0, nil)
	s.Report("a:1", false, 0, errTimeout)
	s.Report("b:1", true, 0, nil)
	s.Report("a:1", false, 0, errTimeout)
	if st := s.Snapshot()[0]; st.State != Down {
		t.Fatalf("a hung upstream beside a healthy one = %+v, want down", st)
	}
}

func TestPickReservesSoABurstSpreads(t *testing.T) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1", "b:1", "c:1"))
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		s.Report(a, true, 0, nil)
	}
	// b and c carry 20 connections each; a has just recovered.
	hold(s, "b:1", 20)
	hold(s, "c:1", 20)
	for range 64 { // a burst: none of them established yet
		if s.Pick(nil) == nil {
			t.Fatal("no pick")
		}
	}
	mean := float64(40+64) / 3
	for _, st := range s.Snapshot() {
		if d := float64(st.Active) - mean; d > mean/4 || d < -mean/4 {
			t.Errorf("%s carries %d after the burst, want within 25%% of %.1f", st.Address, st.Active, mean)
		}
	}
}

func TestReconcileKeepsState(t *testing.T) {
	var added, removed []string
	s := NewSet(Options{
		OnAdd:    func(u *Upstream) { added = append(added, u.Addr()) },
		OnRemove: func(u *Upstream) { removed = append(removed, u.Addr()) },
	})
	s.Reconcile(eps("a:1", "b:1"))
	s.Report("a:1", true, 0, nil)
	a := s.Lookup("a:1")
	hold(s, "a:1", 1)
	b := s.Lookup("b:1")
	s.Reconcile([]Endpoint{{Address: "a:1", Source: "discovered"}, {Address: "c:1", Source: "discovered"}, {Address: "c:1", Source: "static"}})
	if s.Lookup("a:1") != a {
		t.Fatal("a:1 lost its identity across reconcile")
	}
	st := s.Snapshot()
	if len(st) != 2 || st[0].Address != "a:1" || st[0].State != Up || st[0].Active != 1 || st[0].Source != "discovered" {
		t.Fatalf("snapshot = %+v", st)
	}
	if st[1].Address != "c:1" || st[1].State != Unknown || st[1].Source != "discovered" {
		t.Fatalf("new upstream = %+v", st[1])
	}
	if !b.Removed() || a.Removed() {
		t.Fatal("Removed flags wrong")
	}
	if len(added) != 3 || len(removed) != 1 || removed[0] != "b:1" {
		t.Fatalf("added %v removed %v", added, removed)
	}
	// A report for a removed address is ignored.
	s.Report("b:1", true, 0, nil)
	if s.Lookup("b:1") != nil {
		t.Fatal("removed upstream came back")
	}
}

func TestPickLeastConnectionsTiesRoundRobin(t *testing.T) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1", "b:1", "c:1"))
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		s.Report(a, true, 0, nil)
	}
	counts := map[string]int{}
	for range 300 {
		counts[pickAddr(s)]++
	}
	for a, n := range counts {
		if n != 100 {
			t.Errorf("ties: %s picked %d of 300, want 100 (round-robin)", a, n)
		}
	}
	// Least connections: load a and b; c must win.
	hold(s, "a:1", 2)
	hold(s, "b:1", 1)
	for range 10 {
		if got := pickAddr(s); got != "c:1" {
			t.Fatalf("pick = %s, want c:1 (fewest connections)", got)
		}
	}
	hold(s, "c:1", 2)
	// b has 1, a 2, c 2.
	if got := pickAddr(s); got != "b:1" {
		t.Fatalf("pick = %s, want b:1", got)
	}
}

func TestPickRoundRobinStrategy(t *testing.T) {
	s := NewSet(Options{Strategy: RoundRobin})
	s.Reconcile(eps("a:1", "b:1"))
	s.Report("a:1", true, 0, nil)
	s.Report("b:1", true, 0, nil)
	hold(s, "a:1", 1)
	counts := map[string]int{}
	for range 100 {
		counts[pickAddr(s)]++
	}
	if counts["a:1"] != 50 || counts["b:1"] != 50 {
		t.Fatalf("round-robin counts = %v, want 50/50 regardless of load", counts)
	}
}

func TestPickPrefersUpThenUnknownThenDown(t *testing.T) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1", "b:1", "c:1"))
	s.Report("a:1", false, 0, errors.New("x"))
	// b and c unknown, a down: unknown first.
	got := pickAddr(s)
	if got != "b:1" && got != "c:1" {
		t.Fatalf("pick = %s, want an unknown upstream before a down one", got)
	}
	s.Report("b:1", false, 0, errors.New("x"))
	s.Report("c:1", false, 0, errors.New("x"))
	// All down: still returns them, each once when excluded in turn.
	tried := map[*Upstream]bool{}
	for range 3 {
		u := s.Pick(func(u *Upstream) bool { return tried[u] })
		if u == nil {
			t.Fatal("all down: Pick returned nil before every upstream was tried")
		}
		tried[u] = true
	}
	if u := s.Pick(func(u *Upstream) bool { return tried[u] }); u != nil {
		t.Fatalf("all tried: Pick = %s, want nil", u.Addr())
	}
	s.Report("c:1", true, 0, nil)
	s.Report("c:1", true, 0, nil)
	for range 5 {
		if got := pickAddr(s); got != "c:1" {
			t.Fatalf("pick = %s, want the only up upstream c:1", got)
		}
	}
}

func TestEmptySet(t *testing.T) {
	s := NewSet(Options{})
	if s.Pick(nil) != nil {
		t.Fatal("empty set picked something")
	}
}

func TestConcurrentUse(t *testing.T) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1", "b:1"))
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 500 {
				switch (i + j) % 4 {
				case 0:
					s.Report("a:1", j%3 != 0, 0, nil)
				case 1:
					if u := s.Pick(nil); u != nil {
						u.Opened()
						u.Release()
					}
				case 2:
					s.Reconcile(eps("a:1", "b:1"))
				default:
					_ = s.Snapshot()
				}
			}
		}()
	}
	wg.Wait()
	for _, st := range s.Snapshot() {
		if st.Active != 0 {
			t.Fatalf("%s active = %d after balanced acquire/release", st.Address, st.Active)
		}
	}
}

func BenchmarkPick(b *testing.B) {
	s := NewSet(Options{})
	s.Reconcile(eps("a:1", "b:1", "c:1"))
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		s.Report(a, true, 0, nil)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s.Pick(nil).Release()
		}
	})
}

func TestPickAnsweringSkipsSlowAndSuspect(t *testing.T) {
	s := NewSet(Options{Fall: 2})
	s.Reconcile(eps("a:1", "b:1", "c:1"))
	for _, a := range []string{"a:1", "b:1", "c:1"} {
		s.Report(a, true, 0, nil)
	}
	s.Report("a:1", false, 0, errTimeout) // slow: still up, last probe failed
	s.Passive(s.Lookup("b:1"), "reset")   // suspect
	for range 5 {
		u := s.PickAnswering(nil)
		if u == nil || u.Addr() != "c:1" {
			t.Fatalf("PickAnswering = %v, want c:1, the only up upstream that answers", u)
		}
		u.Release()
	}
	if u := s.PickAnswering(func(u *Upstream) bool { return u.Addr() == "c:1" }); u != nil {
		t.Fatalf("PickAnswering = %s, want none: the others are slow or suspect", u.Addr())
	}
}
