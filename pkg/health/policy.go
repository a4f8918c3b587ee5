// Package health decides what a change of an upstream's health means for
// the connections riding on it (close_on_down). The upstream set decides
// whether an upstream is up; the proxy closes connections when asked; this
// package decides whether, when and how fast.
//
// A balancer runs on every node of a cluster, so each decision here is
// made by thousands of nodes in the same seconds. The rules:
//
//   - Move connections only when there is somewhere better to go: while no
//     other upstream is up and answering its probes (every apiserver
//     unready or slow during an etcd outage, or all of them down), every
//     established connection is kept. When
//     another upstream comes up later, the down one's connections are
//     closed only if a probe after that still finds it failing, so a
//     cluster recovering from an outage cuts nothing.
//   - Close according to what the failure was. No answer in time (a hung
//     process, a frozen machine, a lost host): its connections can never
//     end by themselves, close them now. Refused connects: the process is
//     gone (the kernel has reset its connections) or it closed its
//     listener to shut down gracefully (its requests in flight should
//     finish): leave them, and close only what is still open after
//     RefusedGrace. Answers "not ready" (a terminating apiserver in its
//     shutdown delay), or removed from the cluster's endpoints: close after
//     UnreadyGrace unless it came back. Anything else (resets, TLS errors):
//     close now.
//   - Spread every close over Spread, each connection at its own random
//     moment, so that one node's watches do not reconnect in the same
//     millisecond and a fleet's reconnects are spread in time.
//
// A Policy owns one goroutine (Run) and one goroutine per upstream whose
// connections it is closing; Run stops and waits for all of them.
package health

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// Defaults for Options fields left zero.
const (
	DefaultUnreadyGrace = 5 * time.Second
	// DefaultRefusedGrace is kube-apiserver's default --request-timeout:
	// a gracefully stopping apiserver has finished every ordinary request
	// by then.
	DefaultRefusedGrace = 60 * time.Second
)

// Closer closes the connections riding on an upstream; proxy.Server is
// one. See proxy.Server.CloseUpstream for the contract.
type Closer interface {
	CloseUpstream(ctx context.Context, u *upstream.Upstream, spread time.Duration, still func() bool) (closed int, complete bool)
}

// Options configure a Policy.
type Options struct {
	// Set is the upstream set whose transitions are fed to the policy.
	Set *upstream.Set
	// Closer closes connections (required).
	Closer Closer
	// CloseOnDown enables closing connections of down upstreams at all.
	CloseOnDown bool
	// Spread is the window over which one upstream's connections are
	// closed (0: all at once).
	Spread time.Duration
	// UnreadyGrace is how long connections of an upstream that answers
	// "not ready", or that discovery removed, may go on (default 5s).
	UnreadyGrace time.Duration
	// RefusedGrace is how long connections of an upstream that refuses
	// connects may go on (default 60s).
	RefusedGrace time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger logs decisions.
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.UnreadyGrace <= 0 {
		o.UnreadyGrace = DefaultUnreadyGrace
	}
	if o.RefusedGrace <= 0 {
		o.RefusedGrace = DefaultRefusedGrace
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// pending is an upstream whose connections may have to be closed.
type pending struct {
	// after: not before this moment (the grace of its failure kind).
	after time.Time
	why   string
	// removed: discovery removed it (close even if a probe never runs).
	removed bool
	// betterSince: when another upstream was first seen up while this
	// one was down, if there was none at the transition; a probe failure
	// after it is needed before closing. Zero if there was one at once.
	betterSince time.Time
	waitBetter  bool
	// closing: a closer goroutine is working on it.
	closing bool
}

// Policy applies close_on_down. Create it with New; feed it with
// Transition and Removed; run it with Run.
type Policy struct {
	mu      sync.Mutex
	opts    Options
	pending map[*upstream.Upstream]*pending
	kick    chan struct{}
}

// New returns a Policy; nothing runs until Run.
func New(o Options) *Policy {
	return &Policy{opts: o.withDefaults(), pending: map[*upstream.Upstream]*pending{}, kick: make(chan struct{}, 1)}
}

// SetOptions replaces the options (configuration reload); the Set and the
// Closer stay.
func (p *Policy) SetOptions(o Options) {
	p.mu.Lock()
	o.Set, o.Closer = p.opts.Set, p.opts.Closer
	p.opts = o.withDefaults()
	if !p.opts.CloseOnDown {
		clear(p.pending)
	}
	p.mu.Unlock()
	p.wake()
}

// Transition takes an upstream state change; call it from the set's
// OnTransition. Every transition is a reason to look again, since one
// upstream coming up gives the others' connections somewhere to go.
func (p *Policy) Transition(t upstream.Transition) {
	if t.To == upstream.Down {
		p.mu.Lock()
		if p.opts.CloseOnDown {
			grace, why := time.Duration(0), "no answer"
			switch t.Kind {
			case failure.Refused:
				grace, why = p.opts.RefusedGrace, "refuses connects"
			case failure.Unready:
				grace, why = p.opts.UnreadyGrace, "answers not ready"
			case failure.Other:
				why = "failed"
			}
			pd := &pending{after: p.opts.Now().Add(grace), why: why}
			if !p.opts.Set.OtherAnswering(t.Upstream) {
				pd.waitBetter = true
			}
			if old := p.pending[t.Upstream]; old != nil && old.closing {
				pd.closing = true
			}
			p.pending[t.Upstream] = pd
		}
		p.mu.Unlock()
	}
	p.wake()
}

// Removed takes an upstream that discovery removed from the set while it
// still carried connections: they go after UnreadyGrace, spread.
func (p *Policy) Removed(u *upstream.Upstream) {
	p.mu.Lock()
	if p.opts.CloseOnDown {
		p.pending[u] = &pending{after: p.opts.Now().Add(p.opts.UnreadyGrace), why: "removed", removed: true}
	}
	p.mu.Unlock()
	p.wake()
}

func (p *Policy) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Run applies the policy until ctx is done, then stops the closers and
// waits for them. It returns nil.
func (p *Policy) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := p.evaluate(ctx, &wg)
		timer.Reset(next)
		select {
		case <-ctx.Done():
			return nil
		case <-p.kick:
		case <-timer.C:
		}
	}
}

// evaluate starts closers for the pending upstreams whose time has come,
// and returns how long until the next one might be due.
func (p *Policy) evaluate(ctx context.Context, wg *sync.WaitGroup) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	o := p.opts
	now := o.Now()
	next := time.Hour
	if o.CloseOnDown {
		// Connections that reached a down upstream while nothing was up
		// (a dial is the truth then) leave it once a probe after another
		// upstream's recovery still finds it failing.
		for _, u := range o.Set.Upstreams() {
			if p.pending[u] == nil && u.Active() > 0 && o.Set.StateOf(u) == upstream.Down {
				p.pending[u] = &pending{after: now, why: "down", waitBetter: true}
			}
		}
	}
	for u, pd := range p.pending {
		if !p.stillDown(u, pd) {
			delete(p.pending, u)
			continue
		}
		if pd.closing {
			continue
		}
		if wait := pd.after.Sub(now); wait > 0 {
			next = min(next, wait)
			continue
		}
		if !o.Set.OtherAnswering(u) {
			// Nowhere better: keep everything. Another upstream may start
			// answering without a transition (an up one answering its
			// probes again), so look again in a second.
			next = min(next, time.Second)
			continue
		}
		if pd.waitBetter {
			// All were down when this one went down. Close only if a probe
			// after the others' recovery still finds it failing.
			if pd.betterSince.IsZero() {
				pd.betterSince = now
			}
			at, ok := o.Set.ProbeResult(u)
			if ok || !at.After(pd.betterSince) {
				next = min(next, time.Second) // look again after its next probe
				continue
			}
		}
		pd.closing = true
		o.Logger.Info("closing connections of a down upstream", "upstream", u.Addr(), "why", pd.why,
			"connections", u.Active(), "spread", o.Spread)
		wg.Add(1)
		go p.close(ctx, wg, u, pd, o)
	}
	return next
}

// stillDown reports whether u's connections still have reason to close;
// p.mu must be held.
func (p *Policy) stillDown(u *upstream.Upstream, pd *pending) bool {
	if pd.removed {
		return u.Removed()
	}
	return !u.Removed() && p.opts.Set.StateOf(u) == upstream.Down
}

func (p *Policy) close(ctx context.Context, wg *sync.WaitGroup, u *upstream.Upstream, pd *pending, o Options) {
	defer wg.Done()
	still := func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.opts.CloseOnDown && p.stillDown(u, pd) && o.Set.OtherAnswering(u)
	}
	_, complete := o.Closer.CloseUpstream(ctx, u, o.Spread, still)
	p.mu.Lock()
	if p.pending[u] == pd {
		if complete {
			delete(p.pending, u)
		} else {
			pd.closing = false // stopped early: look again at the next transition
		}
	} else if cur := p.pending[u]; cur != nil {
		cur.closing = false
	}
	p.mu.Unlock()
	p.wake()
}
