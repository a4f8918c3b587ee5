// Command bench measures extractedprism side by side with haproxy and nginx
// (configured as kubespray configures them) and with no balancer at all, on
// loopback, against three stand-in kube-apiservers, and writes
// BENCHMARKS.md, a PNG chart and the raw results as JSON.
//
// Every phase is bounded in time; the whole run takes about ten minutes on
// two cores. Run it through `make bench`.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Load shapes.
const (
	kaWorkers   = 16
	ncWorkers   = 8
	idleTarget  = 2000
	idleDialers = 16
	// startSamples cold starts are timed per balancer.
	startSamples = 2
)

type options struct {
	binDir    string
	out       string
	chart     string
	jsonOut   string
	runs      int
	dur       time.Duration
	only      string
	skipChaos bool
	noInstall bool
	render    string
	loadOnly  string
	scenarios string
	merge     string
	logLevel  string
	wrk       string
	baseline  string
	epBin     string
	profile   string
	// Slow readers: how many, the rate each reads at (bytes/s) and how
	// long they are held once all are open.
	slowReaders int
	slowRate    int64
	slowHold    time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.binDir, "bin", "../../bin", "directory holding the standin and extractedprism binaries")
	flag.StringVar(&o.out, "out", "../../BENCHMARKS.md", "Markdown report to write")
	flag.StringVar(&o.chart, "chart", "../../docs/bench/bench.png", "PNG chart to write")
	flag.StringVar(&o.jsonOut, "json", "../../docs/bench/results.json", "raw results to write")
	flag.IntVar(&o.runs, "runs", 5, "interleaved rounds of the throughput figures (the median is reported)")
	flag.DurationVar(&o.dur, "duration", 2*time.Second, "length of each throughput measurement")
	flag.StringVar(&o.only, "only", "", "comma-separated set-ups to measure (direct,extractedprism,haproxy,nginx); default all")
	flag.BoolVar(&o.skipChaos, "skip-chaos", false, "skip the chaos scenarios")
	flag.BoolVar(&o.noInstall, "no-install", false, "do not apt-get install haproxy and nginx when missing")
	flag.StringVar(&o.loadOnly, "load-only", "", "only apply one load (keepalive, wrk, newconn, bulk1, bulk4) for --duration through the first set-up of --only, for profiling; writes nothing")
	flag.StringVar(&o.render, "render", "", "only re-render the report and chart from this results.json")
	flag.StringVar(&o.scenarios, "scenarios", strings.Join(scenarioNames(), ","), "comma-separated chaos scenarios to run")
	flag.StringVar(&o.logLevel, "ep-log-level", "warn", "extractedprism's --log-level (its log is in the work directory)")
	flag.StringVar(&o.merge, "merge", "", "results.json of an earlier run: keep its figures and replace only what this run measures (with --runs 0, only the chaos scenarios given)")
	flag.StringVar(&o.wrk, "wrk", "wrk", "wrk binary for the second keep-alive load generator; empty to skip it")
	flag.StringVar(&o.baseline, "baseline", "", "results.json of an earlier run whose extractedprism figures the goals compare with (default: the --merge file)")
	flag.StringVar(&o.epBin, "ep-bin", "", "extractedprism binary to measure (default: extractedprism in --bin)")
	flag.StringVar(&o.profile, "profile", "", "profile the first set-up of --only (default extractedprism) under wrk keep-alive load and with idle connections, write the report to this file, and nothing else")
	flag.IntVar(&o.slowReaders, "slow-readers", 300, "clients that download through each balancer while reading slowly, for the memory per slow reader; 0 skips that measurement")
	flag.Int64Var(&o.slowRate, "slow-rate", 256<<10, "bytes/s each slow reader reads")
	flag.DurationVar(&o.slowHold, "slow-hold", 10*time.Second, "how long the slow readers keep reading once all are open")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.render != "" {
		if err := rerender(o); err != nil {
			log.Error("render failed", "err", err)
			os.Exit(1)
		}
		return
	}
	if err := run(ctx, log, o); err != nil {
		log.Error("bench failed", "err", err)
		os.Exit(1)
	}
}

// results is everything one bench run measured.
type results struct {
	Machine  machine                  `json:"machine"`
	Setups   []string                 `json:"setups"`
	Missing  map[string]string        `json:"missing,omitempty"`
	Runs     map[string][]perfResult  `json:"runs"`
	Median   map[string]perfResult    `json:"median"`
	Chaos    map[string]chaosResult   `json:"chaos"`
	Params   map[string]string        `json:"params"`
	Duration float64                  `json:"duration_s"`
	Notes    map[string][]string      `json:"notes,omitempty"`
	Spread   map[string]map[string]mm `json:"spread,omitempty"`
	Starts   map[string][]float64     `json:"start_ready_ms,omitempty"`
	// Slow is the slow-reader measurement of each balancer.
	Slow map[string]slowResult `json:"slow_readers,omitempty"`
	// Baseline is extractedprism in an earlier run (--baseline), the
	// reference of the goals that must not regress.
	Baseline *baseline `json:"baseline,omitempty"`
}

// baseline is extractedprism's median figures in an earlier run.
type baseline struct {
	Date    string     `json:"date"`
	Version string     `json:"version"`
	Median  perfResult `json:"median"`
}

// loadBaseline reads a results.json and keeps extractedprism's figures; nil
// when that run did not measure them.
func loadBaseline(path string) (*baseline, error) {
	r, err := readResults(path)
	if err != nil {
		return nil, err
	}
	return baselineOf(r), nil
}

func baselineOf(r *results) *baseline {
	m, ok := r.Median[nameEP]
	if !ok || !has(*r, nameEP) {
		return nil
	}
	return &baseline{Date: r.Machine.Date, Version: r.Machine.ExtractedPrism, Median: m}
}

func readResults(path string) (*results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r := &results{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// upstreamAddrs are the stand-ins' addresses.
var upstreamAddrs = []string{"127.0.20.1:16443", "127.0.20.2:16443", "127.0.20.3:16443"}

// portsFree fails when another process listens on one of the harness's
// addresses: a second bench run at the same time would share haproxy's and
// nginx's ports (SO_REUSEPORT) and load the same cores, spoiling both.
func portsFree(addrs []string) error {
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("%s is in use, most likely by another bench run (stop it first): %w", a, err)
		}
		_ = ln.Close()
	}
	return nil
}

// mm is a min/max pair across runs.
type mm struct{ Min, Max float64 }

func run(ctx context.Context, log *slog.Logger, o options) error {
	began := time.Now()
	binDir, err := filepath.Abs(o.binDir)
	if err != nil {
		return fmt.Errorf("--bin %q: %w", o.binDir, err)
	}
	scen, err := pickScenarios(o.scenarios)
	if err != nil {
		return err
	}
	var prev *results
	if o.merge != "" {
		if prev, err = readResults(o.merge); err != nil {
			return fmt.Errorf("--merge %q: %w", o.merge, err)
		}
	}
	var base *baseline
	switch {
	case o.baseline != "":
		if base, err = loadBaseline(o.baseline); err != nil {
			return fmt.Errorf("--baseline %q: %w", o.baseline, err)
		}
		if base == nil {
			log.Warn("--baseline holds no extractedprism figures; goals against it are not evaluated", "file", o.baseline)
		}
	case prev != nil:
		base = baselineOf(prev)
	}
	if o.epBin == "" {
		o.epBin = filepath.Join(binDir, "extractedprism")
	}
	if o.epBin, err = filepath.Abs(o.epBin); err != nil {
		return fmt.Errorf("--ep-bin: %w", err)
	}
	standinBin := filepath.Join(binDir, "standin")
	if _, err := os.Stat(standinBin); err != nil {
		return fmt.Errorf("stand-in binary %s missing (run make bin/standin): %w", standinBin, err)
	}
	setups := []string{nameDirect, nameEP, nameHA, nameNginx}
	if o.profile != "" && o.only == "" {
		o.only = nameEP
	}
	if o.only != "" {
		setups = slices.DeleteFunc(setups, func(s string) bool { return !slices.Contains(strings.Split(o.only, ","), s) })
	}
	res := results{Missing: map[string]string{}, Runs: map[string][]perfResult{}, Median: map[string]perfResult{},
		Chaos: map[string]chaosResult{}, Notes: map[string][]string{}, Spread: map[string]map[string]mm{}, Baseline: base}
	var needs []need
	if slices.Contains(setups, nameHA) {
		needs = append(needs, needHAProxy)
	}
	if slices.Contains(setups, nameNginx) {
		needs = append(needs, needNginx...)
	}
	if o.wrk == "wrk" && (o.runs > 0 || o.profile != "" || o.loadOnly == "wrk") {
		needs = append(needs, needWrk)
	}
	if o.profile != "" {
		needs = append(needs, needPerf)
	}
	ensurePackages(log, o.noInstall, needs)
	if o.wrk != "" && o.runs > 0 {
		if _, err := exec.LookPath(o.wrk); err != nil {
			res.Notes["wrk"] = []string{"not measured: " + err.Error()}
			log.Warn("wrk keep-alive figures not measured", "err", err)
			o.wrk = ""
		}
	}
	for _, s := range slices.Clone(setups) {
		var bin string
		switch s {
		case nameEP:
			bin = o.epBin
		case nameHA:
			bin = "haproxy"
		case nameNginx:
			bin = "nginx"
		default:
			continue
		}
		if _, err := exec.LookPath(bin); err != nil {
			res.Missing[s] = err.Error()
			setups = slices.DeleteFunc(setups, func(x string) bool { return x == s })
			log.Warn("set-up not measured", "setup", s, "err", err)
		}
	}
	res.Setups = setups
	res.Machine = describeMachine(o.epBin, o.wrk)
	res.Params = map[string]string{
		"runs": fmt.Sprint(o.runs), "duration": o.dur.String(), "ka_workers": fmt.Sprint(kaWorkers),
		"nc_workers": fmt.Sprint(ncWorkers), "idle_conns": fmt.Sprint(idleTarget),
		"health_interval": healthEvery.String(), "chaos_load": fmt.Sprintf("%d keep-alive + %d new-connection clients, %d req/s each", chaosKAWorkers, chaosFreshWorkers, chaosRate),
	}
	if o.slowReaders > 0 {
		res.Params["slow_readers"] = fmt.Sprint(o.slowReaders)
		res.Params["slow_rate"] = fmt.Sprintf("%d KiB/s", o.slowRate>>10)
		res.Params["slow_hold"] = o.slowHold.String()
	}
	if o.wrk != "" {
		res.Params["wrk"] = "wrk " + strings.Join(wrkArgs("<target>", wrkThreads, wrkConns, o.dur), " ")
	}

	if err := portsFree(append([]string{epHealthAddr, epPprofAddr, balancerAddr[nameEP], balancerAddr[nameHA], balancerAddr[nameNginx]}, upstreamAddrs...)); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "epbench-")
	if err != nil {
		return fmt.Errorf("work dir: %w", err)
	}
	log.Info("bench starting", "setups", setups, "runs", o.runs, "workdir", dir)
	e := &env{dir: dir, binDir: binDir, epBin: o.epBin, epLogLevel: o.logLevel, wrk: o.wrk}
	for i, n := range []string{"a", "b", "c"} {
		e.upstreams = append(e.upstreams, &upstream{name: n, addr: upstreamAddrs[i], bin: standinBin, dir: dir, log: log})
	}
	defer func() {
		for _, u := range e.upstreams {
			if u.p != nil {
				u.p.stop(5 * time.Second)
			}
		}
	}()
	if err := e.healUpstreams(ctx); err != nil {
		return err
	}

	if o.loadOnly != "" {
		return e.loadOnly(ctx, log, setups[0], o.loadOnly, o.dur)
	}
	if o.profile != "" {
		return e.profile(ctx, log, setups[0], o.profile, o.dur)
	}
	if o.runs > 0 {
		if err := e.perfAll(ctx, log, setups, o.runs, o.dur, &res); err != nil {
			return err
		}
	}
	for _, s := range setups {
		res.Median[s], res.Spread[s] = medianPerf(res.Runs[s])
		if st := res.Starts[s]; len(st) > 0 {
			m := res.Median[s]
			m.StartReady = median(st)
			res.Median[s] = m
		}
	}
	if o.slowReaders > 0 {
		res.Slow = e.slowAll(ctx, log, setups, o.slowReaders, o.slowRate, o.slowHold)
		for s, r := range res.Slow {
			m := res.Median[s]
			m.SlowRSSKiB, m.SlowPSSKiB = r.RSSPerReader(), r.PSSPerReader()
			res.Median[s] = m
		}
	}
	if !o.skipChaos {
		for _, s := range setups {
			if s == nameDirect || ctx.Err() != nil {
				continue
			}
			res.Chaos[s] = e.chaos(ctx, log, s, scen)
			log.Info("chaos done", "setup", s, "result", fmt.Sprintf("%+v", res.Chaos[s]))
		}
	}
	res.Duration = time.Since(began).Seconds()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if prev != nil {
		ran := scen
		if o.skipChaos {
			ran = nil
		}
		res = mergeResults(*prev, res, ran, o.runs > 0)
	}
	return writeOutputs(o, res)
}

// perfAll measures every set-up runs times. All balancers run side by side
// (idle ones cost only their health checks) and every measurement cycles
// through the set-ups in an order that rotates each round, so machine drift
// hits all of them alike.
func (e *env) perfAll(ctx context.Context, log *slog.Logger, setups []string, runs int, dur time.Duration, res *results) error {
	procs := map[string]*proc{}
	defer func() {
		for _, p := range procs {
			p.stop(15 * time.Second)
		}
	}()
	starts := map[string][]float64{}
	// Start-up time: cold starts here and before every idle-memory
	// measurement; the last one stays up.
	for i := range startSamples {
		for _, s := range setups {
			if s == nameDirect {
				continue
			}
			if p := procs[s]; p != nil {
				p.stop(15 * time.Second)
				delete(procs, s)
			}
			p, d, err := e.startBalancer(ctx, s)
			if err != nil {
				return fmt.Errorf("start %s (sample %d): %w", s, i+1, err)
			}
			procs[s] = p
			starts[s] = append(starts[s], ms(d))
		}
	}
	sleepCtx(ctx, 2*healthEvery)
	for _, s := range setups {
		res.Runs[s] = make([]perfResult, runs)
	}
	measures := []struct {
		name string
		run  func(s string, pr *perfResult)
	}{
		{"keep-alive", func(s string, pr *perfResult) {
			p := procs[s]
			cpu0 := cpuOf(p)
			var reqs int64
			pr.KARps, pr.KAP50ms, pr.KAP99ms, reqs, pr.KAErrors = keepAlive(ctx, e.targets(s), kaWorkers, dur)
			if p != nil && reqs > 0 {
				pr.CPUPer10k = (cpuOf(p) - cpu0) / float64(reqs) * 10000
			}
		}},
		{"keep-alive-wrk", func(s string, pr *perfResult) {
			if e.wrk == "" {
				return
			}
			p := procs[s]
			cpu0 := cpuOf(p)
			w, err := wrkKeepAlive(ctx, e.wrk, e.targets(s), dur)
			if err != nil {
				log.Warn("wrk keep-alive", "setup", s, "err", err)
				return
			}
			pr.WrkRps, pr.WrkP50ms, pr.WrkP99ms, pr.WrkErrors = w.RPS, w.P50ms, w.P99ms, w.Errors
			if p != nil && w.Requests > 0 {
				pr.WrkCPUPer10k = (cpuOf(p) - cpu0) / float64(w.Requests) * 10000
			}
		}},
		{"new-connections", func(s string, pr *perfResult) {
			var err error
			pr.NewConnRate, pr.NCErrors, err = newConns(ctx, e.targets(s), ncWorkers, dur)
			if err != nil {
				log.Warn("new-connection errors", "setup", s, "count", pr.NCErrors, "first", err)
			}
		}},
		{"bulk-1", func(s string, pr *perfResult) { pr.Bulk1MBs = bulk(ctx, e.targets(s), 1, dur) }},
		{"bulk-4", func(s string, pr *perfResult) { pr.Bulk4MBs = bulk(ctx, e.targets(s), 4, dur) }},
		{"idle-memory", func(s string, pr *perfResult) {
			if procs[s] == nil {
				return
			}
			// A fresh process, so that memory kept from earlier
			// measurements does not hide the cost of the connections.
			procs[s].stop(15 * time.Second)
			p, d, err := e.startBalancer(ctx, s)
			if err != nil {
				delete(procs, s)
				log.Warn("restart for the idle-memory measurement", "setup", s, "err", err)
				return
			}
			procs[s] = p
			starts[s] = append(starts[s], ms(d))
			sleepCtx(ctx, healthEvery)
			base := p.pssKiB()
			var gm0 map[string]float64
			if s == nameEP {
				gm0 = goMetrics(ctx, epHealthAddr)
			}
			conns, err := idleConns(ctx, e.targets(s)[0], idleTarget, idleDialers)
			if err != nil {
				log.Warn("idle connections", "setup", s, "opened", len(conns), "err", err)
			}
			sleepCtx(ctx, 500*time.Millisecond)
			pr.IdleOpened = len(conns)
			if len(conns) > 0 {
				pr.IdleKiB = float64(p.pssKiB()-base) / float64(len(conns))
				if gm0 != nil {
					gm1 := goMetrics(ctx, epHealthAddr)
					n := float64(len(conns))
					pr.GoroutinesPerConn = (gm1["go_goroutines"] - gm0["go_goroutines"]) / n
					pr.StackKiBPerConn = (gm1["go_memstats_stack_inuse_bytes"] - gm0["go_memstats_stack_inuse_bytes"]) / n / 1024
					pr.HeapKiBPerConn = (gm1["go_memstats_heap_inuse_bytes"] - gm0["go_memstats_heap_inuse_bytes"]) / n / 1024
				}
			}
			for _, c := range conns {
				_ = c.Close()
			}
			sleepCtx(ctx, 500*time.Millisecond)
		}},
	}
	for r := range runs {
		order := slices.Clone(setups)
		for range r % max(1, len(order)) {
			order = append(order[1:], order[0])
		}
		for _, m := range measures {
			for _, s := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if p, ok := procs[s]; s != nameDirect && (!ok || p.exited()) {
					if !ok {
						return fmt.Errorf("%s could not be restarted", s)
					}
					return fmt.Errorf("%s exited during the measurements: %v (log: %s)", s, p.err, p.log.Name())
				}
				m.run(s, &res.Runs[s][r])
			}
		}
		for _, s := range setups {
			pr := &res.Runs[s][r]
			if st := starts[s]; len(st) > 0 {
				pr.StartReady = st[r%len(st)]
			}
			log.Info("perf", "run", r+1, "setup", s, "ka_rps", int(pr.KARps), "p99_ms", round(pr.KAP99ms, 2),
				"wrk_rps", int(pr.WrkRps), "wrk_p99_ms", round(pr.WrkP99ms, 2), "wrk_cpu_10k", round(pr.WrkCPUPer10k, 3),
				"new_conns_s", int(pr.NewConnRate), "bulk1", int(pr.Bulk1MBs), "bulk4", int(pr.Bulk4MBs),
				"cpu_10k", round(pr.CPUPer10k, 3), "idle_kib", round(pr.IdleKiB, 1))
		}
	}
	res.Starts = starts
	return nil
}

func cpuOf(p *proc) float64 {
	if p == nil {
		return 0
	}
	return p.cpuSeconds()
}

// medianPerf takes the median of every figure across runs.
func medianPerf(runs []perfResult) (perfResult, map[string]mm) {
	var m perfResult
	spread := map[string]mm{}
	if len(runs) == 0 {
		return m, spread
	}
	f := func(key string, get func(perfResult) float64) float64 {
		v := make([]float64, len(runs))
		for i, r := range runs {
			v[i] = get(r)
		}
		spread[key] = mm{slices.Min(v), slices.Max(v)}
		return median(v)
	}
	m.KARps = f("ka_rps", func(r perfResult) float64 { return r.KARps })
	m.KAP50ms = f("ka_p50_ms", func(r perfResult) float64 { return r.KAP50ms })
	m.KAP99ms = f("ka_p99_ms", func(r perfResult) float64 { return r.KAP99ms })
	m.KAErrors = int64(f("ka_errors", func(r perfResult) float64 { return float64(r.KAErrors) }))
	m.CPUPer10k = f("cpu_s_per_10k", func(r perfResult) float64 { return r.CPUPer10k })
	m.WrkRps = f("wrk_rps", func(r perfResult) float64 { return r.WrkRps })
	m.WrkP50ms = f("wrk_p50_ms", func(r perfResult) float64 { return r.WrkP50ms })
	m.WrkP99ms = f("wrk_p99_ms", func(r perfResult) float64 { return r.WrkP99ms })
	m.WrkErrors = int64(f("wrk_errors", func(r perfResult) float64 { return float64(r.WrkErrors) }))
	m.WrkCPUPer10k = f("wrk_cpu_s_per_10k", func(r perfResult) float64 { return r.WrkCPUPer10k })
	m.NewConnRate = f("new_conns_per_s", func(r perfResult) float64 { return r.NewConnRate })
	m.NCErrors = int64(f("nc_errors", func(r perfResult) float64 { return float64(r.NCErrors) }))
	m.Bulk1MBs = f("bulk1_mb_s", func(r perfResult) float64 { return r.Bulk1MBs })
	m.Bulk4MBs = f("bulk4_mb_s", func(r perfResult) float64 { return r.Bulk4MBs })
	m.IdleKiB = f("idle_kib_per_conn", func(r perfResult) float64 { return r.IdleKiB })
	m.IdleOpened = int(f("idle_opened", func(r perfResult) float64 { return float64(r.IdleOpened) }))
	m.StartReady = f("start_ready_ms", func(r perfResult) float64 { return r.StartReady })
	m.GoroutinesPerConn = f("goroutines_per_conn", func(r perfResult) float64 { return r.GoroutinesPerConn })
	m.StackKiBPerConn = f("stack_kib_per_conn", func(r perfResult) float64 { return r.StackKiBPerConn })
	m.HeapKiBPerConn = f("heap_kib_per_conn", func(r perfResult) float64 { return r.HeapKiBPerConn })
	return m, spread
}

// need is a program (looked up in PATH) or file (an absolute path) the run
// needs, and the Debian package that brings it.
type need struct{ path, pkg string }

var (
	needHAProxy = need{"haproxy", "haproxy"}
	needNginx   = []need{{"nginx", "nginx"}, {"/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream"}}
	needWrk     = need{"wrk", "wrk"}
	needPerf    = need{"perf", "linux-perf"}
)

// ensurePackages installs with apt-get the packages of the needs that are
// missing.
func ensurePackages(log *slog.Logger, noInstall bool, needs []need) {
	var pkgs []string
	for _, n := range needs {
		var err error
		if filepath.IsAbs(n.path) {
			_, err = os.Stat(n.path)
		} else {
			_, err = exec.LookPath(n.path)
		}
		if err != nil && !slices.Contains(pkgs, n.pkg) {
			pkgs = append(pkgs, n.pkg)
		}
	}
	if len(pkgs) == 0 {
		return
	}
	if noInstall {
		log.Warn("packages missing and --no-install given", "packages", pkgs)
		return
	}
	log.Info("installing with apt-get", "packages", pkgs)
	cmd := exec.Command("apt-get", append([]string{"install", "-y", "-qq", "--no-install-recommends"}, pkgs...)...) //nolint:gosec // fixed package names
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		log.Warn("apt-get install failed", "err", err, "output", lastLines(string(out), 5))
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

func round(v float64, places int) float64 {
	p := 1.0
	for range places {
		p *= 10
	}
	return float64(int64(v*p+0.5)) / p
}

func writeOutputs(o options, res results) error {
	var errs []error
	for _, f := range []string{o.out, o.chart, o.jsonOut} {
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			errs = append(errs, err)
		}
	}
	b, err := json.MarshalIndent(res, "", "  ")
	if err == nil {
		err = os.WriteFile(o.jsonOut, append(b, '\n'), 0o644) //nolint:gosec // a public report
	}
	errs = append(errs, err)
	errs = append(errs, renderChart(o.chart, res))
	rel, rerr := filepath.Rel(filepath.Dir(o.out), o.chart)
	if rerr != nil {
		rel = o.chart
	}
	errs = append(errs, os.WriteFile(o.out, []byte(renderMarkdown(res, rel)), 0o644)) //nolint:gosec // a public report
	return errors.Join(errs...)
}

// rerender writes the report and chart again from a saved results file.
func rerender(o options) error {
	b, err := os.ReadFile(o.render)
	if err != nil {
		return fmt.Errorf("--render %q: %w", o.render, err)
	}
	var res results
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("--render %q: %w", o.render, err)
	}
	o.jsonOut = filepath.Join(os.TempDir(), "epbench-rerender.json")
	return writeOutputs(o, res)
}

// goMetrics reads the Go runtime gauges from extractedprism's /metrics.
func goMetrics(ctx context.Context, addr string) map[string]float64 {
	out := map[string]float64{}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return out
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return out
	}
	defer func() { _ = resp.Body.Close() }()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || !strings.HasPrefix(name, "go_") {
			continue
		}
		if v, err := strconv.ParseFloat(val, 64); err == nil {
			out[name] = v
		}
	}
	return out
}

// loadOnly applies one kind of load through one set-up, for profiling the
// balancer from outside.
func (e *env) loadOnly(ctx context.Context, log *slog.Logger, setup, kind string, dur time.Duration) error {
	p, _, err := e.startBalancer(ctx, setup)
	if err != nil {
		return err
	}
	if p != nil {
		defer p.stop(15 * time.Second)
		log.Info("balancer running", "setup", setup, "pid", p.pid())
	}
	sleepCtx(ctx, 2*healthEvery)
	t := e.targets(setup)
	cpu0 := cpuOf(p)
	switch kind {
	case "keepalive":
		rps, p50, p99, reqs, errs := keepAlive(ctx, t, kaWorkers, dur)
		log.Info("keep-alive", "rps", int(rps), "p50_ms", p50, "p99_ms", p99, "requests", reqs, "errors", errs, "cpu_s", cpuOf(p)-cpu0)
	case "newconn":
		rate, errs, first := newConns(ctx, t, ncWorkers, dur)
		log.Info("new connections", "per_s", int(rate), "errors", errs, "first_error", first, "cpu_s", cpuOf(p)-cpu0)
	case "wrk":
		if e.wrk == "" {
			return errors.New("--load-only wrk: --wrk is empty")
		}
		w, err := wrkKeepAlive(ctx, e.wrk, t, dur)
		if err != nil {
			return err
		}
		log.Info("wrk keep-alive", "rps", int(w.RPS), "p50_ms", w.P50ms, "p99_ms", w.P99ms, "requests", w.Requests, "errors", w.Errors, "cpu_s", cpuOf(p)-cpu0)
	case "bulk1", "bulk4":
		n := 1
		if kind == "bulk4" {
			n = 4
		}
		log.Info("bulk", "streams", n, "mb_s", int(bulk(ctx, t, n, dur)), "cpu_s", cpuOf(p)-cpu0)
	default:
		return fmt.Errorf("--load-only %q: want keepalive, wrk, newconn, bulk1 or bulk4", kind)
	}
	return nil
}
