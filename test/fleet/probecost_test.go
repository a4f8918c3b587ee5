package fleet

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/probe"
	"golang.org/x/net/http2"
)

// probeStyle is one way of health-checking an apiserver, as some project
// does it by default.
type probeStyle struct {
	name     string
	who      string
	interval time.Duration // the project's default interval
	// run drives probes of addr at rate per second until ctx is done,
	// counting answered and failed probes.
	run func(ctx context.Context, addr string, rate int, ok, failed *atomic.Int64)
}

// probeStyles are the styles measured, each at the same rate.
func probeStyles() []probeStyle {
	return []probeStyle{
		{"kept-alive HTTPS GET /readyz", "extractedprism", 2 * time.Second, runProber(probe.HTTPS)},
		{"TCP connect and close", "seed system, Talos", 20 * time.Second, runProber(probe.TCP)},
		{"new TLS handshake + GET /healthz", "haproxy check-ssl (kubespray)", 15 * time.Second, runHandshakes(false)},
		{"resumed TLS session + GET /healthz", "haproxy check-ssl with session reuse", 15 * time.Second, runHandshakes(true)},
		{"kept-alive HTTP/2 PING (liveness only)", "no project", 2 * time.Second, runH2PING},
	}
}

// proberInterval is the interval of each simulated prober; the rate is
// reached with rate×proberInterval probers.
const proberInterval = time.Second

// counter is a probe.Reporter that counts results.
type counter struct{ ok, failed *atomic.Int64 }

func (c counter) Report(_ string, r probe.Result) {
	if r.OK() {
		c.ok.Add(1)
	} else {
		c.failed.Add(1)
	}
}

// runProber drives pkg/probe itself (the code every node runs): one
// Prober per simulated node, each with its own kept-alive connection in
// HTTPS mode.
func runProber(mode probe.Mode) func(ctx context.Context, addr string, rate int, ok, failed *atomic.Int64) {
	return func(ctx context.Context, addr string, rate int, ok, failed *atomic.Int64) {
		n := int(float64(rate) * proberInterval.Seconds())
		var wg sync.WaitGroup
		for range n {
			p := probe.New(probe.Options{
				Mode: mode, Interval: proberInterval, Timeout: 2 * time.Second, Jitter: 0.2,
				TLS:      &tls.Config{RootCAs: env.CA.Pool, MinVersion: tls.VersionTLS12},
				Reporter: counter{ok, failed},
			})
			p.SetTargets([]string{addr})
			wg.Go(func() { _ = p.Run(ctx) })
			// Start the probers over one interval, as nodes that booted at
			// different times would be.
			select {
			case <-ctx.Done():
			case <-time.After(proberInterval / time.Duration(n)):
			}
		}
		wg.Wait()
	}
}

// runHandshakes checks like haproxy's `check check-ssl` with `option
// httpchk GET /healthz`: a new connection, a TLS handshake (full, or
// resuming the previous session), one request, close.
func runHandshakes(resume bool) func(ctx context.Context, addr string, rate int, ok, failed *atomic.Int64) {
	return func(ctx context.Context, addr string, rate int, ok, failed *atomic.Int64) {
		n := int(float64(rate) * proberInterval.Seconds())
		var wg sync.WaitGroup
		for i := range n {
			conf := &tls.Config{RootCAs: env.CA.Pool, MinVersion: tls.VersionTLS12}
			if resume {
				conf.ClientSessionCache = tls.NewLRUClientSessionCache(1)
			}
			client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
				TLSClientConfig: conf, DisableKeepAlives: true, DisableCompression: true,
			}}
			start := time.Duration(i) * proberInterval / time.Duration(n)
			wg.Go(func() {
				timer := time.NewTimer(start)
				defer timer.Stop()
				for {
					select {
					case <-ctx.Done():
						return
					case <-timer.C:
					}
					if checkHealthz(ctx, client, addr) {
						ok.Add(1)
					} else if ctx.Err() == nil {
						failed.Add(1)
					}
					timer.Reset(time.Duration(float64(proberInterval) * (0.8 + 0.4*rand.Float64()))) //nolint:gosec // jitter
				}
			})
		}
		wg.Wait()
	}
}

// runH2PING keeps one HTTP/2 connection per simulated node and sends a
// PING frame per check: the least work a check can make an apiserver do
// (no request, no handler), shown for comparison.
func runH2PING(ctx context.Context, addr string, rate int, ok, failed *atomic.Int64) {
	n := int(float64(rate) * proberInterval.Seconds())
	var wg sync.WaitGroup
	for i := range n {
		start := time.Duration(i) * proberInterval / time.Duration(n)
		wg.Go(func() {
			conf := &tls.Config{RootCAs: env.CA.Pool, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}
			var cc *http2.ClientConn //nolint:staticcheck // net/http's ClientConn cannot send a PING frame
			defer func() {
				if cc != nil {
					_ = cc.Close()
				}
			}()
			timer := time.NewTimer(start)
			defer timer.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-timer.C:
				}
				err := func() error {
					cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
					defer cancel()
					if cc == nil {
						d := tls.Dialer{Config: conf}
						c, err := d.DialContext(cctx, "tcp", addr)
						if err != nil {
							return err
						}
						if cc, err = (&http2.Transport{}).NewClientConn(c); err != nil { //nolint:staticcheck // as above
							_ = c.Close()
							return err
						}
					}
					return cc.Ping(cctx)
				}()
				if err == nil {
					ok.Add(1)
				} else if ctx.Err() == nil {
					failed.Add(1)
					if cc != nil {
						_ = cc.Close()
						cc = nil
					}
				}
				timer.Reset(time.Duration(float64(proberInterval) * (0.8 + 0.4*rand.Float64()))) //nolint:gosec // jitter
			}
		})
	}
	wg.Wait()
}

func checkHealthz(ctx context.Context, c *http.Client, addr string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+"/healthz", nil)
	if err != nil {
		return false
	}
	resp, err := c.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// probeCost is one style's measured cost.
type probeCost struct {
	style   probeStyle
	probes  int64
	failed  int64
	apiCPU  float64 // apiserver CPU seconds above the idle baseline
	etcdCPU float64 // etcd CPU seconds above the idle baseline
	rssConn float64 // apiserver RSS growth per prober, bytes
}

// perThousand is the apiserver CPU seconds per 1,000 probes.
func (c probeCost) perThousand() float64 { return c.apiCPU / float64(c.probes) * 1000 }

// cores is the apiserver cores nodes probing at interval cost.
func (c probeCost) cores(nodes int, interval time.Duration) float64 {
	return c.apiCPU / float64(c.probes) * float64(nodes) / interval.Seconds()
}

// TestProbeCost drives each probe style at the same rate against one idle
// kube-apiserver and measures the apiserver's (and etcd's) CPU seconds per
// probe above an idle baseline.
func TestProbeCost(t *testing.T) {
	p := loadParams(t)
	// It never lists itself in the kubernetes EndpointSlice, so the fleet
	// tests that follow do not discover it.
	a := env.startAPIServer(t, apiserverIPs[3], "", "--endpoint-reconciler-type=none")
	env.WaitReady(t, a)
	// Let the start-up work (controllers, first lease writes) settle.
	settle(t, a.P.Cmd.Process.Pid, 90*time.Second)

	idle := func() (api, etcd float64) {
		m, err := startCPU(a.P.Cmd.Process.Pid, env.Etcd.Cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(p.ProbeWindow) // a measurement window, not synchronisation
		used, wall, err := m.stop()
		if err != nil {
			t.Fatal(err)
		}
		return used[0] / wall.Seconds(), used[1] / wall.Seconds()
	}
	baseAPI, baseEtcd := idle()

	var costs []probeCost
	for _, s := range probeStyles() {
		costs = append(costs, measureStyle(t, p, a, s, baseAPI, baseEtcd))
	}
	api2, etcd2 := idle()
	t.Logf("idle apiserver %.3f cores before, %.3f after; etcd %.3f, %.3f", baseAPI, api2, baseEtcd, etcd2)

	var b strings.Builder
	fmt.Fprintf(&b, "probe cost: one kube-apiserver, each style at %d probes/s for %s; idle baseline %.3f cores (apiserver), %.3f (etcd), subtracted\n",
		p.ProbeRate, p.ProbeWindow, (baseAPI+api2)/2, (baseEtcd+etcd2)/2)
	b.WriteString("| Probe style | Default of | Interval | Probes | Apiserver CPU s / 1,000 probes | etcd CPU s / 1,000 | Cores/apiserver at 1,000 nodes | at 5,000 nodes | at 5,000 nodes, 2 s | RSS per prober |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range costs {
		fmt.Fprintf(&b, "| %s | %s | %s | %d | %.3f | %.3f | %.3f | %.3f | %.3f | %.1f KiB |\n",
			c.style.name, c.style.who, c.style.interval, c.probes, c.perThousand(), c.etcdCPU/float64(c.probes)*1000,
			c.cores(1000, c.style.interval), c.cores(5000, c.style.interval), c.cores(5000, 2*time.Second), c.rssConn/1024)
	}
	env.Record("%s", b.String())

	byName := map[string]probeCost{}
	for _, c := range costs {
		byName[c.style.name] = c
	}
	ours := costs[0]
	if full := byName["new TLS handshake + GET /healthz"]; ours.perThousand() >= full.perThousand() {
		t.Errorf("a kept-alive /readyz probe cost the apiserver %.3f CPU s per 1,000, a new TLS handshake %.3f: kept-alive should be cheaper",
			ours.perThousand(), full.perThousand())
	}
}

// measureStyle drives style s for the window and returns its cost.
func measureStyle(t *testing.T, p params, a *apiserver, s probeStyle, baseAPI, baseEtcd float64) probeCost {
	t.Helper()
	pid := a.P.Cmd.Process.Pid
	rss0, err := rssBytes(pid)
	if err != nil {
		t.Fatal(err)
	}
	var ok, failed atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.run(ctx, a.Addr(), p.ProbeRate, &ok, &failed)
	}()
	defer func() {
		cancel()
		<-done
	}()
	// Warm up: every prober started and connected.
	warm := time.Now().Add(proberInterval + 3*time.Second)
	for time.Now().Before(warm) {
		if !a.P.Running() {
			t.Fatalf("%s exited during %s", a.P.Name, s.name)
		}
		time.Sleep(100 * time.Millisecond)
	}
	rss1, err := rssBytes(pid)
	if err != nil {
		t.Fatal(err)
	}
	m, err := startCPU(pid, env.Etcd.Cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	ok0, failed0 := ok.Load(), failed.Load()
	time.Sleep(p.ProbeWindow) // a measurement window, not synchronisation
	used, wall, err := m.stop()
	if err != nil {
		t.Fatal(err)
	}
	c := probeCost{
		style: s, probes: ok.Load() - ok0, failed: failed.Load() - failed0,
		apiCPU:  used[0] - baseAPI*wall.Seconds(),
		etcdCPU: used[1] - baseEtcd*wall.Seconds(),
		rssConn: float64(rss1-rss0) / (float64(p.ProbeRate) * proberInterval.Seconds()),
	}
	planned := float64(p.ProbeRate) * wall.Seconds()
	t.Logf("%s: %d probes (%d failed, %.0f planned) in %s, apiserver %.2f CPU s (%.2f above idle), etcd %.2f",
		s.name, c.probes, c.failed, planned, wall.Round(time.Millisecond), used[0], c.apiCPU, used[1])
	if float64(c.probes) < planned/2 {
		t.Errorf("%s: only %d of %.0f planned probes answered in %s", s.name, c.probes, planned, wall)
	}
	if c.failed*100 > c.probes {
		t.Errorf("%s: %d of %d probes failed", s.name, c.failed, c.probes+c.failed)
	}
	return c
}

// settle waits (up to max) until pid's CPU use over 5 s stops falling, so
// that the apiserver's start-up work does not count as probe cost.
func settle(t *testing.T, pid int, max time.Duration) {
	t.Helper()
	deadline := time.Now().Add(max)
	prev := -1.0
	for time.Now().Before(deadline) {
		m, err := startCPU(pid)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Second) // a measurement window
		used, _, err := m.stop()
		if err != nil {
			t.Fatal(err)
		}
		if prev >= 0 && used[0] >= prev*0.8 {
			return
		}
		prev = used[0]
	}
}
