package main

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// profileTop is how many symbols each table of the profile report keeps.
const profileTop = 30

// epPprofAddr is where the profiling build of extractedprism (see
// testdata/pprof.go) serves /debug/pprof.
const epPprofAddr = "127.0.20.100:17449"

// profile runs one balancer under wrk's keep-alive load with perf sampling
// its processes (and, when the balancer serves Go's /debug/pprof, a Go CPU
// profile too), then opens idleTarget idle connections through it and
// breaks their memory down; it writes the report to out.
func (e *env) profile(ctx context.Context, log *slog.Logger, setup, out string, dur time.Duration) error {
	if setup == nameDirect {
		return errors.New("--profile needs a balancer: pass --only extractedprism, haproxy or nginx")
	}
	if e.wrk == "" {
		return errors.New("--profile needs wrk: --wrk is empty")
	}
	perfBin, err := exec.LookPath("perf")
	if err != nil {
		return fmt.Errorf("--profile needs perf (apt-get install linux-perf): %w", err)
	}
	var b bytes.Buffer
	w := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	w("Profile of %s, written by `make bench-profile`\n", setup)
	m := describeMachine(e.epBin, e.wrk)
	w("Date: %s; %d cores (%s); kernel %s\n", m.Date, m.Cores, m.CPU, m.Kernel)
	switch setup {
	case nameEP:
		w("extractedprism: %s (%s)\n", m.ExtractedPrism, e.epBin)
		if !hasSymbols(e.epBin) {
			w("NOTE: %s has no symbol table (built with -ldflags -s); perf can name kernel symbols only. `make bench-profile` builds one with symbols.\n", e.epBin)
			log.Warn("binary has no symbol table; perf will not name its functions", "bin", e.epBin)
		}
	case nameHA:
		w("haproxy: %s\n", m.HAProxy)
	case nameNginx:
		w("nginx: %s\n", m.Nginx)
	}
	w("Load: wrk %s against the balancer in front of three stand-ins; %s\n\n",
		strings.Join(wrkArgs(balancerAddr[setup], wrkThreads, wrkConns, dur), " "), m.Wrk)

	p, _, err := e.startBalancer(ctx, setup)
	if err != nil {
		return err
	}
	defer p.stop(15 * time.Second)
	log.Info("balancer running", "setup", setup, "pid", p.pid())
	sleepCtx(ctx, 2*healthEvery)
	pprofURL := ""
	for _, a := range []string{epPprofAddr, epHealthAddr} {
		if u := "http://" + a + "/debug/pprof/"; setup == nameEP && pprofURL == "" && httpOK(ctx, u) {
			pprofURL = u
		}
	}

	// CPU: perf over the whole process group for the wrk run.
	data := filepath.Join(e.dir, "perf.data")
	pids := make([]string, 0, 4)
	for _, pid := range p.groupPIDs() {
		pids = append(pids, strconv.Itoa(pid))
	}
	rec, err := startProc(e.dir, "perf-record", nil, perfBin, "record", "-g", "-F", "999", "-o", data,
		"-p", strings.Join(pids, ","), "--", "sleep", strconv.Itoa(int(dur.Seconds())+3))
	if err != nil {
		return err
	}
	// perf creates its output file once it is attached.
	for deadline := time.Now().Add(15 * time.Second); ; {
		if _, err := os.Stat(data); err == nil {
			break
		}
		if rec.exited() || time.Now().After(deadline) {
			rec.stop(time.Second)
			return fmt.Errorf("perf record did not start (log: %s)", rec.log.Name())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cpu0 := p.cpuSeconds()
	wr, err := wrkKeepAlive(ctx, e.wrk, e.targets(setup), dur)
	if err != nil {
		rec.stop(time.Second)
		return err
	}
	cpu := p.cpuSeconds() - cpu0
	if !rec.wait(dur + 30*time.Second) {
		rec.stop(time.Second)
	}
	if rec.err != nil {
		return fmt.Errorf("perf record: %w (log: %s)", rec.err, rec.log.Name())
	}
	w("== wrk keep-alive under perf: %s req/s, p50 %.2f ms, p99 %.2f ms, %d errors; balancer CPU %.3f s per 10k requests (perf's sampling adds to it)\n\n",
		fmtNum(wr.RPS, 0), wr.P50ms, wr.P99ms, wr.Errors, cpu/float64(max(1, wr.Requests))*10000)
	for _, t := range []struct {
		title string
		args  []string
	}{
		{"CPU by binary (user space, kernel, vdso)", []string{"--no-children", "--sort", "dso"}},
		{fmt.Sprintf("Top %d symbols by self time", profileTop), []string{"--no-children", "--sort", "dso,symbol"}},
		{fmt.Sprintf("Top %d symbols by time including callees", profileTop), []string{"--children", "--sort", "symbol"}},
	} {
		rep, err := perfReport(ctx, perfBin, data, t.args)
		if err != nil {
			return err
		}
		w("-- %s (perf report %s)\n%s\n", t.title, strings.Join(t.args, " "), rep)
	}
	if pprofURL != "" {
		// A run of its own: Go's profiler sees no samples while perf
		// records the same threads.
		goCPU := make(chan string, 1)
		go func() {
			goCPU <- e.goPprofTop(ctx, pprofURL+"profile?seconds="+strconv.Itoa(max(1, int(dur.Seconds()))), "")
		}()
		wr, err := wrkKeepAlive(ctx, e.wrk, e.targets(setup), dur)
		if err != nil {
			return err
		}
		w("-- Go CPU profile of a second wrk run (%s req/s), from /debug/pprof/profile (go tool pprof -top)\n%s\n", fmtNum(wr.RPS, 0), <-goCPU)
	}

	// Memory: the idle-connection measurement, broken down.
	sleepCtx(ctx, healthEvery)
	pss0, sm0 := p.pssKiB(), p.smaps()
	var gm0 map[string]float64
	if setup == nameEP {
		gm0 = goMetrics(ctx, epHealthAddr)
	}
	conns, err := idleConns(ctx, e.targets(setup)[0], idleTarget, idleDialers)
	if err != nil {
		log.Warn("idle connections", "opened", len(conns), "err", err)
	}
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	sleepCtx(ctx, 500*time.Millisecond)
	n := float64(max(1, len(conns)))
	w("== %d idle proxied TLS connections: PSS +%.1f KiB per connection\n\n", len(conns), float64(p.pssKiB()-pss0)/n)
	sm1 := p.smaps()
	w("-- /proc/PID/smaps_rollup growth per connection (KiB)\n")
	for _, k := range []string{"Rss", "Pss", "Pss_Anon", "Anonymous", "Private_Dirty"} {
		w("%-14s %8.2f\n", k, (sm1[k]-sm0[k])/n)
	}
	w("\n")
	if gm0 != nil {
		gm1 := goMetrics(ctx, epHealthAddr)
		w("-- Go runtime growth per connection (from /metrics)\n")
		keys := make([]string, 0, len(gm1))
		for k := range gm1 {
			if (strings.HasPrefix(k, "go_memstats_") && strings.HasSuffix(k, "_bytes")) || k == "go_goroutines" || k == "go_threads" {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		for _, k := range keys {
			d := (gm1[k] - gm0[k]) / n
			if strings.HasSuffix(k, "_bytes") {
				w("%-44s %10.2f KiB\n", k, d/1024)
			} else {
				w("%-44s %10.3f\n", k, d)
			}
		}
		w("\n")
	}
	if pprofURL != "" {
		w("-- Go heap in use with the connections open, after a GC (go tool pprof -top -sample_index=inuse_space)\n%s\n",
			e.goPprofTop(ctx, pprofURL+"heap?gc=1", "inuse_space"))
		w("-- Goroutines with the connections open (go tool pprof -top goroutine)\n%s\n",
			e.goPprofTop(ctx, pprofURL+"goroutine", ""))
	} else if setup == nameEP {
		w("(this extractedprism serves no /debug/pprof, so there is no Go profile: `make bench-profile` builds one that does; the figures above are from /proc and /metrics.)\n")
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	log.Info("profile written", "file", out)
	return os.WriteFile(out, b.Bytes(), 0o644) //nolint:gosec // a public report
}

// perfReport runs perf report on data and keeps the first profileTop rows.
func perfReport(ctx context.Context, perfBin, data string, args []string) (string, error) {
	cmd := exec.CommandContext(ctx, perfBin, append([]string{"report", "-i", data, "--stdio", "-g", "none", "--percent-limit", "0.1"}, args...)...) //nolint:gosec // fixed arguments
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("perf report %v: %w: %s", args, err, lastLines(stderr.String(), 3))
	}
	return topRows(string(out), profileTop), nil
}

// topRows keeps the header line naming the columns and the first n rows of
// a perf report.
func topRows(report string, n int) string {
	var b strings.Builder
	rows := 0
	for line := range strings.SplitSeq(report, "\n") {
		t := strings.TrimSpace(line)
		switch {
		case t == "" || t == "#":
			continue
		case strings.HasPrefix(t, "# Overhead") || strings.HasPrefix(t, "# Children"):
			b.WriteString(strings.TrimRight(strings.TrimSuffix(strings.TrimRight(line, " "), "IPC   [IPC Coverage]"), " ") + "\n")
		case strings.HasPrefix(t, "#"):
			continue
		case rows < n:
			// perf 6.1 adds IPC columns it has no data for ("-  -").
			f := strings.Fields(line)
			if len(f) > 2 && f[len(f)-1] == "-" && f[len(f)-2] == "-" {
				line = strings.TrimRight(line, " -")
			}
			b.WriteString(line + "\n")
			rows++
		}
	}
	return b.String()
}

// goPprofTop fetches a Go profile with `go tool pprof -top` (which keeps a
// copy in the work directory) and returns its table; the error text stands
// in for it when that fails.
func (e *env) goPprofTop(ctx context.Context, url, sampleIndex string) string {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "go not found: " + err.Error()
	}
	args := []string{"tool", "pprof", "-top", "-nodecount", strconv.Itoa(profileTop)}
	if sampleIndex != "" {
		args = append(args, "-sample_index", sampleIndex)
	}
	cmd := exec.CommandContext(ctx, goBin, append(args, url)...) //nolint:gosec // fixed arguments
	cmd.Env = append(os.Environ(), "PPROF_TMPDIR="+e.dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Sprintf("go tool pprof %s: %v: %s", url, err, lastLines(string(out), 3))
	}
	var b strings.Builder
	for line := range strings.SplitSeq(string(out), "\n") {
		if strings.HasPrefix(line, "Fetching profile") || strings.HasPrefix(line, "Saved profile") || strings.HasPrefix(line, "Build ID") {
			continue
		}
		b.WriteString(line + "\n")
	}
	return strings.TrimRight(b.String(), "\n") + "\n"
}

func httpOK(ctx context.Context, url string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// hasSymbols tells whether an ELF binary still has its symbol table.
func hasSymbols(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer func() { _ = f.Close() }()
	return f.Section(".symtab") != nil
}

// smaps sums the kB fields of /proc/PID/smaps_rollup over the group.
func (p *proc) smaps() map[string]float64 {
	out := map[string]float64{}
	for _, pid := range p.groupPIDs() {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			if n, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64); err == nil {
				out[k] += n
			}
		}
	}
	return out
}
