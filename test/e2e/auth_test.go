package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// The bounds of the default probe settings (interval 2 s ±20 % jitter,
// timeout 2 s, fall 2; README "Why 2 s / 2 s probe defaults"), and the
// slack a loaded machine gets on top.
const (
	// authHungBound: a hung apiserver leaves rotation within
	// fall × (interval × 1.2 + timeout).
	authHungBound = 8800 * time.Millisecond
	// authUnreadyBound: an apiserver answering /readyz with 500 leaves
	// within fall × interval × 1.2.
	authUnreadyBound = 4400 * time.Millisecond
	authBoundSlack   = 3 * time.Second
)

// unknown401 is what /status says of an upstream that answers the probes'
// /readyz with 401.
const unknown401 = "readiness unknown: 401 Unauthorized"

// shutdownDelay keeps a terminating apiserver serving for 30 s with its
// /readyz answering 500 from the SIGTERM on: a real apiserver that is alive
// and says it is not ready.
const shutdownDelay = "--shutdown-delay-duration=30s"

// startAuthCluster starts three apiservers with extra flags and waits for
// them to be ready (the harness checks readiness with the admin token,
// which every authentication mode here accepts).
func startAuthCluster(t *testing.T, extra ...string) []*apiserver {
	t.Helper()
	as := make([]*apiserver, len(apiserverIPs))
	for i, ip := range apiserverIPs {
		as[i] = env.RunAPIServer(t, ip, extra...)
	}
	env.WaitReady(t, as...)
	return as
}

// TestAuthAnonymousOff runs extractedprism in front of three real
// apiservers started with --anonymous-auth=false (CIS 1.2.1): without probe
// credentials every upstream is alive with its readiness unknown and still
// leaves rotation when it hangs; with a service account token or a client
// certificate readiness is checked. The cluster is started once for the
// three subtests.
func TestAuthAnonymousOff(t *testing.T) {
	as := startAuthCluster(t, append([]string{shutdownDelay}, anonymousOff...)...)
	// healthy restarts whatever apiserver a subtest ended (as part of the
	// cluster, so it lives as long as the cluster) and waits for all.
	healthy := func() {
		for _, a := range as {
			if !a.P.Running() {
				env.RerunAPIServer(t, a)
			}
		}
		env.WaitReady(t, as...)
	}
	for _, c := range []struct {
		name string
		f    func(*testing.T, []*apiserver)
	}{
		{"NoCredentials", testNoProbeCredentials},
		{"BearerToken", testProbeBearerToken},
		{"ClientCertificate", testProbeClientCertificate},
	} {
		healthy()
		t.Run(c.name, func(t *testing.T) { c.f(t, as) })
	}
}

// TestAuthAnonymousHealthOnly runs extractedprism without probe
// credentials in front of apiservers whose AuthenticationConfiguration
// allows anonymous requests of /livez, /readyz and /healthz only: the
// probes read /readyz, so readiness is checked and an unready apiserver
// leaves within the unready bound, while an anonymous request of anything
// else through the balancer is still refused.
func TestAuthAnonymousHealthOnly(t *testing.T) {
	as := startAuthCluster(t, append([]string{shutdownDelay}, env.anonymousHealthOnly(t)...)...)
	d := env.startDaemon(t, healthDaemonArgs(as)...)
	_, upAt := waitReadiness(t, d, as, "")
	assertReadinessMetric(t, as, 0)
	assertAdminReadyz(t)

	codes := map[string]int{}
	for _, path := range []string{"/api", "/readyz", "/livez"} {
		code, err := anonymousGet(proxyAddr, path)
		if err != nil {
			t.Fatalf("anonymous GET %s through extractedprism: %v", path, err)
		}
		codes[path] = code
	}
	if codes["/api"] != http.StatusUnauthorized {
		t.Errorf("anonymous GET /api through extractedprism answered %d, want 401: only the health paths are open to anonymous requests", codes["/api"])
	}
	if codes["/readyz"] != http.StatusOK || codes["/livez"] != http.StatusOK {
		t.Errorf("anonymous GET /readyz, /livez through extractedprism answered %d, %d, want 200", codes["/readyz"], codes["/livez"])
	}
	if n := strings.Count(runLog(d), unknown401); n != 0 {
		t.Errorf("the log says %q %d times with anonymous access to the health paths", unknown401, n)
	}

	victim := as[1]
	detect, reason := unreadyLeaves(t, d, victim)
	assertAdminReadyz(t)
	summary := fmt.Sprintf("auth, anonymous only on /livez /readyz /healthz (AuthenticationConfiguration), no probe credentials: every upstream up with readiness checked %s after start; anonymous GET /api %d, /readyz %d, /livez %d through extractedprism; terminating apiserver (/readyz 500) marked down %s after SIGTERM (bound %s), reason %q",
		upAt.Sub(d.start).Round(time.Millisecond), codes["/api"], codes["/readyz"], codes["/livez"],
		detect.Round(time.Millisecond), authUnreadyBound, reason)
	env.Record("%s", summary)
	t.Log(summary)
	if detect > authUnreadyBound+authBoundSlack {
		t.Errorf("the unready apiserver was marked down %s after SIGTERM, want within %s (+%s slack)", detect, authUnreadyBound, authBoundSlack)
	}
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}
}

// testNoProbeCredentials: every apiserver answers the probes 401, so each
// is up with its readiness unknown, the balancer is ready, status, metrics
// and the log say so (the log once per upstream, with the fix), kubectl
// with a client certificate works through the balancer, and a SIGSTOPped
// apiserver still leaves rotation within the hung bound while kubectl
// keeps working.
func testNoProbeCredentials(t *testing.T, as []*apiserver) {
	d := env.startDaemon(t, healthDaemonArgs(as)...)
	_, upAt := waitReadiness(t, d, as, unknown401)
	assertAdminReadyz(t)
	assertReadinessMetric(t, as, 1)

	// extractedprism status: exit 0 (ready) and the reason on each row.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	out, err := exec.CommandContext(ctx, env.daemon, "status", "--address", adminAddr).CombinedOutput()
	cancel()
	if err != nil {
		t.Fatalf("extractedprism status: %v\n%s", err, out)
	}
	if n := strings.Count(string(out), "readiness unknown"); n < len(as) {
		t.Errorf("extractedprism status says \"readiness unknown\" %d times, want once per upstream and more:\n%s", n, out)
	}

	// kubectl with a client certificate, through the balancer.
	cert, key, err := env.clientCert("e2e-admin", "e2e-admin", "system:masters")
	if err != nil {
		t.Fatal(err)
	}
	kc, err := env.CertKubeconfig("e2e-admin-cert", "https://"+proxyAddr, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	kctx, kcancel := context.WithTimeout(context.Background(), time.Minute)
	got, err := env.KubectlWith(kctx, kc, "", "get", "namespaces", "-o", "name")
	kcancel()
	if err != nil || !strings.Contains(got, "namespace/default") {
		t.Fatalf("kubectl with a client certificate through extractedprism: %q %v", got, err)
	}
	if code, err := anonymousGet(proxyAddr, "/api"); err != nil || code != http.StatusUnauthorized {
		t.Errorf("anonymous GET /api through extractedprism: %d %v, want 401", code, err)
	}

	// The warning, once per upstream, naming the fix.
	logs := runLog(d)
	for _, a := range as {
		n := 0
		for line := range strings.Lines(logs) {
			if strings.Contains(line, "level=WARN") && strings.Contains(line, "upstream="+a.Addr()+" ") &&
				strings.Contains(line, `answer="`+unknown401+`"`) {
				n++
				if !strings.Contains(line, "probe.bearer_token_file") || !strings.Contains(line, "anonymous.conditions") {
					t.Errorf("the warning does not name the fix: %s", line)
				}
			}
		}
		if n != 1 {
			t.Errorf("the log warns of %s's unknown readiness %d times, want once", a.Addr(), n)
		}
	}

	// SIGSTOP one apiserver under kubectl load (client certificate).
	load := env.startLoadWith(t, func(ctx context.Context) error {
		_, err := env.KubectlWith(ctx, kc, "", "get", "configmaps", "-n", "default", "-o", "name")
		return err
	})
	started := time.Now()
	waitRuns(t, load, started, 3)
	victim := as[2]
	stopped := time.Now()
	victim.P.Signal(syscall.SIGSTOP)
	t.Cleanup(func() { victim.P.Signal(syscall.SIGCONT) })
	downDoc, downAt := d.waitStatus(t, "the stopped apiserver down", 2*time.Minute, func(doc status.Document) bool {
		u, ok := upstream(doc, victim.Addr())
		return ok && u.State == "down"
	})
	detect := downAt.Sub(stopped)
	downUp, _ := upstream(downDoc, victim.Addr())
	assertAdminReadyz(t)
	waitRuns(t, load, downAt, 5)
	load.stop()
	runs := splitRuns(load, stopped)
	before, straddled, after := runs[0], runs[1], runs[2]
	slowest := slowestRun(load, stopped)

	cont := time.Now()
	victim.P.Signal(syscall.SIGCONT)
	_, backAt := d.waitStatus(t, "the continued apiserver up", 2*time.Minute, func(doc status.Document) bool {
		u, ok := upstream(doc, victim.Addr())
		return ok && u.State == "up" && u.ReadinessUnknown == unknown401
	})

	summary := fmt.Sprintf("auth, --anonymous-auth=false, no probe credentials: every upstream up with %q %s after start; SIGSTOPped apiserver marked down %s after the stop (bound %s), reason %q; kubectl (client certificate) through extractedprism: %d of %d before the stop failed, %d of %d started after it failed (slowest %s), %d of %d in flight at the stop failed; SIGCONT -> up again %s",
		unknown401, upAt.Sub(d.start).Round(time.Millisecond), detect.Round(time.Millisecond), authHungBound, downUp.Reason,
		len(before.failed), before.total, len(after.failed), after.total, slowest.Round(time.Millisecond),
		len(straddled.failed), straddled.total, backAt.Sub(cont).Round(time.Millisecond))
	env.Record("%s", summary)
	t.Log(summary)
	for _, f := range append(append(before.failed, straddled.failed...), after.failed...) {
		t.Logf("failed: %s", f)
	}
	if detect > authHungBound+authBoundSlack {
		t.Errorf("the SIGSTOPped apiserver was marked down %s after the stop, want within %s (+%s slack)", detect, authHungBound, authBoundSlack)
	}
	// A command in flight at the stop may have its request on the stopped
	// apiserver after its first byte, where nothing can move it; every
	// command started afterwards must work.
	if len(before.failed) > 0 || len(after.failed) > 0 {
		t.Errorf("kubectl through extractedprism failed %d of %d times before and %d of %d times after an apiserver was stopped",
			len(before.failed), before.total, len(after.failed), after.total)
	}
	if after.total < 5 {
		t.Errorf("only %d kubectl commands started after the stop", after.total)
	}
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}
}

// probeServiceAccount is the ServiceAccount whose token the probes send,
// as the DaemonSet's projected token would be.
const probeServiceAccount = `apiVersion: v1
kind: ServiceAccount
metadata:
  name: extractedprism-probe
  namespace: kube-system
`

// testProbeBearerToken: a service account token (TokenRequest API) in
// --probe-bearer-token-file is sent only to apiservers verified against
// --probe-ca-file; then readiness is checked, and an apiserver that turns
// unready (terminating, /readyz 500) leaves within the unready bound.
func testProbeBearerToken(t *testing.T, as []*apiserver) {
	env.MustKubectl(t, as[0].Addr(), probeServiceAccount, "apply", "-f", "-")
	token := strings.TrimSpace(env.MustKubectl(t, as[0].Addr(), "", "create", "token", "extractedprism-probe", "-n", "kube-system", "--duration=1h"))
	if strings.Count(token, ".") != 2 {
		t.Fatalf("kubectl create token printed %q, not a JWT", token)
	}
	tokenFile := filepath.Join(env.Dir, "probe-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// Without verification the token is not sent: readiness stays unknown.
	d := env.startDaemon(t, append(healthDaemonArgs(as), "--probe-bearer-token-file="+tokenFile, "--probe-ca-file=none")...)
	waitReadiness(t, d, as, unknown401)
	if !strings.Contains(runLog(d), "the token is not sent") {
		t.Errorf("the log does not say that the token is not sent without verification:\n%s", d.p.Tail(20))
	}
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}

	d = env.startDaemon(t, append(healthDaemonArgs(as), "--probe-bearer-token-file="+tokenFile, "--probe-ca-file="+env.CA.File)...)
	_, upAt := waitReadiness(t, d, as, "")
	assertReadinessMetric(t, as, 0)
	assertAdminReadyz(t)

	victim := as[1]
	detect, reason := unreadyLeaves(t, d, victim)
	assertAdminReadyz(t)
	summary := fmt.Sprintf("auth, --anonymous-auth=false, service account token (--probe-bearer-token-file, --probe-ca-file): not sent without verification (%q); with it every upstream up with readiness checked %s after start; terminating apiserver (/readyz 500) marked down %s after SIGTERM (bound %s), reason %q",
		unknown401, upAt.Sub(d.start).Round(time.Millisecond), detect.Round(time.Millisecond), authUnreadyBound, reason)
	env.Record("%s", summary)
	t.Log(summary)
	if detect > authUnreadyBound+authBoundSlack {
		t.Errorf("the unready apiserver was marked down %s after SIGTERM, want within %s (+%s slack)", detect, authUnreadyBound, authBoundSlack)
	}
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}
	// End the terminating apiserver's shutdown delay; the cluster starts it
	// again for the next subtest.
	victim.P.Kill()
}

// testProbeClientCertificate: a client certificate signed by the cluster's
// client CA, as a node's kubelet certificate is, makes readiness checkable,
// and an apiserver that turns unready leaves within the unready bound.
func testProbeClientCertificate(t *testing.T, as []*apiserver) {
	cert, key, err := env.clientCert("probe-node", "system:node:e2e", "system:nodes")
	if err != nil {
		t.Fatal(err)
	}
	d := env.startDaemon(t, append(healthDaemonArgs(as), "--probe-client-cert-file="+cert, "--probe-client-key-file="+key)...)
	_, upAt := waitReadiness(t, d, as, "")
	assertReadinessMetric(t, as, 0)
	assertAdminReadyz(t)

	victim := as[0]
	detect, reason := unreadyLeaves(t, d, victim)
	assertAdminReadyz(t)
	summary := fmt.Sprintf("auth, --anonymous-auth=false, client certificate system:node:e2e (--probe-client-cert-file, --probe-client-key-file): every upstream up with readiness checked %s after start; terminating apiserver (/readyz 500) marked down %s after SIGTERM (bound %s), reason %q",
		upAt.Sub(d.start).Round(time.Millisecond), detect.Round(time.Millisecond), authUnreadyBound, reason)
	env.Record("%s", summary)
	t.Log(summary)
	if detect > authUnreadyBound+authBoundSlack {
		t.Errorf("the unready apiserver was marked down %s after SIGTERM, want within %s (+%s slack)", detect, authUnreadyBound, authBoundSlack)
	}
	victim.P.Kill()
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
	}
}

// waitReadiness waits until every apiserver is an up upstream whose
// readiness note contains want, or, with want "", has no note (readiness
// checked). It returns the document and when it first held.
func waitReadiness(t *testing.T, d *daemon, as []*apiserver, want string) (status.Document, time.Time) {
	t.Helper()
	what := "every upstream up with readiness checked"
	if want != "" {
		what = fmt.Sprintf("every upstream up with %q", want)
	}
	return d.waitStatus(t, what, 2*time.Minute, func(doc status.Document) bool {
		if !doc.Ready || len(doc.Upstreams) != len(as) {
			return false
		}
		for _, a := range as {
			u, ok := upstream(doc, a.Addr())
			if !ok || u.State != "up" {
				return false
			}
			if (want == "" && u.ReadinessUnknown != "") || (want != "" && !strings.Contains(u.ReadinessUnknown, want)) {
				return false
			}
		}
		return true
	})
}

// unreadyLeaves sends SIGTERM to a, an apiserver started with
// shutdownDelay: it goes on serving with /readyz answering 500. It returns
// how long after the signal extractedprism marked it down, and the reason
// /status gives.
func unreadyLeaves(t *testing.T, d *daemon, a *apiserver) (time.Duration, string) {
	t.Helper()
	term := time.Now()
	a.P.Signal(syscall.SIGTERM)
	doc, downAt := d.waitStatus(t, a.IP+" down", 2*time.Minute, func(doc status.Document) bool {
		u, ok := upstream(doc, a.Addr())
		return ok && u.State == "down"
	})
	if !a.P.Running() || !env.Answers(a) {
		t.Errorf("%s no longer serves %s after SIGTERM: the test wanted an unready apiserver, not a gone one", a.P.Name, time.Since(term).Round(time.Millisecond))
	}
	u, _ := upstream(doc, a.Addr())
	reason := u.Reason
	if reason == "" {
		reason = u.LastError
	}
	return downAt.Sub(term), reason
}

// assertAdminReadyz checks that extractedprism's /readyz answers 200.
func assertAdminReadyz(t *testing.T) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + adminAddr + "/readyz")
	if err != nil {
		t.Fatalf("GET /readyz: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("extractedprism /readyz answered %d %q, want 200", resp.StatusCode, strings.TrimSpace(string(body)))
	}
}

// assertReadinessMetric checks extractedprism_upstream_readiness_unknown of
// every apiserver.
func assertReadinessMetric(t *testing.T, as []*apiserver, want float64) {
	t.Helper()
	got, err := upstreamSeries("extractedprism_upstream_readiness_unknown")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range as {
		if v, ok := got[a.Addr()]; !ok || v != want {
			t.Errorf("extractedprism_upstream_readiness_unknown{upstream=%q} = %v (listed %v), want %v", a.Addr(), v, ok, want)
		}
	}
}

// upstreamSeries reads a gauge from /metrics, by its upstream label.
func upstreamSeries(name string) (map[string]float64, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + adminAddr + "/metrics")
	if err != nil {
		return nil, fmt.Errorf("GET /metrics: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name+"{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			return nil, fmt.Errorf("/metrics: %q", line)
		}
		_, addr, ok := strings.Cut(labels, `upstream="`)
		if !ok {
			continue
		}
		addr, _, _ = strings.Cut(addr, `"`)
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return nil, fmt.Errorf("/metrics: %q: %w", line, err)
		}
		out[addr] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read /metrics: %w", err)
	}
	return out, nil
}

// anonymousGet sends GET path to server (host:port) over HTTPS without
// credentials and returns the status code.
func anonymousGet(server, path string) (int, error) {
	c := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: env.CA.Pool, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
		},
	}
	resp, err := c.Get("https://" + server + path)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

// runLog returns the log of d's run (the harness appends every run of a
// name to one file, each after a "=== " header line).
func runLog(d *daemon) string {
	b, err := os.ReadFile(d.p.Log)
	if err != nil {
		return ""
	}
	s := string(b)
	if i := strings.LastIndex(s, "\n=== "); i >= 0 {
		s = s[i+1:]
	}
	return s
}

// waitRuns waits until n commands of l started at or after since have
// finished.
func waitRuns(t *testing.T, l *loadLoop, since time.Time, n int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if total, _ := l.between(since, time.Now()); total >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d kubectl commands finished within 3 minutes", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runCount is a number of load commands and their failures.
type runCount struct {
	total  int
	failed []string
}

// splitRuns sorts the commands of l into those that ended before at, those
// in flight at it, and those that started after it.
func splitRuns(l *loadLoop, at time.Time) [3]runCount {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out [3]runCount
	for _, r := range l.runs {
		i := 1
		switch {
		case r.end.Before(at):
			i = 0
		case !r.start.Before(at):
			i = 2
		}
		out[i].total++
		if r.err != nil {
			out[i].failed = append(out[i].failed, fmt.Sprintf("%s: %v", r.start.Format("15:04:05.000"), r.err))
		}
	}
	return out
}

// slowestRun is the longest command of l started at or after since.
func slowestRun(l *loadLoop, since time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var longest time.Duration
	for _, r := range l.runs {
		if !r.start.Before(since) && r.end.Sub(r.start) > longest {
			longest = r.end.Sub(r.start)
		}
	}
	return longest
}
