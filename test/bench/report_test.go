package main

import (
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func sampleResults() results {
	pr := func(rps float64) perfResult {
		return perfResult{KARps: rps, KAP50ms: 1, KAP99ms: 4, CPUPer10k: 0.25, NewConnRate: 900,
			Bulk1MBs: 700, Bulk4MBs: 800, IdleKiB: 10, IdleOpened: idleTarget, StartReady: 30,
			WrkRps: 2 * rps, WrkP50ms: 0.5, WrkP99ms: 3, WrkCPUPer10k: 0.2}
	}
	res := results{
		Machine: machine{Date: "2026-01-01 00:00 UTC", Cores: 2, Kernel: "6.1", Go: "go1.26"},
		Setups:  []string{nameDirect, nameEP, nameHA, nameNginx},
		Runs:    map[string][]perfResult{},
		Median:  map[string]perfResult{},
		Chaos: map[string]chaosResult{
			nameEP: {KillTotal: 100, RollTotal: 200, UnreadyFresh: 50, TermSurviveMedian: 10, TermRefusedAfter: 5, TermExit: 10},
			nameHA: {KillTotal: 100, KillFailed: 2, UnreadyFresh: 50, UnreadyShare: 0.3, TermRefusedAfter: -1, TermExit: -1,
				Failures: map[string][]string{"kill": {"new-connection client, +0.0 s after kill, after 0.0 s: EOF"}}},
		},
		Params: map[string]string{"runs": "3", "duration": "2s", "ka_workers": "16", "nc_workers": "8", "idle_conns": "2000", "chaos_load": "x"},
	}
	for i, s := range res.Setups {
		res.Runs[s] = []perfResult{pr(10000 + float64(i)*1000), pr(12000), pr(11000)}
		res.Median[s], _ = medianPerf(res.Runs[s])
	}
	return res
}

func TestReportAndChart(t *testing.T) {
	dir := t.TempDir()
	o := options{out: filepath.Join(dir, "B.md"), chart: filepath.Join(dir, "c", "b.png"), jsonOut: filepath.Join(dir, "r.json")}
	if err := writeOutputs(o, sampleResults()); err != nil {
		t.Fatalf("writeOutputs: %v", err)
	}
	md, err := os.ReadFile(o.out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"![benchmark chart](c/b.png)",
		"| Keep-alive HTTPS requests/s (req/s) | 11,000 | 11,000 | 12,000 | 12,000 |",
		"| 0 / 0 / 100 | 2 / 0 / 100 |",
		"## Goals",
		"| Keep-alive requests/s under wrk ≥ haproxy's | 22,000 req/s | 24,000 (haproxy) | 0.92 | not met |",
		"| Keep-alive HTTPS requests/s, wrk (req/s) | 22,000 | 22,000 | 24,000 | 24,000 |",
		"| Balancer CPU per 10k keep-alive requests, wrk (CPU s) | n/a | 0.200 | 0.200 | 0.200 |",
		"0% of 50 | 30% of 50",
		"never refused",
		"still running",
		"haproxy, new-connection client, +0.0 s after kill",
		"## Conclusions",
	} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report lacks %q", want)
		}
	}
	f, err := os.Open(o.chart)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("chart is not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() < 1000 || b.Dy() < 800 {
		t.Errorf("chart is %v, want at least 1000x800", b)
	}
	// The JSON round-trips through --render.
	o2 := options{render: o.jsonOut, out: filepath.Join(dir, "B2.md"), chart: filepath.Join(dir, "b2.png")}
	if err := rerender(o2); err != nil {
		t.Fatalf("rerender: %v", err)
	}
	md2, _ := os.ReadFile(o2.out)
	if !strings.Contains(string(md2), "| Keep-alive HTTPS requests/s (req/s) | 11,000 |") {
		t.Errorf("re-rendered report differs:\n%s", md2)
	}
}

func TestWindowAndMedian(t *testing.T) {
	t0 := time.Now()
	evs := []chaosEvent{
		{at: t0.Add(-time.Second)},
		{at: t0, failed: true, err: "EOF", fresh: true},
		{at: t0.Add(time.Second), lat: 2 * time.Second},
		{at: t0.Add(5 * time.Second), failed: true},
	}
	var r chaosResult
	total, failed, slow := window(&r, "kill", evs, t0, t0.Add(5*time.Second))
	if total != 2 || failed != 1 || slow != 1 {
		t.Errorf("window = %d total, %d failed, %d slow; want 2, 1, 1", total, failed, slow)
	}
	if len(r.Failures["kill"]) != 1 || !strings.Contains(r.Failures["kill"][0], "new-connection client") {
		t.Errorf("failure samples = %q", r.Failures["kill"])
	}
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("median odd = %v", m)
	}
	if m := median([]float64{4, 1, 2, 3}); m != 2.5 {
		t.Errorf("median even = %v", m)
	}
	if s := fmtNum(1234567, 0); s != "1,234,567" {
		t.Errorf("fmtNum = %q", s)
	}
}

func TestGoals(t *testing.T) {
	res := sampleResults()
	set := func(s string, f func(*perfResult)) {
		m := res.Median[s]
		f(&m)
		res.Median[s] = m
	}
	set(nameEP, func(m *perfResult) {
		m.IdleKiB, m.CPUPer10k, m.WrkCPUPer10k, m.WrkRps, m.NewConnRate, m.Bulk1MBs, m.Bulk4MBs = 18, 0.30, 0.21, 15000, 890, 700, 800
		m.SlowRSSKiB = 12
	})
	set(nameHA, func(m *perfResult) {
		m.IdleKiB, m.CPUPer10k, m.WrkCPUPer10k, m.WrkRps, m.NewConnRate = 3.5, 0.28, 0.25, 16000, 900
		m.SlowRSSKiB = 20
	})
	set(nameNginx, func(m *perfResult) { m.CPUPer10k, m.WrkCPUPer10k = 0.26, 0.26 })

	byName := func(gs []goal) map[string]goal {
		out := map[string]goal{}
		for _, g := range gs {
			out[g.Name] = g
		}
		return out
	}
	want := func(gs map[string]goal, prefix, status, ref string, reference float64) {
		t.Helper()
		for name, g := range gs {
			if !strings.HasPrefix(name, prefix) {
				continue
			}
			if g.Status != status || g.RefName != ref || g.Reference != reference {
				t.Errorf("%s: status %q against %v (%s), want %q against %v (%s)", name, g.Status, g.Reference, g.RefName, status, reference, ref)
			}
			return
		}
		t.Errorf("no goal starting %q in %v", prefix, gs)
	}

	// No baseline: the bulk goals cannot be judged.
	gs := byName(evalGoals(res))
	if len(gs) != 9 {
		t.Fatalf("%d goals, want 9", len(gs))
	}
	want(gs, "Memory per idle proxied connection ≤ haproxy's", goalNotMet, nameHA, 3.5)
	want(gs, "Memory per idle proxied connection ≤ 2 KiB", goalNotMet, "limit", 2)
	want(gs, "Memory per slow reader", goalMet, nameHA, 20)
	// The better of the two is nginx for the Go generator, haproxy for wrk.
	want(gs, "CPU per 10k keep-alive requests, Go", goalNotMet, nameNginx, 0.26)
	want(gs, "CPU per 10k keep-alive requests, wrk", goalMet, nameHA, 0.25)
	want(gs, "Keep-alive requests/s under wrk", goalNotMet, nameHA, 16000)
	want(gs, "New TLS connections/s", goalNoiseOnly, nameHA, 900)
	want(gs, "Bulk download, 1 stream", goalNotMeasured, "baseline run", 0)
	if r := gs["Memory per idle proxied connection ≤ haproxy's"].Ratio(); r < 5.14 || r > 5.15 {
		t.Errorf("memory ratio = %v, want 18/3.5", r)
	}

	// With a baseline, bulk is held against the earlier run.
	res.Baseline = &baseline{Date: "2025-12-01 00:00 UTC", Version: "v0.9.0", Median: perfResult{Bulk1MBs: 750, Bulk4MBs: 790, IdleKiB: 19}}
	gs = byName(evalGoals(res))
	want(gs, "Bulk download, 1 stream", goalNotMet, "before", 750)
	want(gs, "Bulk download, 4 streams", goalMet, "before", 790)
	if g := gs["Memory per idle proxied connection ≤ haproxy's"]; g.Before != 19 {
		t.Errorf("memory before = %v, want 19", g.Before)
	}

	// A set-up that was not measured leaves its goals unjudged.
	delete(res.Runs, nameHA)
	gs = byName(evalGoals(res))
	want(gs, "New TLS connections/s", goalNotMeasured, nameHA, 0)
	want(gs, "CPU per 10k keep-alive requests, Go", goalNotMet, nameNginx, 0.26)

	var b strings.Builder
	renderGoals(&b, res)
	for _, s := range []string{
		"| Goal | extractedprism | Reference | Ratio | Result | Before |",
		"| Bulk download, 4 streams, not lower than before | 800 MB/s | 790 (before) | 1.01 | **met** | 790 MB/s |",
		"| New TLS connections/s ≥ haproxy's | 890 conn/s | – | – | not measured | – |",
		"baseline run of 2025-12-01 00:00 UTC: v0.9.0.",
		"| Memory per idle proxied connection ≤ 2 KiB | 18.0 KiB PSS | 2.0 (limit) | 9.00 | not met | 19.0 KiB PSS |",
		"| Memory per slow reader ≤ haproxy's | 12.0 KiB RSS | – | – | not measured | – |",
		"2 of 9 goals met, 4 not measured.",
	} {
		if !strings.Contains(b.String(), s) {
			t.Errorf("goals table lacks %q:\n%s", s, b.String())
		}
	}
}

func TestParseWrk(t *testing.T) {
	out := `Running 2s test @ https://127.0.20.100:17445/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.90ms    1.57ms  17.60ms   89.69%
    Req/Sec    29.64k     5.78k   44.91k    78.05%
  Latency Distribution
     50%  349.00us
     75%  768.00us
     90%    2.54ms
     99%    1.02s
  120976 requests in 2.10s, 24.80MB read
  Socket errors: connect 1, read 2, write 0, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  57624.99
Transfer/sec:     11.82MB
`
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.RPS != 57624.99 || r.Requests != 120976 || r.Errors != 12 || math.Abs(r.P50ms-0.349) > 1e-9 || r.P99ms != 1020 {
		t.Errorf("parseWrk = %+v", r)
	}
	if _, err := parseWrk("unable to connect to 127.0.20.100:17445 Connection refused\n"); err == nil {
		t.Error("parseWrk accepted output without figures")
	}
	if _, err := parseWrkDuration("3.2parsecs"); err == nil || !strings.Contains(err.Error(), "3.2parsecs") {
		t.Errorf("parseWrkDuration error = %v, want one naming the value", err)
	}
	if got := strings.Join(wrkArgs("h:1", 2, 32, 1400*time.Millisecond), " "); got != "-t2 -c32 -d1s --latency https://h:1/" {
		t.Errorf("wrkArgs = %q", got)
	}
}

func TestTopRows(t *testing.T) {
	report := `# To display the perf.data header info, please use --header/--header-only options.
#
#
# Total Lost Samples: 0
#
# Overhead  Shared Object      Symbol                                         IPC   [IPC Coverage]
# ........  .................  .............................................  ....................
#
    17.01%  [kernel.kallsyms]  [k] finish_task_switch.isra.0                  -      -            
     7.66%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore                -      -            
     1.38%  extractedprism     [.] runtime.gopark                             -      -            

#
# (Cannot load tips.txt file, please install perf!)
#
`
	got := topRows(report, 2)
	want := "# Overhead  Shared Object      Symbol\n" +
		"    17.01%  [kernel.kallsyms]  [k] finish_task_switch.isra.0\n" +
		"     7.66%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore\n"
	if got != want {
		t.Errorf("topRows =\n%q\nwant\n%q", got, want)
	}
}
