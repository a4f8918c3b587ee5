package fleet

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// TestFleet runs N nodes with K client streams each against three
// apiservers and measures what they cost, how fast discovery converges when
// an apiserver is added or removed, and the reconnect wave when one hangs
// (SIGSTOP, with close_spread 0 and 5 s) or dies (SIGKILL).
func TestFleet(t *testing.T) {
	p := loadParams(t)
	as := []*apiserver{
		env.startAPIServer(t, apiserverIPs[0], streamAudit),
		env.startAPIServer(t, apiserverIPs[1], streamAudit),
		env.startAPIServer(t, apiserverIPs[2], streamAudit),
	}
	env.WaitReady(t, as...)
	env.applyRBAC(t, as[0].Addr())
	eps := []string{as[0].Addr(), as[1].Addr(), as[2].Addr()}
	// Readiness is observed once for the cluster: a publisher (the chart's
	// readiness-publisher, with its restricted RBAC) checks each
	// apiserver's /readyz and shares the answers; the nodes check only
	// liveness.
	env.MustKubectl(t, as[0].Addr(), readinessRBAC, "apply", "-f", "-")
	startFleetPublisher(t, as[0])
	settle(t, as[0].P.Cmd.Process.Pid, 90*time.Second)

	// Cost of the fleet at rest: probes and one discovery watch per node,
	// then the client streams.
	idle := measureGroup(t, as)
	f := startFleet(t, p.Nodes, eps, "0s")
	f.waitAll(t, "every node on the shared readiness verdicts", 2*time.Minute, func(d status.Document) bool {
		for _, e := range eps {
			if u, ok := upstream(d, e); !ok || !u.ReadinessShared {
				return false
			}
		}
		return true
	})
	withNodes := measureGroup(t, as)
	f.startStreams(t, p.Streams)
	pairs := float64(p.Nodes * len(as))
	idleRate, withStreams := probeRate(t, f, as, pairs)
	// Events flowing on the streams: real traffic from each upstream lets
	// the nodes skip most liveness PINGs (never a readiness check: the
	// shared verdicts answer that).
	startTicker(t, as[1], 500*time.Millisecond)
	busyRate, busy := probeRate(t, f, as, pairs)
	var b strings.Builder
	fmt.Fprintf(&b, "fleet at rest: %d nodes, %d streams each, 3 apiservers (figures per apiserver, averaged)\n", p.Nodes, p.Streams)
	b.WriteString("| State | Apiserver cores | Apiserver RSS MiB | Per node: millicores | Per node: KiB RSS | Per stream: KiB RSS |\n|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| idle | %.3f | %.0f | | | |\n", idle.cores, idle.rss/(1<<20))
	fmt.Fprintf(&b, "| + nodes (probes, one discovery watch each) | %.3f | %.0f | %.2f | %.0f | |\n", withNodes.cores, withNodes.rss/(1<<20),
		(withNodes.cores-idle.cores)/float64(p.Nodes)*1000, (withNodes.rss-idle.rss)/float64(p.Nodes)/1024)
	fmt.Fprintf(&b, "| + client streams | %.3f | %.0f | | | %.1f |\n", withStreams.cores, withStreams.rss/(1<<20),
		(withStreams.rss-withNodes.rss)/float64(p.Nodes*p.Streams/3)/1024)
	fmt.Fprintf(&b, "| + an event on every stream each 0.5 s | %.3f | %.0f | | | |\n", busy.cores, busy.rss/(1<<20))
	fmt.Fprintf(&b, "\nliveness PINGs per node per apiserver per second (readiness from the shared verdicts): %.3f with idle streams, %.3f while every stream receives events (%.0f %% skipped)\n",
		idleRate, busyRate, 100*(1-busyRate/idleRate))
	idleCores, busyCores := probeCores(idleRate), probeCores(busyRate)
	fmt.Fprintf(&b, "probe cores per apiserver at %d nodes (PINGs x %.3f ms + %.2f for the shared readiness): %.3f idle, %.3f with traffic\n",
		fleetScale, pingCostMs, sharedCostCores, idleCores, busyCores)
	env.Record("%s", b.String())
	setResult(&fleetResult.idle, idleCores)
	setResult(&fleetResult.traffic, busyCores)
	if idleCores > 0.5 || busyCores > 0.3 {
		t.Errorf("probe cores per apiserver at %d nodes: %.3f idle (want at most 0.5), %.3f with traffic (want at most 0.3)", fleetScale, idleCores, busyCores)
	}
	if busyRate > idleRate*0.6 {
		t.Errorf("nodes sent %.3f PINGs per upstream per second with traffic flowing, %.3f without: traffic should replace most of them", busyRate, idleRate)
	}

	t.Run("discovery", func(t *testing.T) { discoveryConvergence(t, f) })

	var waves []waveResult
	waves = append(waves, reconnectWave(t, f, as, syscall.SIGSTOP, "SIGSTOP, close_spread 0"))
	f.stop(t)
	f = startFleet(t, p.Nodes, eps, "5s")
	f.startStreams(t, p.Streams)
	waves = append(waves, reconnectWave(t, f, as, syscall.SIGSTOP, "SIGSTOP, close_spread 5s (default)"))
	f.stop(t)
	f = startFleet(t, p.Nodes, eps, "5s")
	f.startStreams(t, p.Streams)
	waves = append(waves, reconnectWave(t, f, as, syscall.SIGKILL, "SIGKILL (kernel resets the connections)"))

	b.Reset()
	fmt.Fprintf(&b, "reconnect wave: %d nodes x %d streams, first apiserver stopped or killed; new watches per 100 ms at the two survivors (audit log)\n", p.Nodes, p.Streams)
	b.WriteString("| Event | Streams moved | Arrivals (per survivor) | First after signal | Spread (first to last) | Peak / 100 ms (both; per survivor) | Mean / 100 ms over the spread | Peak / mean | Peak / 1 s |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, w := range waves {
		fmt.Fprintf(&b, "| %s | %d | %d (%d, %d) | %.1f s | %.1f s | %d; %d, %d | %.2f | %.1f | %d |\n", w.name, w.moved, w.total, w.per[0], w.per[1],
			w.first.Seconds(), w.spread().Seconds(), w.peak, w.peakPer[0], w.peakPer[1], w.mean(), float64(w.peak)/w.mean(), w.peakSecond)
	}
	env.Record("%s", b.String())
	for _, w := range waves[:2] {
		if int64(w.total) < w.moved-int64(p.Nodes) || w.total == 0 {
			t.Errorf("%s: %d watches arrived at the survivors, %d streams were on the stopped apiserver", w.name, w.total, w.moved)
		}
	}
	if s := waves[1].spread(); s < 2*time.Second {
		t.Errorf("with close_spread 5s the reconnects landed within %s; want them spread over seconds", s)
	}
}

// probeRate measures the apiservers and returns the probes per second each
// node sent each apiserver meanwhile.
func probeRate(t *testing.T, f *fleet, as []*apiserver, pairs float64) (float64, groupUse) {
	t.Helper()
	c0, err := f.probeCount()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	g := measureGroup(t, as)
	c1, err := f.probeCount()
	if err != nil {
		t.Fatal(err)
	}
	return (c1 - c0) / time.Since(start).Seconds() / pairs, g
}

// groupUse is the apiservers' CPU and memory, averaged per apiserver.
type groupUse struct{ cores, rss float64 }

// measureGroup measures the apiservers over a 10 s window.
func measureGroup(t *testing.T, as []*apiserver) groupUse {
	t.Helper()
	pids := make([]int, len(as))
	for i, a := range as {
		pids[i] = a.P.Cmd.Process.Pid
	}
	m, err := startCPU(pids...)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Second) // a measurement window, not synchronisation
	used, wall, err := m.stop()
	if err != nil {
		t.Fatal(err)
	}
	var g groupUse
	for i, pid := range pids {
		r, err := rssBytes(pid)
		if err != nil {
			t.Fatal(err)
		}
		g.cores += used[i] / wall.Seconds() / float64(len(as))
		g.rss += float64(r) / float64(len(as))
	}
	return g
}

// discoveryConvergence adds a fourth apiserver and removes it again, and
// measures when each node routes accordingly.
func discoveryConvergence(t *testing.T, f *fleet) {
	sp := env.PollSlice(t, apiserverIPs[:3])
	d := env.startAPIServer(t, apiserverIPs[3], "")
	addr := d.Addr()
	started := time.Now()
	listed := sp.WaitFor(t, "listing "+addr, started, 3*time.Minute, func(a []string) bool { return slices.Contains(a, addr) })
	up := f.waitAll(t, addr+" up", 3*time.Minute, func(doc status.Document) bool {
		u, ok := upstream(doc, addr)
		return ok && u.State == "up"
	})
	ready := env.WaitReady(t, d)
	d.P.Signal(syscall.SIGTERM)
	term := time.Now()
	notUp := f.waitAll(t, addr+" no longer up", 3*time.Minute, func(doc status.Document) bool {
		u, ok := upstream(doc, addr)
		return !ok || u.State != "up"
	})
	gone := f.waitAll(t, addr+" removed", 3*time.Minute, func(doc status.Document) bool {
		_, ok := upstream(doc, addr)
		return !ok
	})
	unlisted := sp.WaitFor(t, "no longer listing "+addr, term, time.Minute, func(a []string) bool { return !slices.Contains(a, addr) })
	if err := d.P.Wait(2 * time.Minute); err != nil {
		t.Logf("%s: %v", d.P.Name, err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "discovery convergence, %d nodes (apiserver ready %.1f s after it was listed)\n", len(f.nodes), ready.Sub(listed).Seconds())
	b.WriteString("| Change | Measured from | p50 | p100 |\n|---|---|---|---|\n")
	row := func(what, from string, ref time.Time, at []time.Time) {
		p50, p100 := percentiles(ref, at)
		fmt.Fprintf(&b, "| %s | %s | %.2f s | %.2f s |\n", what, from, p50.Seconds(), p100.Seconds())
	}
	row("added: up on the node", "the EndpointSlice listing it", listed, up)
	row("removed (SIGTERM): no longer up on the node", "SIGTERM", term, notUp)
	row("removed (SIGTERM): dropped from the node's upstreams", "the EndpointSlice no longer listing it", unlisted, gone)
	env.Record("%s", b.String())
}

// percentiles returns the median and the maximum of at minus ref.
func percentiles(ref time.Time, at []time.Time) (p50, p100 time.Duration) {
	ds := make([]time.Duration, len(at))
	for i, a := range at {
		ds[i] = max(a.Sub(ref), 0)
	}
	slices.Sort(ds)
	return ds[(len(ds)-1)/2], ds[len(ds)-1]
}

// waveResult is the reconnects one event caused at the survivors.
type waveResult struct {
	name        string
	moved       int64 // client connections the nodes had on the victim
	total       int
	first, last time.Duration // arrivals after the signal
	peak        int           // most arrivals in one 100 ms bucket, both survivors
	peakPer     [2]int
	per         [2]int // arrivals per survivor
	peakSecond  int
}

func (w waveResult) spread() time.Duration { return w.last - w.first }

// mean is the arrivals per 100 ms over the spread window.
func (w waveResult) mean() float64 {
	buckets := math.Max(1, math.Ceil(w.spread().Seconds()*10))
	return float64(w.total) / buckets
}

// reconnectWave signals the first apiserver and counts the watches that
// arrive at the other two until every stream runs again.
func reconnectWave(t *testing.T, f *fleet, as []*apiserver, sig syscall.Signal, name string) waveResult {
	t.Helper()
	victim := as[0]
	moved, err := f.activeOn(victim.Addr())
	if err != nil {
		t.Fatal(err)
	}
	want := int64(len(f.nodes)) * int64(len(f.streams.transport)/len(f.nodes))
	t0 := time.Now()
	victim.P.Signal(sig)
	if sig == syscall.SIGSTOP {
		// The hung bound: how long until every node avoids the stopped
		// apiserver.
		at := f.waitAll(t, victim.Addr()+" down on every node", 3*time.Minute, func(doc status.Document) bool {
			u, ok := upstream(doc, victim.Addr())
			return ok && u.State == "down"
		})
		out := slices.MaxFunc(at, func(a, b time.Time) int { return a.Compare(b) }).Sub(t0)
		t.Logf("%s: every node marked %s down %.2f s after the stop", name, victim.Addr(), out.Seconds())
		fleetResult.mu.Lock()
		worst := fleetResult.hungOut == nil || out.Seconds() > *fleetResult.hungOut
		fleetResult.mu.Unlock()
		if worst {
			setResult(&fleetResult.hungOut, out.Seconds())
		}
		if out > 8800*time.Millisecond+3*time.Second {
			t.Errorf("%s: the stopped apiserver was avoided by every node only %s after the stop; want within 8.8 s (+3 s slack)", name, out)
		}
	}
	deadline := t0.Add(3 * time.Minute)
	for {
		on, err := f.activeOn(victim.Addr())
		if err == nil && on == 0 && f.streams.open.Load() == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d connections still on %s and %d of %d streams running after 3 minutes (error %v)",
				name, on, victim.Addr(), f.streams.open.Load(), want, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	w := waveResult{name: name, moved: moved, first: time.Duration(math.MaxInt64)}
	all := map[int]int{}
	secs := map[int]int{}
	for i, s := range as[1:] {
		arr, err := auditArrivals(s.AuditLog, t0)
		if err != nil {
			t.Fatal(err)
		}
		per := map[int]int{}
		for _, a := range arr {
			d := a.Sub(t0)
			w.first, w.last = min(w.first, d), max(w.last, d)
			per[int(d/(100*time.Millisecond))]++
			all[int(d/(100*time.Millisecond))]++
			secs[int(d/time.Second)]++
			w.total++
			w.per[i]++
		}
		for _, c := range per {
			w.peakPer[i] = max(w.peakPer[i], c)
		}
	}
	for _, c := range all {
		w.peak = max(w.peak, c)
	}
	for _, c := range secs {
		w.peakSecond = max(w.peakSecond, c)
	}
	if w.total == 0 {
		w.first = 0
	}
	t.Logf("%s: %d streams on the victim, %d arrivals, first %s, last %s, peak %d/100ms", name, moved, w.total, w.first, w.last, w.peak)

	// Bring the victim back for the next event.
	switch sig {
	case syscall.SIGSTOP:
		victim.P.Signal(syscall.SIGCONT)
		f.waitAll(t, victim.Addr()+" up again", 3*time.Minute, func(doc status.Document) bool {
			u, ok := upstream(doc, victim.Addr())
			return ok && u.State == "up"
		})
	case syscall.SIGKILL:
		_ = victim.P.Wait(time.Minute)
	}
	return w
}

// auditArrivals returns when the fleet's watches reached the apiserver at
// or after since, from its audit log.
func auditArrivals(path string, since time.Time) ([]time.Time, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	defer func() { _ = fh.Close() }()
	var out []time.Time
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var ev struct {
			Stage     string    `json:"stage"`
			UserAgent string    `json:"userAgent"`
			Received  time.Time `json:"requestReceivedTimestamp"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("audit log %s: %w", path, err)
		}
		if ev.Stage == "ResponseStarted" && ev.UserAgent == "fleet-stream" && !ev.Received.Before(since) {
			out = append(out, ev.Received)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("audit log %s: %w", path, err)
	}
	return out, nil
}

// startFleetPublisher runs `extractedprism readiness-publisher` against
// apiserver a with the publisher's restricted credentials; it finds the
// apiservers in the kubernetes EndpointSlice.
func startFleetPublisher(t *testing.T, a *apiserver) {
	t.Helper()
	kc, err := env.TokenKubeconfig("readiness-publisher", "https://"+a.Addr(), env.pubToken)
	if err != nil {
		t.Fatal(err)
	}
	p, err := env.Start("publisher", env.daemon, "readiness-publisher", "--kubeconfig="+kc,
		"--namespace="+readinessNS, "--identity=fleet-publisher", "--admin-address=")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.Running() {
			p.Kill()
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", p.Name, p.Tail(15))
		}
	})
}
