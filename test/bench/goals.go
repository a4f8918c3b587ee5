package main

import (
	"fmt"
	"strings"
)

// goalNoise is the run-to-run noise of the shared bench machine: a figure
// that misses its reference by less than this share is "within noise".
const goalNoise = 0.03

// Results of a goal.
const (
	goalMet         = "met"
	goalNoiseOnly   = "within noise"
	goalNotMet      = "not met"
	goalNotMeasured = "not measured"
)

// goal is one of the data-path goals, evaluated on one run.
type goal struct {
	Name   string
	Unit   string
	Prec   int
	Higher bool // higher is better
	// Figure is extractedprism's, Reference what it is held against, named
	// by RefName.
	Figure, Reference float64
	RefName           string
	// Before is extractedprism's figure in the baseline run, 0 if unknown.
	Before float64
	Status string
}

// Ratio is the figure divided by the reference, 0 when either is missing.
func (g goal) Ratio() float64 {
	if g.Figure == 0 || g.Reference == 0 {
		return 0
	}
	return g.Figure / g.Reference
}

func (g *goal) judge() {
	switch {
	case g.Figure == 0 || g.Reference == 0:
		g.Status = goalNotMeasured
	case g.Higher && g.Figure >= g.Reference, !g.Higher && g.Figure <= g.Reference:
		g.Status = goalMet
	case g.Higher && g.Figure >= g.Reference*(1-goalNoise), !g.Higher && g.Figure <= g.Reference*(1+goalNoise):
		g.Status = goalNoiseOnly
	default:
		g.Status = goalNotMet
	}
}

// idleKiBLimit is the most memory an idle proxied connection may cost
// (KiB PSS): under the 64 MiB memory limit of the chart and the static
// pod, ten thousand idle watches must leave most of it free.
const idleKiBLimit = 2

// evalGoals checks extractedprism against the data-path goals: memory per
// idle connection at most haproxy's and at most idleKiBLimit; RSS growth
// per slow reader at most haproxy's; CPU per keep-alive request (with the
// Go load generator and with wrk) at most the better of haproxy and nginx;
// wrk keep-alive throughput and new TLS connections/s at least haproxy's;
// bulk throughput with 1 and 4 streams at least the baseline run's.
func evalGoals(res results) []goal {
	ep := figuresOf(res, nameEP)
	ha := figuresOf(res, nameHA)
	ng := figuresOf(res, nameNginx)
	var before perfResult
	baseName := "baseline run"
	if res.Baseline != nil {
		before = res.Baseline.Median
		baseName = "before"
	}
	// better returns the lower non-zero figure of haproxy and nginx.
	better := func(get func(perfResult) float64) (float64, string) {
		h, n := get(ha), get(ng)
		switch {
		case h == 0 && n == 0:
			return 0, "haproxy, nginx"
		case n == 0 || (h != 0 && h <= n):
			return h, nameHA
		default:
			return n, nameNginx
		}
	}
	type spec struct {
		name   string
		unit   string
		prec   int
		higher bool
		get    func(perfResult) float64
		ref    func(func(perfResult) float64) (float64, string)
	}
	vsHA := func(get func(perfResult) float64) (float64, string) { return get(ha), nameHA }
	vsBase := func(get func(perfResult) float64) (float64, string) { return get(before), baseName }
	limit := func(v float64, name string) func(func(perfResult) float64) (float64, string) {
		return func(func(perfResult) float64) (float64, string) { return v, name }
	}
	specs := []spec{
		{"Memory per idle proxied connection ≤ haproxy's", "KiB PSS", 1, false, func(r perfResult) float64 { return r.IdleKiB }, vsHA},
		{"Memory per idle proxied connection ≤ 2 KiB", "KiB PSS", 1, false, func(r perfResult) float64 { return r.IdleKiB }, limit(idleKiBLimit, "limit")},
		{"Memory per slow reader ≤ haproxy's", "KiB RSS", 1, false, func(r perfResult) float64 { return r.SlowRSSKiB }, vsHA},
		{"CPU per 10k keep-alive requests, Go load generator, ≤ the better of haproxy and nginx", "CPU s", 3, false, func(r perfResult) float64 { return r.CPUPer10k }, better},
		{"CPU per 10k keep-alive requests, wrk, ≤ the better of haproxy and nginx", "CPU s", 3, false, func(r perfResult) float64 { return r.WrkCPUPer10k }, better},
		{"Keep-alive requests/s under wrk ≥ haproxy's", "req/s", 0, true, func(r perfResult) float64 { return r.WrkRps }, vsHA},
		{"New TLS connections/s ≥ haproxy's", "conn/s", 0, true, func(r perfResult) float64 { return r.NewConnRate }, vsHA},
		{"Bulk download, 1 stream, not lower than before", "MB/s", 0, true, func(r perfResult) float64 { return r.Bulk1MBs }, vsBase},
		{"Bulk download, 4 streams, not lower than before", "MB/s", 0, true, func(r perfResult) float64 { return r.Bulk4MBs }, vsBase},
	}
	out := make([]goal, 0, len(specs))
	for _, s := range specs {
		g := goal{Name: s.name, Unit: s.unit, Prec: s.prec, Higher: s.higher, Figure: s.get(ep), Before: s.get(before)}
		g.Reference, g.RefName = s.ref(s.get)
		g.judge()
		out = append(out, g)
	}
	return out
}

// figuresOf is a set-up's median figures, zero when it was not measured.
func figuresOf(res results, s string) perfResult {
	if !has(res, s) {
		return perfResult{}
	}
	return res.Median[s]
}

// renderGoals writes the goals table in Markdown.
func renderGoals(b *strings.Builder, res results) {
	w := func(f string, a ...any) { fmt.Fprintf(b, f, a...) }
	goals := evalGoals(res)
	w("## Goals\n\n")
	w("The data path's goals, checked against the medians of this run below. ")
	w("A figure that misses its reference by less than %.0f%%, the run-to-run noise of this shared machine, is marked *%s*. ", goalNoise*100, goalNoiseOnly)
	if res.Baseline != nil {
		w("\"Before\" is extractedprism in the baseline run of %s: %s.", res.Baseline.Date, res.Baseline.Version)
	} else {
		w("No baseline run was given (`--baseline`), so the bulk goals are not evaluated.")
	}
	w("\n\n| Goal | extractedprism | Reference | Ratio | Result |")
	if res.Baseline != nil {
		w(" Before |")
	}
	w("\n|---|---:|---:|---:|---|")
	if res.Baseline != nil {
		w("---:|")
	}
	w("\n")
	met, noise, measured := 0, 0, 0
	for _, g := range goals {
		fig, ref, rat := "–", "–", "–"
		if g.Figure != 0 {
			fig = fmtNum(g.Figure, g.Prec) + " " + g.Unit
		}
		if g.Reference != 0 {
			ref = fmtNum(g.Reference, g.Prec) + " (" + g.RefName + ")"
		}
		if r := g.Ratio(); r != 0 {
			rat = fmt.Sprintf("%.2f", r)
		}
		verdict := g.Status
		switch g.Status {
		case goalMet:
			verdict = "**met**"
			met++
			measured++
		case goalNoiseOnly:
			noise++
			measured++
		case goalNotMet:
			measured++
		}
		w("| %s | %s | %s | %s | %s |", g.Name, fig, ref, rat, verdict)
		if res.Baseline != nil {
			before := "–"
			if g.Before != 0 {
				before = fmtNum(g.Before, g.Prec) + " " + g.Unit
			}
			w(" %s |", before)
		}
		w("\n")
	}
	w("\n%d of %d goals met", met, len(goals))
	if noise > 0 {
		w(", %d more within noise", noise)
	}
	if measured < len(goals) {
		w(", %d not measured", len(goals)-measured)
	}
	w(".\n\n")
}
