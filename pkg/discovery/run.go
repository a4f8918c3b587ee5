package discovery

import (
	"context"
	"slices"
	"sync"
	"time"
)

// msgKind classifies what the watch goroutine tells Run's loop.
type msgKind int

const (
	// msgSnapshot carries the endpoints of all watched slices.
	msgSnapshot msgKind = iota
	// msgError reports a failed list or watch.
	msgError
	// msgRestart reports that the watch was opened again.
	msgRestart
)

// watchMsg is one message from the watch goroutine to Run's loop.
type watchMsg struct {
	kind msgKind
	// endpoints is the full discovered list (msgSnapshot).
	endpoints []string
	// listed is true for the snapshot that follows a successful list.
	listed bool
	err    error
}

// runState is the state owned by Run's goroutine.
type runState struct {
	// stateFile is the last-known-good list loaded at start; cleared once
	// discovery answers with a non-empty list.
	stateFile []string
	// discovered is the last non-empty list the API answered.
	discovered []string
	// written is the list last written to (or read from) the state file.
	written []string
	// healthy is true while the watch is synced and its last answer was
	// non-empty.
	healthy bool
	// lostSince is when healthy last became false.
	lostSince time.Time
	// staticDropped is true while bootstrap-only mode leaves static out.
	staticDropped bool
	// synced is true between a successful list and the next error.
	synced bool
	// nonEmpty is true when the last applied answer was non-empty.
	nonEmpty bool
	// emitted is the list last passed to OnUpdate (nil before the first).
	emitted []Endpoint

	// pending is a snapshot waiting for the debounce timer.
	pending    []string
	hasPending bool
	// pendingSince is when the first snapshot of the current burst arrived.
	pendingSince time.Time
}

// Run emits the static and last-known-good endpoints at once, then follows
// the EndpointSlices of the service until ctx is done. It retries a failed
// list or watch forever with capped, jittered backoff, and returns nil when
// ctx is done.
func (m *Manager) Run(ctx context.Context) error {
	st := &runState{lostSince: m.now()}
	if m.opts.Enabled && m.opts.StateFile != "" {
		eps, err := loadStateFile(m.opts.StateFile)
		if err == nil {
			eps = m.screen.screen(eps, "state file")
		}
		switch {
		case err != nil:
			m.log.Warn("ignoring unreadable state file", "path", m.opts.StateFile, "error", err)
		case len(eps) > 0:
			m.log.Info("loaded last-known-good endpoints", "path", m.opts.StateFile, "endpoints", eps)
			st.stateFile = eps
			st.written = eps
		}
	}
	m.emit(st, true)

	if !m.opts.Enabled {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-m.staticCh:
				m.emit(st, true)
			}
		}
	}

	msgs := make(chan watchMsg)
	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.watchLoop(wctx, msgs)
	}()
	defer func() {
		cancel()
		wg.Wait()
	}()

	tick := time.NewTicker(m.checkEvery)
	defer tick.Stop()
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-m.staticCh:
			m.evaluate(st)
			m.emit(st, true)
			continue
		case msg := <-msgs:
			m.handle(st, msg, debounce)
		case <-debounce.C:
			if st.hasPending {
				m.apply(st, st.pending)
			}
		case <-tick.C:
		}
		m.evaluate(st)
		m.emit(st, false)
	}
}

// handle processes one message of the watch goroutine.
func (m *Manager) handle(st *runState, msg watchMsg, debounce *time.Timer) {
	switch msg.kind {
	case msgError:
		st.synced = false
		m.setStatus(func(s *Status) {
			s.State = StateError
			s.LastError = msg.err.Error()
		})
		m.event(Event{Kind: EventError, Err: msg.err})
	case msgRestart:
		m.event(Event{Kind: EventWatchRestart})
	case msgSnapshot:
		now := m.now()
		first := !st.synced && !st.nonEmpty && st.discovered == nil
		st.synced = true
		m.setStatus(func(s *Status) {
			s.State = StateSynced
			s.LastSync = now
		})
		// The first answer is applied at once; later ones are debounced,
		// but a burst never delays a change by more than four quiet periods.
		if first || m.opts.Debounce <= 0 {
			debounce.Stop()
			m.apply(st, msg.endpoints)
			return
		}
		if !st.hasPending {
			st.pendingSince = time.Now()
		}
		st.pending, st.hasPending = msg.endpoints, true
		wait := m.opts.Debounce
		if left := 4*m.opts.Debounce - time.Since(st.pendingSince); left < wait {
			wait = max(left, 0)
		}
		debounce.Reset(wait)
	}
}

// apply takes a discovered list into the set.
func (m *Manager) apply(st *runState, eps []string) {
	st.pending, st.hasPending = nil, false
	st.nonEmpty = len(eps) > 0
	m.event(Event{Kind: EventSync, Count: len(eps)})
	if len(eps) == 0 {
		if st.discovered != nil || st.stateFile != nil {
			m.log.Warn("discovery found no ready API server endpoints; keeping the known ones",
				"namespace", m.opts.Namespace, "service", m.opts.Service)
		}
		return
	}
	if !slices.Equal(eps, st.discovered) {
		added, removed := diff(st.discovered, eps)
		m.log.Info("discovered API server endpoints", "endpoints", eps, "added", added, "removed", removed)
	}
	st.discovered = slices.Clone(eps)
	st.stateFile = nil
	m.setStatus(func(s *Status) { s.Discovered = slices.Clone(eps) })
	if m.opts.StateFile != "" && !slices.Equal(eps, st.written) {
		if err := saveStateFile(m.opts.StateFile, eps, m.now()); err != nil {
			m.log.Warn("cannot write state file", "path", m.opts.StateFile, "error", err)
			m.event(Event{Kind: EventError, Err: err})
		} else {
			st.written = slices.Clone(eps)
		}
	}
}

// evaluate updates health and the bootstrap-only static state.
func (m *Manager) evaluate(st *runState) {
	healthy := st.synced && st.nonEmpty
	now := m.now()
	if healthy != st.healthy {
		st.healthy = healthy
		if !healthy {
			st.lostSince = now
		}
	}
	if m.opts.StaticMode != StaticBootstrapOnly {
		st.staticDropped = false
		return
	}
	switch {
	case !st.staticDropped && st.healthy && len(st.discovered) > 0:
		st.staticDropped = true
		m.log.Info("discovery found API servers; dropping bootstrap-only static endpoints")
	case st.staticDropped && !st.healthy && now.Sub(st.lostSince) >= m.opts.StaticRestoreAfter:
		st.staticDropped = false
		m.log.Warn("discovery lost; restoring static endpoints",
			"lost_for", now.Sub(st.lostSince).Round(time.Second).String())
	}
}

// emit passes the merged list to OnUpdate if it changed (or if force).
func (m *Manager) emit(st *runState, force bool) {
	list := m.merge(st)
	if !force && st.emitted != nil && slices.Equal(list, st.emitted) {
		return
	}
	st.emitted = list
	if m.opts.OnUpdate != nil {
		m.opts.OnUpdate(slices.Clone(list))
	}
}

// merge builds the sorted, de-duplicated endpoint list. An address known
// from several sources is reported with the first of static, discovered,
// state-file.
func (m *Manager) merge(st *runState) []Endpoint {
	seen := map[string]Source{}
	add := func(addrs []string, src Source) {
		for _, a := range addrs {
			if _, ok := seen[a]; !ok {
				seen[a] = src
			}
		}
	}
	if !st.staticDropped || len(st.discovered) == 0 {
		add(m.staticList(), SourceStatic)
	}
	add(st.discovered, SourceDiscovered)
	add(st.stateFile, SourceStateFile)
	out := make([]Endpoint, 0, len(seen))
	for a, src := range seen {
		out = append(out, Endpoint{Address: a, Source: src})
	}
	slices.SortFunc(out, func(a, b Endpoint) int {
		switch {
		case a.Address < b.Address:
			return -1
		case a.Address > b.Address:
			return 1
		}
		return 0
	})
	return out
}

// diff returns the entries of b missing from a, and of a missing from b.
func diff(a, b []string) (added, removed []string) {
	for _, x := range b {
		if !slices.Contains(a, x) {
			added = append(added, x)
		}
	}
	for _, x := range a {
		if !slices.Contains(b, x) {
			removed = append(removed, x)
		}
	}
	return added, removed
}
