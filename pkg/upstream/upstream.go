// Package upstream keeps the set of API server endpoints and their health.
//
// It does no I/O: the prober reports probe results through Set.Report, the
// proxy reports failures it saw on client connections through Set.Passive
// and picks upstreams with Set.Pick. A Set is safe for concurrent use.
// Reconcile replaces the list of addresses while keeping the state of
// addresses that stay.
//
// Only probe results change an upstream's state. A passive failure (a
// refused connect, or a reset or silence after a client's first bytes)
// makes the upstream suspect: it counts as one failure towards Fall, new
// connections prefer other upstreams, and OnSuspect asks for a probe at
// once. That probe decides: a failure confirms it (with the default Fall
// of 2, the passive failure and the probe take the upstream down within
// milliseconds for a refused connect), a success clears it. So nothing a
// client does (connecting and sending nothing, sending half a handshake)
// takes a healthy upstream down on its own.
//
// A probe that times out takes an Up upstream down only while another Up
// upstream answers its probes (its last Rise of them): when every upstream
// is slow the cluster is overloaded, not dead, and moving load between
// apiservers would make it worse.
package upstream

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// State is the health state of one upstream.
type State int

const (
	// Unknown: not probed yet. Unknown upstreams are tried only when no
	// upstream is Up.
	Unknown State = iota
	// Up: healthy; receives new connections.
	Up
	// Down: unhealthy; receives new connections only when nothing is Up.
	Down
)

func (s State) String() string {
	switch s {
	case Up:
		return "up"
	case Down:
		return "down"
	default:
		return "unknown"
	}
}

// Strategy selects among healthy upstreams.
type Strategy int

const (
	// LeastConnections picks the healthy upstream with the fewest active
	// connections; ties are broken round-robin.
	LeastConnections Strategy = iota
	// RoundRobin cycles through healthy upstreams.
	RoundRobin
)

// ParseStrategy maps a configuration string to a Strategy.
func ParseStrategy(s string) (Strategy, error) {
	switch s {
	case "least-connections", "":
		return LeastConnections, nil
	case "round-robin":
		return RoundRobin, nil
	}
	return 0, fmt.Errorf("unknown balancing strategy %q (want least-connections or round-robin)", s)
}

// Cause says what caused a transition.
type Cause int

const (
	// CauseProbe: an active health probe.
	CauseProbe Cause = iota
	// CauseConfirmed: a probe that confirmed a failure the proxy saw on a
	// client connection (passive health).
	CauseConfirmed
)

func (c Cause) String() string {
	if c == CauseConfirmed {
		return "connect, confirmed by probe"
	}
	return "probe"
}

// Endpoint is an address with the source it was learnt from.
type Endpoint struct {
	Address string // host:port
	Source  string // "static", "discovered", "state-file"
}

// Upstream is one endpoint. Its identity (pointer) is stable for as long as
// its address stays in the set; counters are atomic so the proxy's hot path
// takes no lock.
type Upstream struct {
	addr string

	active   atomic.Int64
	total    atomic.Uint64
	failures atomic.Uint64
	removed  atomic.Bool

	// Attachment is free for the owner of the Set (e.g. per-upstream metrics
	// resolved once); the Set never reads it.
	Attachment atomic.Value

	// guarded by Set.mu
	source      string
	state       State
	since       time.Time
	reason      string
	okStreak    int
	failStreak  int
	lastProbe   time.Time
	lastProbeOK bool
	lastLatency time.Duration
	lastErr     string
	// suspect: a passive failure since the last probe (counted once in
	// failStreak); passiveReason says what it was.
	suspect       bool
	passiveReason string
	// note: why the last probe's answer said nothing about readiness
	// ("readiness unknown: 401 Unauthorized"), "" when it did.
	note   string
	shared bool // the last probe's readiness came from the shared verdict
}

// Addr returns the upstream's host:port.
func (u *Upstream) Addr() string { return u.addr }

// Opened counts a connection established to u. Its place in Active was
// reserved by the Pick that chose u.
func (u *Upstream) Opened() { u.total.Add(1) }

// Release gives back the place in Active that Pick reserved: the dial
// failed, or the connection ended.
func (u *Upstream) Release() { u.active.Add(-1) }

// Active returns the number of connections riding on u or being dialled
// to it.
func (u *Upstream) Active() int64 { return u.active.Load() }

// Removed reports whether u has left the set.
func (u *Upstream) Removed() bool { return u.removed.Load() }

// Transition describes a change of an upstream's state.
type Transition struct {
	Upstream *Upstream
	Source   string
	From, To State
	Cause    Cause
	Reason   string
	// Kind is what the failure behind a transition to Down looked like.
	Kind failure.Kind
}

// Status is a point-in-time copy of one upstream's state.
type Status struct {
	Address     string
	Source      string
	State       State
	Since       time.Time
	Reason      string
	LastProbe   time.Time
	LastProbeOK bool
	LastLatency time.Duration
	LastError   string
	Suspect     bool
	// ReadinessUnknown says why the upstream is routed to on liveness
	// alone ("readiness unknown: 401 Unauthorized"); "" when its
	// readiness is known.
	ReadinessUnknown string
	// ReadinessShared: the last probe's readiness came from the cluster's
	// shared verdict.
	ReadinessShared bool
	Active          int64
	Total           uint64
	Failures        uint64
}

// Options configure a Set. The zero value of each field has a documented
// default.
type Options struct {
	// Rise is the number of consecutive probe successes that bring a Down
	// upstream Up (default 2). Fall is the number of consecutive probe
	// failures that take an Up upstream Down (default 2). The first probe
	// result of an Unknown upstream decides at once.
	Rise, Fall int
	// Strategy picks among Up upstreams.
	Strategy Strategy
	// Now is the clock (default time.Now).
	Now func() time.Time
	// OnTransition, if set, is called after every state change, outside
	// the Set's lock, in the order the changes happened.
	OnTransition func(Transition)
	// OnAdd and OnRemove, if set, are called by Reconcile outside the lock.
	OnAdd, OnRemove func(*Upstream)
	// OnSuspect, if set, is called outside the lock when a passive failure
	// makes an upstream suspect; it should probe that upstream at once.
	OnSuspect func(*Upstream)
}

// Set is the endpoint set. Create it with NewSet.
type Set struct {
	mu   sync.RWMutex
	opts Options
	list []*Upstream // sorted by address
	rr   atomic.Uint64

	notifyMu sync.Mutex // serialises callbacks so they arrive in order
}

// NewSet returns an empty Set.
func NewSet(o Options) *Set {
	s := &Set{}
	s.opts = normalise(o)
	return s
}

func normalise(o Options) Options {
	if o.Rise <= 0 {
		o.Rise = 2
	}
	if o.Fall <= 0 {
		o.Fall = 2
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// SetThresholds changes rise, fall and strategy (configuration reload).
func (s *Set) SetThresholds(rise, fall int, strategy Strategy) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.opts
	o.Rise, o.Fall, o.Strategy = rise, fall, strategy
	s.opts = normalise(o)
}

// Reconcile makes the set hold exactly eps (duplicates by address are
// merged, the first source wins). Upstreams whose address stays keep their
// state and counters; new ones start Unknown. It returns the added and
// removed upstreams.
func (s *Set) Reconcile(eps []Endpoint) (added, removed []*Upstream) {
	s.notifyMu.Lock()
	defer s.notifyMu.Unlock()
	s.mu.Lock()
	now := s.opts.Now()
	old := make(map[string]*Upstream, len(s.list))
	for _, u := range s.list {
		old[u.addr] = u
	}
	seen := make(map[string]bool, len(eps))
	next := make([]*Upstream, 0, len(eps))
	for _, e := range eps {
		if seen[e.Address] {
			continue
		}
		seen[e.Address] = true
		if u, ok := old[e.Address]; ok {
			u.source = e.Source
			next = append(next, u)
			continue
		}
		u := &Upstream{addr: e.Address, source: e.Source, state: Unknown, since: now, reason: "new"}
		next = append(next, u)
		added = append(added, u)
	}
	for _, u := range s.list {
		if !seen[u.addr] {
			u.removed.Store(true)
			removed = append(removed, u)
		}
	}
	slices.SortFunc(next, func(a, b *Upstream) int {
		switch {
		case a.addr < b.addr:
			return -1
		case a.addr > b.addr:
			return 1
		}
		return 0
	})
	s.list = next
	onAdd, onRemove := s.opts.OnAdd, s.opts.OnRemove
	s.mu.Unlock()
	if onAdd != nil {
		for _, u := range added {
			onAdd(u)
		}
	}
	if onRemove != nil {
		for _, u := range removed {
			onRemove(u)
		}
	}
	return added, removed
}

// Upstreams returns the current upstreams, sorted by address.
func (s *Set) Upstreams() []*Upstream {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.list)
}

// Addresses returns the current addresses, sorted.
func (s *Set) Addresses() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]string, len(s.list))
	for i, u := range s.list {
		out[i] = u.addr
	}
	return out
}

// Lookup returns the upstream with address addr, or nil.
func (s *Set) Lookup(addr string) *Upstream {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, u := range s.list {
		if u.addr == addr {
			return u
		}
	}
	return nil
}

// Pick returns the upstream a new connection should use, or nil when every
// upstream is excluded, and reserves a place for the connection in its
// Active count, so that a burst of connects spreads before any of them is
// established; the caller gives the place back with Release when the
// connection fails or ends. Up upstreams come first (by strategy), suspect
// ones only when no other Up upstream is left; when none is Up, Unknown and
// then Down upstreams are returned, because a probe may be wrong and a dial
// is the truth. exclude may be nil.
func (s *Set) Pick(exclude func(*Upstream) bool) *Upstream {
	return s.pick(exclude, false)
}

// PickAnswering is Pick restricted to Up upstreams that answered their
// last probe and are not suspect: where a connection that waited in vain
// for a slow upstream may move. When none qualifies, every upstream is
// slow, and moving only starts the wait again.
func (s *Set) PickAnswering(exclude func(*Upstream) bool) *Upstream {
	return s.pick(func(u *Upstream) bool {
		return !s.answering(u) || (exclude != nil && exclude(u))
	}, true)
}

func (s *Set) pick(exclude func(*Upstream) bool, upOnly bool) *Upstream {
	s.mu.RLock()
	defer s.mu.RUnlock()
	u := s.choose(exclude, upOnly)
	if u != nil {
		u.active.Add(1)
	}
	return u
}

// choose implements Pick; s.mu must be held.
func (s *Set) choose(exclude func(*Upstream) bool, upOnly bool) *Upstream {
	n := len(s.list)
	if n == 0 {
		return nil
	}
	start := int(s.rr.Add(1) % uint64(n))
	for _, suspect := range []bool{false, true} {
		if suspect && upOnly {
			break
		}
		var best *Upstream
		var bestActive int64
		for i := range n {
			u := s.list[(start+i)%n]
			if u.state != Up || u.suspect != suspect || (exclude != nil && exclude(u)) {
				continue
			}
			if s.opts.Strategy == RoundRobin {
				return u
			}
			a := u.active.Load()
			if best == nil || a < bestActive {
				best, bestActive = u, a
			}
		}
		if best != nil {
			return best
		}
	}
	if upOnly {
		return nil
	}
	for _, want := range []State{Unknown, Down} {
		for i := range n {
			u := s.list[(start+i)%n]
			if u.state == want && (exclude == nil || !exclude(u)) {
				return u
			}
		}
	}
	return nil
}

// ProbeReport is one probe round as the set needs it.
type ProbeReport struct {
	// OK: alive and not explicitly unready.
	OK      bool
	Latency time.Duration // 0: the round made no I/O (the last latency stays)
	Err     error         // why not OK
	// Note says why readiness is unknown although the upstream answered
	// ("readiness unknown: 401 Unauthorized"); "" when it is known.
	Note string
	// Shared: readiness came from the cluster's shared verdict.
	Shared bool
}

// Report records an active probe result for addr; it is ignored if addr is
// not in the set. err is nil on success.
func (s *Set) Report(addr string, ok bool, latency time.Duration, err error) {
	s.ReportProbe(addr, ProbeReport{OK: ok, Latency: latency, Err: err})
}

// ReportProbe records a probe round for addr; it is ignored if addr is
// not in the set.
func (s *Set) ReportProbe(addr string, r ProbeReport) {
	ok, latency, err := r.OK, r.Latency, r.Err
	s.notifyMu.Lock()
	defer s.notifyMu.Unlock()
	s.mu.Lock()
	var u *Upstream
	for _, x := range s.list {
		if x.addr == addr {
			u = x
			break
		}
	}
	if u == nil {
		s.mu.Unlock()
		return
	}
	now := s.opts.Now()
	u.lastProbe, u.lastProbeOK = now, ok
	if latency > 0 {
		u.lastLatency = latency
	}
	u.note, u.shared = r.Note, r.Shared
	confirmed, passive := u.suspect, u.passiveReason
	u.suspect, u.passiveReason = false, ""
	var tr *Transition
	if ok {
		u.okStreak++
		u.failStreak = 0
		if u.state == Unknown || (u.state == Down && u.okStreak >= s.opts.Rise) {
			tr = s.transition(u, Up, CauseProbe, "probe succeeded", now)
		}
	} else {
		u.failures.Add(1)
		u.failStreak++
		u.okStreak = 0
		kind := failure.Classify(err)
		reason := "probe failed"
		if err != nil {
			reason = err.Error()
		}
		cause := CauseProbe
		if confirmed {
			cause = CauseConfirmed
			reason = passive + "; probe: " + reason
		}
		u.lastErr = reason
		switch {
		case u.state == Unknown:
			tr = s.transition(u, Down, cause, reason, now)
		case u.state != Up || u.failStreak < s.opts.Fall:
		case kind == failure.Timeout && !s.otherAnswering(u):
			// Every upstream is slow: overloaded, not dead. Keep it.
			u.lastErr = reason + " (kept up: no other upstream answers its probes in time)"
		default:
			tr = s.transition(u, Down, cause, reason, now)
		}
		if tr != nil {
			tr.Kind = kind
		}
	}
	cb := s.opts.OnTransition
	s.mu.Unlock()
	if tr != nil && cb != nil {
		cb(*tr)
	}
}

// answering reports whether x is Up, not suspect, and answered its last
// Rise probes: a single lucky answer from an apiserver that is as slow
// as the others does not make it somewhere better to go. s.mu must be
// held.
func (s *Set) answering(x *Upstream) bool {
	return x.state == Up && !x.suspect && x.lastProbeOK && x.okStreak >= s.opts.Rise
}

// otherAnswering reports whether an upstream other than u is answering;
// s.mu must be held.
func (s *Set) otherAnswering(u *Upstream) bool {
	for _, x := range s.list {
		if x != u && s.answering(x) {
			return true
		}
	}
	return false
}

// Passive records a failure the proxy saw on a client connection to u: a
// refused connect, or a reset, close or silence after the client's first
// bytes. It never changes u's state: it counts once towards Fall until the
// next probe, makes new connections prefer other upstreams, and calls
// OnSuspect so that a probe decides at once.
func (s *Set) Passive(u *Upstream, reason string) {
	s.notifyMu.Lock()
	defer s.notifyMu.Unlock()
	s.mu.Lock()
	u.failures.Add(1)
	u.lastErr = reason
	ask := false
	if !u.suspect && u.state != Down && !u.removed.Load() {
		u.suspect, u.passiveReason = true, reason
		u.failStreak++
		u.okStreak = 0
		ask = true
	}
	cb := s.opts.OnSuspect
	s.mu.Unlock()
	if ask && cb != nil {
		cb(u)
	}
}

// OtherAnswering reports whether an upstream other than u is up and
// answering its probes (see PickAnswering): whether the connections on u
// have somewhere better to go.
func (s *Set) OtherAnswering(u *Upstream) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.otherAnswering(u)
}

// transition changes u's state; s.mu must be held.
func (s *Set) transition(u *Upstream, to State, cause Cause, reason string, now time.Time) *Transition {
	tr := &Transition{Upstream: u, Source: u.source, From: u.state, To: to, Cause: cause, Reason: reason}
	u.state, u.since, u.reason = to, now, reason
	return tr
}

// SourceOf returns where u's address was learnt from (its last source if
// u has left the set).
func (s *Set) SourceOf(u *Upstream) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return u.source
}

// ProbeResult returns when u was last probed and whether that probe
// succeeded.
func (s *Set) ProbeResult(u *Upstream) (at time.Time, ok bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return u.lastProbe, u.lastProbeOK
}

// StateOf returns u's current state (Unknown once u left the set).
func (s *Set) StateOf(u *Upstream) State {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if u.removed.Load() {
		return Unknown
	}
	return u.state
}

// Counts returns the number of Up upstreams, of upstreams not yet probed,
// and of all upstreams.
func (s *Set) Counts() (up, unknown, total int) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, u := range s.list {
		switch u.state {
		case Up:
			up++
		case Unknown:
			unknown++
		}
	}
	return up, unknown, len(s.list)
}

// Snapshot returns the state of every upstream, sorted by address.
func (s *Set) Snapshot() []Status {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Status, len(s.list))
	for i, u := range s.list {
		out[i] = Status{
			Address: u.addr, Source: u.source, State: u.state, Since: u.since, Reason: u.reason,
			LastProbe: u.lastProbe, LastProbeOK: u.lastProbeOK, LastLatency: u.lastLatency,
			LastError: u.lastErr, Suspect: u.suspect, ReadinessUnknown: u.note, ReadinessShared: u.shared, Active: u.active.Load(), Total: u.total.Load(), Failures: u.failures.Load(),
		}
	}
	return out
}
