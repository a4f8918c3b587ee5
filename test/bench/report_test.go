package main

import (
	"image/png"
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
			Bulk1MBs: 700, Bulk4MBs: 800, IdleKiB: 10, IdleOpened: idleTarget, StartReady: 30}
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
