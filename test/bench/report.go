package main

import (
	"fmt"
	"image/color"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

type machine struct {
	Date           string `json:"date"`
	Cores          int    `json:"cores"`
	CPU            string `json:"cpu"`
	Kernel         string `json:"kernel"`
	Go             string `json:"go"`
	HAProxy        string `json:"haproxy"`
	Nginx          string `json:"nginx"`
	ExtractedPrism string `json:"extractedprism"`
	Wrk            string `json:"wrk,omitempty"`
}

func describeMachine(epBin, wrk string) machine {
	m := machine{Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), Cores: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for l := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	firstLine := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil && len(out) == 0 {
			return "not installed"
		}
		return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	m.HAProxy = firstLine("haproxy", "-v")
	m.Nginx = firstLine("nginx", "-v")
	m.ExtractedPrism = firstLine(epBin, "version")
	if wrk != "" {
		m.Wrk, _, _ = strings.Cut(firstLine(wrk, "--version"), " Copyright")
	}
	return m
}

// metric describes one row of the throughput table and one chart panel.
type metric struct {
	title  string
	short  string // chart panel title
	unit   string
	higher bool // higher is better
	direct bool // meaningful for direct
	get    func(perfResult) float64
	prec   int
}

var metrics = []metric{
	{"Keep-alive HTTPS requests/s", "Keep-alive requests/s", "req/s", true, true, func(r perfResult) float64 { return r.KARps }, 0},
	{"Keep-alive latency p50", "Latency p50", "ms", false, true, func(r perfResult) float64 { return r.KAP50ms }, 2},
	{"Keep-alive latency p99", "Keep-alive latency p99", "ms", false, true, func(r perfResult) float64 { return r.KAP99ms }, 2},
	{"Keep-alive HTTPS requests/s, wrk", "wrk keep-alive requests/s", "req/s", true, true, func(r perfResult) float64 { return r.WrkRps }, 0},
	{"Keep-alive latency p50, wrk", "wrk latency p50", "ms", false, true, func(r perfResult) float64 { return r.WrkP50ms }, 2},
	{"Keep-alive latency p99, wrk", "wrk latency p99", "ms", false, true, func(r perfResult) float64 { return r.WrkP99ms }, 2},
	{"New TLS connections/s", "New TLS connections/s", "conn/s", true, true, func(r perfResult) float64 { return r.NewConnRate }, 0},
	{"Bulk download, 1 stream", "Bulk, 1 stream", "MB/s", true, true, func(r perfResult) float64 { return r.Bulk1MBs }, 0},
	{"Bulk download, 4 streams", "Bulk, 4 streams", "MB/s", true, true, func(r perfResult) float64 { return r.Bulk4MBs }, 0},
	{"Balancer CPU per 10k keep-alive requests", "CPU per 10k requests", "CPU s", false, false, func(r perfResult) float64 { return r.CPUPer10k }, 3},
	{"Balancer CPU per 10k keep-alive requests, wrk", "CPU per 10k requests, wrk", "CPU s", false, false, func(r perfResult) float64 { return r.WrkCPUPer10k }, 3},
	{"Balancer memory per idle connection", "Memory per idle conn", "KiB PSS", false, false, func(r perfResult) float64 { return r.IdleKiB }, 1},
	{"Start to first proxied answer", "Start to first answer", "ms", false, false, func(r perfResult) float64 { return r.StartReady }, 0},
	{"Balancer memory per slow reader, RSS", "RSS per slow reader", "KiB RSS", false, false, func(r perfResult) float64 { return r.SlowRSSKiB }, 1},
	{"Balancer memory per slow reader, PSS", "PSS per slow reader", "KiB PSS", false, false, func(r perfResult) float64 { return r.SlowPSSKiB }, 1},
}

// byWrk tells the figures of the wrk load, which older results and runs
// without wrk lack.
func (mt metric) byWrk() bool { return strings.HasSuffix(mt.title, ", wrk") }

// bySlow tells the figures of the slow-reader measurement, which older
// results and runs with --slow-readers 0 lack.
func (mt metric) bySlow() bool { return strings.Contains(mt.title, "per slow reader") }

// shown tells whether a row belongs in the report: a wrk or slow-reader
// row only when some set-up has the figure.
func (mt metric) shown(res results) bool {
	if !mt.byWrk() && !mt.bySlow() {
		return true
	}
	for _, s := range res.Setups {
		if mt.get(res.Median[s]) != 0 {
			return true
		}
	}
	return false
}

func fmtNum(v float64, prec int) string {
	s := fmt.Sprintf("%.*f", prec, v)
	if prec == 0 && v >= 10000 {
		// thousands separator for readability
		n := len(s)
		var b strings.Builder
		for i, c := range s {
			if i > 0 && (n-i)%3 == 0 {
				b.WriteByte(',')
			}
			b.WriteRune(c)
		}
		return b.String()
	}
	return s
}

func ratio(a, b float64) string {
	if b == 0 || a == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func renderMarkdown(res results, chartRel string) string {
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	m := res.Machine
	w("# Benchmarks\n\n")
	w("extractedprism next to the per-node balancers kubespray deploys (haproxy and nginx, with kubespray's settings) and next to no balancer at all (\"direct\": the clients spread themselves over the three API servers, the physical limit). ")
	w("Everything runs on one machine over loopback: three stand-in kube-apiservers (HTTPS, HTTP/1.1), the balancer under test and the Go load generator, so all of them share the same %d cores. ", m.Cores)
	w("This file and the chart are written by `make bench` (about ten minutes); the raw numbers are in [docs/bench/results.json](docs/bench/results.json).\n\n")
	w("What a whole fleet of nodes costs the real kube-apiservers (health probes of each style, discovery watches, reconnect waves when an apiserver dies) is measured separately: [docs/fleet.md](docs/fleet.md).\n\n")
	renderGoals(&b, res)
	w("![benchmark chart](%s)\n\n", chartRel)

	w("## Machine\n\n")
	w("| | |\n|---|---|\n")
	w("| Date | %s |\n| Cores | %d (%s) |\n| Kernel | %s |\n| Go | %s |\n| haproxy | %s |\n| nginx | %s |\n| extractedprism | %s |\n",
		m.Date, m.Cores, m.CPU, m.Kernel, m.Go, m.HAProxy, m.Nginx, m.ExtractedPrism)
	if m.Wrk != "" {
		w("| wrk | %s |\n", m.Wrk)
	}
	w("| Whole run | %.0f s |\n\n", res.Duration)
	for s, why := range res.Missing {
		w("**%s was not measured**: %s\n\n", s, why)
	}

	w("## Throughput, latency and cost\n\n")
	w("Median of %s rounds. All balancers run side by side (an idle one costs only its health checks); every measurement goes through the set-ups one after the other, in an order that rotates each round, so drift of the machine hits all of them alike. Each measurement lasts %s. ", res.Params["runs"], res.Params["duration"])
	w("Keep-alive: %s clients, one HTTP/1.1 connection each, `GET /` in a loop. New connections: %s clients, each connection is TCP connect + full TLS handshake + `GET /readyz` + close. Bulk: `GET /bulk` over 1 or 4 keep-alive connections. ", res.Params["ka_workers"], res.Params["nc_workers"])
	if c := res.Params["wrk"]; c != "" {
		w("wrk: the same keep-alive load from a C client with its own OpenSSL, `%s` (for direct one wrk per stand-in at the same time, sharing the threads and connections; their rates add up and the latency is the worst of the three); it spends less CPU per request than the Go load generator and so leaves more of the cores to the balancer. ", c)
	}
	w("CPU: user+system seconds of the balancer's processes (from /proc) during the keep-alive measurement (and during the wrk one), per 10,000 requests. Memory: growth of the balancer's proportional set size (PSS, from /proc/PID/smaps_rollup) with %s idle proxied TLS connections open, per connection. ", res.Params["idle_conns"])
	w("Start: from exec to the first answer proxied to a client, median of %d cold starts (each idle-memory measurement uses a freshly started balancer).", startSamples+len(res.Runs[nameHA]))
	if len(res.Slow) > 0 {
		w(" Slow readers (measured once per run, not in rounds): %s; the RSS and PSS rows are the peak minus the base per reader.", slowDescription(res))
	}
	w("\n\n")
	hdr := "| Figure |"
	sep := "|---|"
	for _, s := range res.Setups {
		hdr += " " + s + " |"
		sep += "---:|"
	}
	w("%s\n%s\n", hdr, sep)
	for _, mt := range metrics {
		if !mt.shown(res) {
			continue
		}
		w("| %s (%s) |", mt.title, mt.unit)
		for _, s := range res.Setups {
			if s == nameDirect && !mt.direct {
				w(" n/a |")
				continue
			}
			r, ok := res.Median[s]
			if !ok || len(res.Runs[s]) == 0 {
				w(" – |")
				continue
			}
			if v := mt.get(r); v != 0 || !mt.bySlow() {
				w(" %s |", fmtNum(v, mt.prec))
			} else {
				w(" – |")
			}
		}
		w("\n")
	}
	w("\n")

	// Ratios.
	type pair struct{ a, b string }
	var pairs []pair
	for _, s := range []string{nameEP, nameHA, nameNginx} {
		if !has(res, s) {
			continue
		}
		if has(res, nameDirect) {
			pairs = append(pairs, pair{s, nameDirect})
		}
		if s != nameHA && has(res, nameHA) {
			pairs = append(pairs, pair{s, nameHA})
		}
	}
	if len(pairs) > 0 {
		w("Ratios (balancer figure divided by the reference; for rates above 1 is better, for latency, CPU, memory and start time below 1 is better):\n\n")
		hdr, sep = "| Figure |", "|---|"
		for _, p := range pairs {
			hdr += fmt.Sprintf(" %s / %s |", p.a, p.b)
			sep += "---:|"
		}
		w("%s\n%s\n", hdr, sep)
		for _, mt := range metrics {
			if !mt.shown(res) {
				continue
			}
			w("| %s |", mt.title)
			for _, p := range pairs {
				if p.b == nameDirect && !mt.direct {
					w(" n/a |")
					continue
				}
				w(" %s |", ratio(mt.get(res.Median[p.a]), mt.get(res.Median[p.b])))
			}
			w("\n")
		}
		w("\n")
	}
	if r, ok := res.Median[nameEP]; ok && r.GoroutinesPerConn > 0 {
		w("Where extractedprism's memory per idle connection goes (from its own /metrics, same measurement): %.2f goroutines, %.1f KiB of goroutine stack and %.1f KiB of heap per connection. PSS counts user-space memory only; socket buffers and splice pipes live in the kernel for every balancer alike.\n\n",
			r.GoroutinesPerConn, r.StackKiBPerConn, r.HeapKiBPerConn)
	}
	errLine := false
	for _, s := range res.Setups {
		r := res.Median[s]
		if r.KAErrors > 0 || r.NCErrors > 0 || r.WrkErrors > 0 {
			if !errLine {
				w("Errors during the throughput runs (median per run): ")
				errLine = true
			}
			w("%s %d keep-alive, %d wrk, %d new-connection; ", s, r.KAErrors, r.WrkErrors, r.NCErrors)
		}
		if r.IdleOpened > 0 && r.IdleOpened < idleTarget {
			w("%s opened only %d of %d idle connections; ", s, r.IdleOpened, idleTarget)
		}
	}
	if errLine {
		w("\n\n")
	}

	if len(res.Chaos) > 0 {
		w("## Chaos under load\n\n")
		w("Each scenario starts a fresh balancer in front of three healthy stand-ins and lets its health checks settle. Load: %s (`GET /`, %s timeout per request). A failure is a request that got an error, a timeout or a status other than 200, after Go's HTTP client retried what it retries by itself (an idempotent request on a reused connection that broke before any answer). ", res.Params["chaos_load"], chaosReqTimeout)
		w("Health checks every %s: extractedprism `--health-interval %s` (HTTPS `/readyz`), haproxy `inter %s fall 2 rise 2` with kubespray's `option httpchk GET /healthz`, nginx has only passive checks (kubespray sets none, so `max_fails=1 fail_timeout=10s`). Every scenario runs once per balancer.\n\n",
			healthEvery, healthEvery, healthEvery)
		var cs []string
		for _, s := range []string{nameEP, nameHA, nameNginx} {
			if _, ok := res.Chaos[s]; ok {
				cs = append(cs, s)
			}
		}
		w("| Scenario |")
		for _, s := range cs {
			w(" %s |", s)
		}
		w("\n|---|")
		for range cs {
			w("---|")
		}
		w("\n")
		row := func(title string, f func(chaosResult) string) {
			w("| %s |", title)
			for _, s := range cs {
				w(" %s |", f(res.Chaos[s]))
			}
			w("\n")
		}
		row("Upstream SIGKILLed, restarted 2 s later: failed / slow (>1 s) / requests", func(c chaosResult) string {
			return fmt.Sprintf("%d / %d / %d", c.KillFailed, c.KillSlow, c.KillTotal)
		})
		row("Rolling restart of all three (SIGTERM, 1 s down, wait 3 s): failed / slow / requests", func(c chaosResult) string {
			return fmt.Sprintf("%d / %d / %d", c.RollFailed, c.RollSlow, c.RollTotal)
		})
		unreadyTitle := "One upstream `/readyz` 500 (`/healthz` 200, still serving): share of new connections sent to it 5-10 s later"
		if n := unreadyClientsOf(res); n > 0 {
			unreadyTitle = fmt.Sprintf("One upstream `/readyz` 500 (`/healthz` 200, still serving), %d clients each opening a new TLS connection per request: share of new connections sent to it 5-10 s later", n)
		}
		row(unreadyTitle, func(c chaosResult) string {
			return fmt.Sprintf("%.0f%% of %d", 100*c.UnreadyShare, c.UnreadyFresh)
		})
		row("One upstream SIGSTOPped for 12 s: failed / slow / requests", func(c chaosResult) string {
			return fmt.Sprintf("%d / %d / %d", c.StopFailed, c.StopSlow, c.StopTotal)
		})
		row(fmt.Sprintf("… of those, requests started %s or more after the SIGSTOP: failed / slow", stopGrace), func(c chaosResult) string {
			return fmt.Sprintf("%d / %d", c.StopLateFailed, c.StopLateSlow)
		})
		row("SIGTERM to the balancer with 10 streams open: seconds the streams kept flowing (median / max)", func(c chaosResult) string {
			return fmt.Sprintf("%.1f / %.1f", c.TermSurviveMedian, c.TermSurviveMax)
		})
		row("… new connects after SIGTERM: refused from / accepted / of those answered", func(c chaosResult) string {
			ref := "never refused"
			if c.TermRefusedAfter >= 0 {
				ref = fmt.Sprintf("%.0f ms", c.TermRefusedAfter)
			}
			return fmt.Sprintf("%s / %d / %d", ref, c.TermAccepted, c.TermServed)
		})
		row("… process exited after", func(c chaosResult) string {
			if c.TermExit < 0 {
				return "still running"
			}
			return fmt.Sprintf("%.1f s", c.TermExit)
		})
		silent := func(f func(*silentResult) string) func(chaosResult) string {
			return func(c chaosResult) string {
				if c.Silent == nil {
					return "–"
				}
				return f(c.Silent)
			}
		}
		row(fmt.Sprintf("%d silent clients (connect, never send a byte) for %.0f s, upstreams with a %.0f s handshake timeout: balancer's `/readyz` answering 200", silentClients, silentFor.Seconds(), silentHandshake.Seconds()),
			silent(func(s *silentResult) string {
				if s.ReadyzShare < 0 {
					return "n/a"
				}
				return fmt.Sprintf("%.0f%% of the time", 100*s.ReadyzShare)
			}))
		row("… upstreams marked down (transitions in `/status`)", silent(func(s *silentResult) string {
			if s.Downs < 0 {
				return "n/a"
			}
			return fmt.Sprint(s.Downs)
		}))
		row("… failed / requests (of those on new connections: failed / requests)", silent(func(s *silentResult) string {
			return fmt.Sprintf("%d / %d (%d / %d)", s.Failed, s.Total, s.FreshFailed, s.FreshTotal)
		}))
		row("… silent connections closed by the balancer (median seconds after connecting)", silent(func(s *silentResult) string {
			if s.Closed == 0 {
				return fmt.Sprintf("0 of %d", s.Clients)
			}
			return fmt.Sprintf("%d of %d (%.1f s)", s.Closed, s.Clients, s.CloseMedian)
		}))
		unready := func(f func(*allUnreadyResult) string) func(chaosResult) string {
			return func(c chaosResult) string {
				if c.AllUnready == nil {
					return "–"
				}
				return f(c.AllUnready)
			}
		}
		row(fmt.Sprintf("Every upstream `/readyz` 500 for %.0f s (`/healthz` 200, still serving, as in an etcd outage), %d streams open: streams cut (first, seconds in)", allUnreadyFor.Seconds(), allUnreadyStreams),
			unready(func(a *allUnreadyResult) string {
				if a.Cut == 0 {
					return fmt.Sprintf("0 of %d", a.Streams)
				}
				return fmt.Sprintf("%d of %d (%.1f s)", a.Cut, a.Streams, a.FirstCut)
			}))
		row("… failed / requests (of those on new connections: failed / requests)", unready(func(a *allUnreadyResult) string {
			return fmt.Sprintf("%d / %d (%d / %d)", a.Failed, a.Total, a.FreshFailed, a.FreshTotal)
		}))
		row("… balancer's `/readyz` answering 200", unready(func(a *allUnreadyResult) string {
			if a.ReadyzShare < 0 {
				return "n/a"
			}
			return fmt.Sprintf("%.0f%% of the time", 100*a.ReadyzShare)
		}))
		for _, v := range []struct {
			title string
			get   func(chaosResult) *anonOffResult
		}{
			{fmt.Sprintf("Anonymous authentication off (401 without credentials; the clients use a client certificate), balancers check without credentials, one upstream SIGSTOPped for %.0f s: failed or slow (>1 s) %.0f-%.0f s in", anonOffStop.Seconds(), anonOffFrom.Seconds(), anonOffTo.Seconds()),
				func(c chaosResult) *anonOffResult { return c.AnonOff }},
			{"… the same with a bearer token in the checks (extractedprism `--probe-bearer-token-file`, haproxy `http-check send hdr Authorization`; nginx has no check): failed or slow 5-10 s in",
				func(c chaosResult) *anonOffResult { return c.AnonOffToken }},
		} {
			if !slices.ContainsFunc(cs, func(b string) bool { return v.get(res.Chaos[b]) != nil }) {
				continue
			}
			anon := func(f func(*anonOffResult) string) func(chaosResult) string {
				return func(c chaosResult) string {
					if a := v.get(c); a != nil {
						return f(a)
					}
					return "–"
				}
			}
			row(v.title, anon(func(a *anonOffResult) string {
				return fmt.Sprintf("%.1f%% (%d of %d)", 100*a.BadShare(), a.Bad, a.Total)
			}))
			row("… successful requests/s during the stop (failed / requests)", anon(func(a *anonOffResult) string {
				return fmt.Sprintf("%.0f (%d / %d)", a.OKRate, a.Failed, a.All)
			}))
			row("… balancer's `/readyz` answering 200", anon(func(a *anonOffResult) string {
				if a.ReadyzShare < 0 {
					return "n/a"
				}
				return fmt.Sprintf("%.0f%% of the time", 100*a.ReadyzShare)
			}))
		}
		w("\nextractedprism ran with `--drain-timeout %s`. ", epDrainTimout)
		w("haproxy treats SIGTERM as an immediate stop (its graceful stop is SIGUSR1) and nginx as a fast shutdown (graceful is SIGQUIT); SIGTERM is what the kubelet sends a static pod. ")
		w("In the silent-client scenario the stand-ins run with `--handshake-timeout %.0fs` (Go's `ReadHeaderTimeout`, which covers the TLS handshake; kube-apiserver uses 32 s), so each closes a silent connection after %.0f s; haproxy and nginx have no readiness endpoint of their own (n/a). ", silentHandshake.Seconds(), silentHandshake.Seconds())
		w("In the all-unready scenario only `/readyz` fails: haproxy checks `/healthz` (kubespray's setting), which a real kube-apiserver also fails while etcd is away, and nginx checks nothing, so neither reacts here.")
		if unreadyClientsOf(res) > 0 {
			w(" The one-unready scenario runs its own load, %d clients each opening a new TLS connection per request, %d requests/s each, so traffic flows on the unready upstream until the balancer avoids it.", unreadyClientsOf(res), unreadyRate)
		}
		if anonOffMeasured(res) {
			w(" With anonymous authentication off the stand-ins run `--anonymous-auth=false` and answer 401 with kube-apiserver's Status body to every request without credentials, health checks included; the load clients present a client certificate, like kubelets. haproxy's `/healthz` check then fails unless it sends a token, and nginx has no check to fail. The stopped upstream is SIGCONTed after %.0f s; the readiness share covers the 2 s of load before the stop and the stop.", anonOffStop.Seconds())
		}
		w("\n\n")
		w("Samples of the failed requests (time since the fault was injected, then how long the request took):\n\n")
		for _, s := range cs {
			for _, e := range res.Chaos[s].Errors {
				w("- %s: scenario error: %s\n", s, e)
			}
			for _, k := range []string{"kill", "rolling", "sigstop", "silent", "allunready", "anonoff", "anonoff-token"} {
				for _, f := range res.Chaos[s].Failures[k] {
					w("- %s, %s\n", s, f)
				}
			}
		}
		w("\n")
	}
	for s, notes := range res.Notes {
		for _, n := range notes {
			w("- %s: %s\n", s, n)
		}
	}

	w("\n## Conclusions\n\n")
	for _, c := range conclusions(res) {
		w("- %s\n", c)
	}
	w("\n## How the balancers were configured\n\n")
	w("Upstreams: three `bin/standin` processes on 127.0.20.1-3:16443 (Go net/http, TLS 1.3, ECDSA P-256). Balancers listen on 127.0.20.100.\n\n")
	w("- extractedprism: `extractedprism run --endpoints ... --health-interval %s --health-timeout %s --drain-timeout %s --log-level warn`, otherwise defaults.\n", healthEvery, healthEvery, epDrainTimout)
	w("- haproxy: kubespray's `haproxy.cfg` (mode tcp frontend, `balance leastconn`, `option httpchk GET /healthz`, `http-check expect status 200`, `check check-ssl verify none`, `retries 5`, `option redispatch`, `timeout connect 30s`, `timeout check 30s`, `slowstart 60s`, `maxconn 1000` per server), with `inter`/`downinter` shortened from 15 s to %s. Run in the foreground with `-db`; threads: haproxy's default (one per core).\n", healthEvery)
	w("- nginx: kubespray's `nginx.conf` (stream module, `least_conn`, `proxy_connect_timeout 1s`, `proxy_timeout 10m`, `worker_processes 2`, `worker_connections 16384`, `multi_accept on`).\n")
	w("- The load generator is in the same process for every set-up and uses HTTP/1.1 so that every client is one proxied connection.\n")
	return b.String()
}

func has(res results, s string) bool { return len(res.Runs[s]) > 0 }

// conclusions checks the project's goals against the figures.
func conclusions(res results) []string {
	var out []string
	ep, okE := res.Median[nameEP]
	ha, okH := res.Median[nameHA]
	d, okD := res.Median[nameDirect]
	okE, okH, okD = okE && has(res, nameEP), okH && has(res, nameHA), okD && has(res, nameDirect)
	if _, ok := res.Chaos[nameEP]; !okE && !ok {
		return []string{"extractedprism was not measured in this run."}
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "missed"
	}
	if okE && okH {
		var missed []string
		for _, g := range evalGoals(res) {
			if g.Status == goalNotMet {
				missed = append(missed, fmt.Sprintf("%s (%s vs %s %s)", g.Name, fmtNum(g.Figure, g.Prec), fmtNum(g.Reference, g.Prec), g.Unit))
			}
		}
		line := "Data-path goals (table at the top): none missed beyond the noise."
		if len(missed) > 0 {
			line = "Data-path goals missed (table at the top): " + strings.Join(missed, "; ") + "."
		}
		out = append(out, line,
			fmt.Sprintf("Keep-alive throughput with the Go load generator, against haproxy: ratio %s (%s vs %s req/s; p99 %.2f vs %.2f ms).", ratio(ep.KARps, ha.KARps), fmtNum(ep.KARps, 0), fmtNum(ha.KARps, 0), ep.KAP99ms, ha.KAP99ms),
		)
	}
	if okE && okD {
		bl := fmt.Sprintf("Bulk throughput at least 90%% of direct: %s (1 stream %s of direct, 4 streams %s", verdict(ep.Bulk1MBs >= 0.9*d.Bulk1MBs && ep.Bulk4MBs >= 0.9*d.Bulk4MBs), ratio(ep.Bulk1MBs, d.Bulk1MBs), ratio(ep.Bulk4MBs, d.Bulk4MBs))
		if okH {
			bl += fmt.Sprintf("; haproxy %s and %s", ratio(ha.Bulk1MBs, d.Bulk1MBs), ratio(ha.Bulk4MBs, d.Bulk4MBs))
		}
		if n, ok := res.Median[nameNginx]; ok && has(res, nameNginx) {
			bl += fmt.Sprintf(", nginx %s and %s", ratio(n.Bulk1MBs, d.Bulk1MBs), ratio(n.Bulk4MBs, d.Bulk4MBs))
		}
		bl += fmt.Sprintf("). With %d cores, the client's and the stand-ins' TLS already keep the CPUs busy, so every cycle a balancer spends comes out of the same budget; direct is an upper bound no proxy on this machine can reach.", res.Machine.Cores)
		out = append(out, bl)
	}
	if c, ok := res.Chaos[nameEP]; ok {
		out = append(out,
			fmt.Sprintf("Zero client-visible failures when an upstream is killed and in a rolling restart: %s (%d and %d failed requests; haproxy %s, nginx %s).", verdict(c.KillFailed == 0 && c.RollFailed == 0), c.KillFailed, c.RollFailed, chaosPair(res, nameHA), chaosPair(res, nameNginx)),
			fmt.Sprintf("No new connections to an upstream whose /readyz fails, after fall x interval: %s (%.0f%%; haproxy %s, nginx %s).", verdict(c.UnreadyShare == 0 && c.UnreadyFresh > 0), 100*c.UnreadyShare, unreadyOf(res, nameHA), unreadyOf(res, nameNginx)),
			fmt.Sprintf("A SIGSTOPped upstream costs no failed request once it is marked down (requests started %s or more after the SIGSTOP): %s (%d failed, %d slower than 1 s; over the whole 12 s %d failed, %d slow; haproxy %s, nginx %s).", stopGrace, verdict(c.StopLateFailed == 0), c.StopLateFailed, c.StopLateSlow, c.StopFailed, c.StopSlow, stopOf(res, nameHA), stopOf(res, nameNginx)),
			fmt.Sprintf("Streams survive SIGTERM until the drain timeout (%s): %s (median %.1f s, new connects refused from %s).", epDrainTimout, verdict(c.TermSurviveMedian >= epDrainTimout.Seconds()-1.5), c.TermSurviveMedian, refusedOf(c)),
		)
		if s := c.Silent; s != nil {
			out = append(out, fmt.Sprintf("%d silent clients mark no upstream down and `/readyz` stays 200: %s (200 %.0f%% of the time, %d upstreams marked down, %d of %d requests failed).",
				s.Clients, verdict(s.Downs == 0 && s.ReadyzShare == 1 && s.Failed == 0), 100*s.ReadyzShare, s.Downs, s.Failed, s.Total))
		}
		for _, a := range []*anonOffResult{c.AnonOff, c.AnonOffToken} {
			if a == nil {
				continue
			}
			how := "checking without credentials"
			if a.ProbeToken {
				how = "checking with a bearer token"
			}
			out = append(out, fmt.Sprintf("With anonymous authentication off, %s, a SIGSTOPped upstream costs no failed or slow request %.0f-%.0f s after the stop: %s (%d of %d; haproxy %s, nginx %s).",
				how, anonOffFrom.Seconds(), anonOffTo.Seconds(), verdict(a.Bad == 0 && a.Total > 0), a.Bad, a.Total, anonOffOf(res, nameHA, a.ProbeToken), anonOffOf(res, nameNginx, a.ProbeToken)))
		}
		if a := c.AllUnready; a != nil {
			out = append(out, fmt.Sprintf("Every upstream unready (an etcd outage) cuts no stream and fails no request: %s (%d of %d streams cut, %d of %d requests failed; haproxy %s, nginx %s).",
				verdict(a.Cut == 0 && a.Failed == 0 && a.Total > 0), a.Cut, a.Streams, a.Failed, a.Total, allUnreadyOf(res, nameHA), allUnreadyOf(res, nameNginx)))
		}
	}
	return out
}

// unreadyClientsOf is the new-connection clients of the unready scenario
// in res (0: results from before it had a load of its own).
func unreadyClientsOf(res results) int {
	for _, c := range res.Chaos {
		if c.UnreadyClients > 0 {
			return c.UnreadyClients
		}
	}
	return 0
}

func anonOffMeasured(res results) bool {
	for _, c := range res.Chaos {
		if c.AnonOff != nil || c.AnonOffToken != nil {
			return true
		}
	}
	return false
}

func anonOffOf(res results, s string, token bool) string {
	c, ok := res.Chaos[s]
	a := c.AnonOff
	if token {
		a = c.AnonOffToken
	}
	if !ok || a == nil {
		return "not measured"
	}
	return fmt.Sprintf("%d of %d", a.Bad, a.Total)
}

func allUnreadyOf(res results, s string) string {
	c, ok := res.Chaos[s]
	if !ok || c.AllUnready == nil {
		return "not measured"
	}
	return fmt.Sprintf("%d cut, %d failed", c.AllUnready.Cut, c.AllUnready.Failed)
}

func chaosPair(res results, s string) string {
	c, ok := res.Chaos[s]
	if !ok {
		return "not measured"
	}
	return fmt.Sprintf("%d and %d", c.KillFailed, c.RollFailed)
}

func unreadyOf(res results, s string) string {
	c, ok := res.Chaos[s]
	if !ok {
		return "not measured"
	}
	return fmt.Sprintf("%.0f%%", 100*c.UnreadyShare)
}

func stopOf(res results, s string) string {
	c, ok := res.Chaos[s]
	if !ok {
		return "not measured"
	}
	return fmt.Sprintf("%d failed, %d slow after %s and %d failed, %d slow overall", c.StopLateFailed, c.StopLateSlow, stopGrace, c.StopFailed, c.StopSlow)
}

func refusedOf(c chaosResult) string {
	if c.TermRefusedAfter < 0 {
		return "never"
	}
	return fmt.Sprintf("%.0f ms", c.TermRefusedAfter)
}

var setupColor = map[string]color.Color{
	nameDirect: color.RGBA{R: 0x99, G: 0x99, B: 0x99, A: 0xff},
	nameEP:     color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	nameHA:     color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
	nameNginx:  color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
}

// panel is one bar chart of the figure.
type panel struct {
	title  string
	labels []string
	values []float64
	ok     []bool
	prec   int
}

func renderChart(path string, res results) error {
	var panels []panel
	for _, mt := range metrics {
		if strings.HasPrefix(mt.title, "Keep-alive latency p50") || !mt.shown(res) {
			continue
		}
		p := panel{title: mt.short + " (" + mt.unit + ")", prec: mt.prec}
		if mt.higher {
			p.title += " ↑"
		} else {
			p.title += " ↓"
		}
		for _, s := range res.Setups {
			if s == nameDirect && !mt.direct {
				continue
			}
			p.labels = append(p.labels, s)
			p.values = append(p.values, mt.get(res.Median[s]))
			p.ok = append(p.ok, has(res, s))
		}
		panels = append(panels, p)
	}
	var cs []string
	for _, s := range []string{nameEP, nameHA, nameNginx} {
		if _, ok := res.Chaos[s]; ok {
			cs = append(cs, s)
		}
	}
	if len(cs) > 0 {
		add := func(title string, prec int, f func(chaosResult) float64) {
			p := panel{title: title, prec: prec}
			for _, s := range cs {
				p.labels = append(p.labels, s)
				p.values = append(p.values, f(res.Chaos[s]))
				p.ok = append(p.ok, true)
			}
			panels = append(panels, p)
		}
		add("Failed requests: upstream SIGKILL ↓", 0, func(c chaosResult) float64 { return float64(c.KillFailed) })
		add("Failed requests: rolling restart ↓", 0, func(c chaosResult) float64 { return float64(c.RollFailed) })
		add("% new conns to /readyz-500 upstream ↓", 0, func(c chaosResult) float64 { return 100 * c.UnreadyShare })
		add("Failed + slow (>1 s): upstream SIGSTOP ↓", 0, func(c chaosResult) float64 { return float64(c.StopFailed + c.StopSlow) })
		add("Streams alive after SIGTERM (s) ↑", 1, func(c chaosResult) float64 { return c.TermSurviveMedian })
		opt := func(title string, prec int, f func(chaosResult) (float64, bool)) {
			p := panel{title: title, prec: prec}
			// Only the balancers the figure exists for.
			for _, s := range cs {
				if v, ok := f(res.Chaos[s]); ok {
					p.labels = append(p.labels, s)
					p.values = append(p.values, v)
					p.ok = append(p.ok, true)
				}
			}
			if len(p.labels) > 0 {
				panels = append(panels, p)
			}
		}
		opt(fmt.Sprintf("%% /readyz 200, %d silent clients ↑", silentClients), 0, func(c chaosResult) (float64, bool) {
			if c.Silent == nil || c.Silent.ReadyzShare < 0 {
				return 0, false
			}
			return 100 * c.Silent.ReadyzShare, true
		})
		opt("% failed or slow: anon auth off + SIGSTOP ↓", 1, func(c chaosResult) (float64, bool) {
			if c.AnonOff == nil {
				return 0, false
			}
			return 100 * c.AnonOff.BadShare(), true
		})
		opt(fmt.Sprintf("Streams cut of %d: all upstreams unready ↓", allUnreadyStreams), 0, func(c chaosResult) (float64, bool) {
			if c.AllUnready == nil {
				return 0, false
			}
			return float64(c.AllUnready.Cut), true
		})
	}
	const cols = 4
	rows := (len(panels) + cols - 1) / cols
	plots := make([][]*plot.Plot, rows)
	for i := range plots {
		plots[i] = make([]*plot.Plot, cols)
	}
	for i, pn := range panels {
		pl, err := barPlot(pn)
		if err != nil {
			return err
		}
		plots[i/cols][i%cols] = pl
	}
	for r := range plots {
		for c := range plots[r] {
			if plots[r][c] == nil {
				plots[r][c] = plot.New()
				plots[r][c].HideAxes()
			}
		}
	}
	width, height := 16*vg.Inch, vg.Length(rows)*3.6*vg.Inch
	img := vgimg.NewWith(vgimg.UseWH(width, height), vgimg.UseDPI(96))
	dc := draw.New(img)
	title := fmt.Sprintf("extractedprism vs haproxy vs nginx vs direct (no balancer) — %s, %d cores, medians of %s runs; ↑ higher is better, ↓ lower is better", res.Machine.Date, res.Machine.Cores, res.Params["runs"])
	top := draw.Crop(dc, 0, 0, 0, -0.4*vg.Inch)
	tiles := draw.Tiles{Rows: rows, Cols: cols, PadX: 0.35 * vg.Inch, PadY: 0.35 * vg.Inch, PadTop: 0.1 * vg.Inch, PadBottom: 0.1 * vg.Inch, PadLeft: 0.1 * vg.Inch, PadRight: 0.1 * vg.Inch}
	canvases := plot.Align(plots, tiles, top)
	for r := range plots {
		for c := range plots[r] {
			plots[r][c].Draw(canvases[r][c])
		}
	}
	sty := draw.TextStyle{Color: color.Black, Font: plot.DefaultFont, Handler: plot.DefaultTextHandler, XAlign: draw.XCenter, YAlign: draw.YTop}
	sty.Font.Size = 16
	sty.Font.Typeface = plot.DefaultFont.Typeface
	dc.FillText(sty, vg.Point{X: width / 2, Y: height - 0.08*vg.Inch}, title)

	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("chart %s: %w", path, err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		_ = f.Close()
		return fmt.Errorf("chart %s: %w", path, err)
	}
	return f.Close()
}

func barPlot(pn panel) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = pn.title
	p.Title.TextStyle.Font.Size = 12
	p.Y.Min = 0
	p.Add(plotter.NewGrid())
	maxV := 0.0
	var xys plotter.XYs
	var labels []string
	for i, v := range pn.values {
		if !pn.ok[i] {
			continue
		}
		bc, err := plotter.NewBarChart(plotter.Values{v}, vg.Points(40))
		if err != nil {
			return nil, fmt.Errorf("bar %s/%s: %w", pn.title, pn.labels[i], err)
		}
		bc.XMin = float64(i)
		bc.Color = setupColor[pn.labels[i]]
		bc.LineStyle.Width = 0
		p.Add(bc)
		maxV = max(maxV, v)
		xys = append(xys, plotter.XY{X: float64(i), Y: v})
		labels = append(labels, fmtNum(v, pn.prec))
	}
	if maxV == 0 {
		maxV = 1
	}
	p.Y.Max = maxV * 1.18
	if len(xys) > 0 {
		lb, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: labels})
		if err != nil {
			return nil, fmt.Errorf("labels %s: %w", pn.title, err)
		}
		for i := range lb.TextStyle {
			lb.TextStyle[i].XAlign = draw.XCenter
			lb.TextStyle[i].YAlign = draw.YBottom
			lb.TextStyle[i].Font.Size = 11
		}
		p.Add(lb)
	}
	p.NominalX(pn.labels...)
	p.X.Tick.Label.Font.Size = 11
	return p, nil
}
