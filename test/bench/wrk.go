package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Shape of the wrk keep-alive load: kubespray-sized, as in the data-path
// goals (`wrk -t2 -c32`).
const (
	wrkThreads = 2
	wrkConns   = 32
)

// wrkResult is what one wrk run (or, for several targets, the runs side by
// side) reports.
type wrkResult struct {
	RPS      float64
	P50ms    float64
	P99ms    float64
	Requests int64
	Errors   int64
}

// wrkArgs is the command line for one wrk process. wrk takes whole seconds.
func wrkArgs(target string, threads, conns int, d time.Duration) []string {
	secs := max(1, int(math.Round(d.Seconds())))
	return []string{"-t" + strconv.Itoa(threads), "-c" + strconv.Itoa(conns), "-d" + strconv.Itoa(secs) + "s",
		"--latency", "https://" + target + "/"}
}

// wrkKeepAlive runs wrk's keep-alive GET / load for d against targets. wrk
// takes one URL, so with several targets (direct) one wrk per target runs
// at the same time, sharing the threads and connections out; their rates
// and counts add up and the latency is the worst of them.
func wrkKeepAlive(ctx context.Context, bin string, targets []string, d time.Duration) (wrkResult, error) {
	n := len(targets)
	if n == 0 {
		return wrkResult{}, errors.New("wrk: no target")
	}
	parts := make([]wrkResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, t := range targets {
		threads := max(1, wrkThreads/n)
		conns := wrkConns / n
		if i < wrkConns%n {
			conns++
		}
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(cctx, bin, wrkArgs(t, threads, conns, d)...) //nolint:gosec // the load generator, chosen by the harness
			out, err := cmd.CombinedOutput()
			if err != nil {
				errs[i] = fmt.Errorf("wrk against %s: %w: %s", t, err, lastLines(string(out), 3))
				return
			}
			parts[i], errs[i] = parseWrk(string(out))
			if errs[i] != nil {
				errs[i] = fmt.Errorf("wrk against %s: %w", t, errs[i])
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return wrkResult{}, err
	}
	var sum wrkResult
	for _, p := range parts {
		sum.RPS += p.RPS
		sum.Requests += p.Requests
		sum.Errors += p.Errors
		sum.P50ms = max(sum.P50ms, p.P50ms)
		sum.P99ms = max(sum.P99ms, p.P99ms)
	}
	return sum, nil
}

// parseWrk reads the report of `wrk --latency`: Requests/sec, the request
// count, the 50% and 99% lines of the latency distribution, socket errors
// and non-2xx/3xx answers.
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	var haveRPS, haveReqs bool
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "Requests/sec:":
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return r, fmt.Errorf("wrk Requests/sec %q: %w", f[1], err)
			}
			r.RPS, haveRPS = v, true
		case len(f) >= 3 && f[1] == "requests" && f[2] == "in":
			v, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return r, fmt.Errorf("wrk request count %q: %w", f[0], err)
			}
			r.Requests, haveReqs = v, true
		case len(f) == 2 && (f[0] == "50%" || f[0] == "99%"):
			v, err := parseWrkDuration(f[1])
			if err != nil {
				return r, err
			}
			if f[0] == "50%" {
				r.P50ms = v
			} else {
				r.P99ms = v
			}
		case strings.HasPrefix(strings.TrimSpace(line), "Socket errors:"):
			// "Socket errors: connect 0, read 0, write 0, timeout 0"
			for i := 2; i+1 < len(f); i += 2 {
				v, err := strconv.ParseInt(strings.TrimSuffix(f[i+1], ","), 10, 64)
				if err != nil {
					return r, fmt.Errorf("wrk socket errors %q: %w", line, err)
				}
				r.Errors += v
			}
		case strings.HasPrefix(strings.TrimSpace(line), "Non-2xx or 3xx responses:"):
			v, err := strconv.ParseInt(f[len(f)-1], 10, 64)
			if err != nil {
				return r, fmt.Errorf("wrk non-2xx count %q: %w", line, err)
			}
			r.Errors += v
		}
	}
	if !haveRPS || !haveReqs {
		return r, fmt.Errorf("no Requests/sec or request count in wrk's output: %q", lastLines(out, 4))
	}
	return r, nil
}

// parseWrkDuration reads wrk's latency figures ("349.00us", "8.19ms",
// "1.02s", "1.50m") as milliseconds.
func parseWrkDuration(s string) (float64, error) {
	for _, u := range []struct {
		suffix string
		ms     float64
	}{{"us", 1e-3}, {"ms", 1}, {"s", 1e3}, {"m", 60e3}, {"h", 3600e3}} {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(num, 64)
			if err != nil {
				continue
			}
			return v * u.ms, nil
		}
	}
	return 0, fmt.Errorf("wrk latency %q: want a number with us, ms, s, m or h", s)
}
