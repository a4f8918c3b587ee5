package fleet

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestColdStart starts every node at once, as after a power event, and
// counts the probes and discovery requests that reach each apiserver in the
// first 10 s and in the 10 s after, from the apiservers' audit logs.
func TestColdStart(t *testing.T) {
	p := loadParams(t)
	as := []*apiserver{
		env.startAPIServer(t, apiserverIPs[0], startupAudit),
		env.startAPIServer(t, apiserverIPs[1], startupAudit),
		env.startAPIServer(t, apiserverIPs[2], startupAudit),
	}
	env.WaitReady(t, as...)
	env.applyRBAC(t, as[0].Addr())
	eps := []string{as[0].Addr(), as[1].Addr(), as[2].Addr()}
	settle(t, as[0].P.Cmd.Process.Pid, 90*time.Second)

	t0 := time.Now()
	f := startFleet(t, p.Nodes, eps, "5s")
	allUp := time.Since(t0)
	end := t0.Add(20 * time.Second)
	for time.Now().Before(end) {
		for _, n := range f.nodes {
			if !n.p.Running() {
				t.Fatalf("node %s exited: %v\n%s", n.ip, n.p.Err, n.p.Tail(20))
			}
		}
		time.Sleep(500 * time.Millisecond) // the observation window
	}

	var b strings.Builder
	fmt.Fprintf(&b, "cold start: %d nodes started within %.2f s, every node had every apiserver up %.2f s after the first start\n",
		p.Nodes, f.spawned.Seconds(), allUp.Seconds())
	b.WriteString("| Apiserver | Probes, first 10 s | Peak probes / 100 ms (at) | Peak probes / 1 s, first 10 s | Probes / s, 10-20 s | Discovery lists + watches, first 10 s |\n|---|---|---|---|---|---|\n")
	for _, a := range as {
		evs, err := startupEvents(a.AuditLog, t0)
		if err != nil {
			t.Fatal(err)
		}
		var probes10, probes20, disc int
		per100, perSec := map[int]int{}, map[int]int{}
		for _, e := range evs {
			d := e.at.Sub(t0)
			switch {
			case d >= 20*time.Second:
			case e.probe && d < 10*time.Second:
				probes10++
				per100[int(d/(100*time.Millisecond))]++
				perSec[int(d/time.Second)]++
			case e.probe:
				probes20++
			case d < 10*time.Second:
				disc++
			}
		}
		peak, at := 0, 0
		for k, v := range per100 {
			if v > peak || (v == peak && k < at) {
				peak, at = v, k
			}
		}
		peakSec := 0
		for _, v := range perSec {
			peakSec = max(peakSec, v)
		}
		fmt.Fprintf(&b, "| %s | %d | %d (%.1f s) | %d | %.1f | %d |\n", a.IP, probes10, peak, float64(at)/10, peakSec, float64(probes20)/10, disc)
		if probes10 < p.Nodes {
			t.Errorf("%s: %d probes in the first 10 s from %d nodes", a.IP, probes10, p.Nodes)
		}
	}
	env.Record("%s", b.String())
}

// startupEvent is one probe or discovery request an apiserver received.
type startupEvent struct {
	at    time.Time
	probe bool
}

// startupEvents reads the apiserver's audit log (startupAudit) for requests
// received at or after since, one per request.
func startupEvents(path string, since time.Time) ([]startupEvent, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	defer func() { _ = fh.Close() }()
	seen := map[string]bool{}
	var out []startupEvent
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var ev struct {
			AuditID    string    `json:"auditID"`
			RequestURI string    `json:"requestURI"`
			Received   time.Time `json:"requestReceivedTimestamp"`
			User       struct {
				Username string `json:"username"`
			} `json:"user"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("audit log %s: %w", path, err)
		}
		probe := strings.HasPrefix(ev.RequestURI, "/readyz")
		if seen[ev.AuditID] || ev.Received.Before(since) || (!probe && ev.User.Username != discoveryUser) {
			continue // (the apiservers' own EndpointSlice updates are not discovery)
		}
		seen[ev.AuditID] = true
		out = append(out, startupEvent{at: ev.Received, probe: probe})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("audit log %s: %w", path, err)
	}
	return out, nil
}
