package upstream

import (
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
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

func TestMarkDownIsImmediateAndNeedsRise(t *testing.T) {
	var trs []Transition
	s := NewSet(Options{Rise: 2, OnTransition: func(tr Transition) { trs = append(trs, tr) }})
	s.Reconcile(eps("a:1"))
	s.Report("a:1", true, 0, nil)
	u := s.Lookup("a:1")
	s.MarkDown(u, "connect refused")
	if st := s.Snapshot()[0]; st.State != Down || st.Reason != "connect refused" {
		t.Fatalf("after MarkDown = %+v", st)
	}
	if trs[len(trs)-1].Cause != CauseDial {
		t.Fatalf("cause = %v, want dial", trs[len(trs)-1].Cause)
	}
	s.Report("a:1", true, 0, nil)
	if s.Snapshot()[0].State != Down {
		t.Fatal("one success brought a passively downed upstream back; want rise=2")
	}
	s.Report("a:1", true, 0, nil)
	if s.Snapshot()[0].State != Up {
		t.Fatal("two successes did not bring it back")
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
	a.Acquire()
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
		counts[s.Pick(nil).Addr()]++
	}
	for a, n := range counts {
		if n != 100 {
			t.Errorf("ties: %s picked %d of 300, want 100 (round-robin)", a, n)
		}
	}
	// Least connections: load a and b; c must win.
	s.Lookup("a:1").Acquire()
	s.Lookup("a:1").Acquire()
	s.Lookup("b:1").Acquire()
	for range 10 {
		if got := s.Pick(nil).Addr(); got != "c:1" {
			t.Fatalf("pick = %s, want c:1 (fewest connections)", got)
		}
	}
	s.Lookup("c:1").Acquire()
	s.Lookup("c:1").Acquire()
	// b:1 and c:1... b has 1, a 2, c 2.
	if got := s.Pick(nil).Addr(); got != "b:1" {
		t.Fatalf("pick = %s, want b:1", got)
	}
}

func TestPickRoundRobinStrategy(t *testing.T) {
	s := NewSet(Options{Strategy: RoundRobin})
	s.Reconcile(eps("a:1", "b:1"))
	s.Report("a:1", true, 0, nil)
	s.Report("b:1", true, 0, nil)
	s.Lookup("a:1").Acquire()
	counts := map[string]int{}
	for range 100 {
		counts[s.Pick(nil).Addr()]++
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
	got := s.Pick(nil).Addr()
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
		if got := s.Pick(nil).Addr(); got != "c:1" {
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
						u.Acquire()
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
			_ = s.Pick(nil)
		}
	})
}
