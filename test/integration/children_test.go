//go:build linux

package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// standinProc is a running stand-in apiserver process.
type standinProc struct {
	*proc
	name string
	addr string
}

// startStandin runs `standin --listen addr --name name` and waits for its
// "listening" line; addr may use port 0.
func startStandin(t testing.TB, name, addr string, extra ...string) *standinProc {
	t.Helper()
	args := append([]string{standinBin, "--listen", addr, "--name", name}, extra...)
	p := startProc(t, "standin "+name, nil, args...)
	prefix := "standin " + name + " listening on "
	p.waitOutput(prefix, startTimeout)
	line := p.stdout.String()
	line = line[strings.Index(line, prefix)+len(prefix):]
	if i := strings.IndexByte(line, '\n'); i >= 0 {
		line = line[:i]
	}
	return &standinProc{proc: p, name: name, addr: strings.TrimSpace(line)}
}

// startStandins starts n stand-ins named a, b, c, ... on ports below the
// ephemeral range, so that a stand-in restarted on its port finds it free;
// extra flags go to each.
func startStandins(t testing.TB, n int, extra ...string) []*standinProc {
	t.Helper()
	out := make([]*standinProc, n)
	for i := range n {
		out[i] = startStandin(t, string(rune('a'+i)), loopback(freePort(t)), extra...)
	}
	return out
}

func addrsOf(ss []*standinProc) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = s.addr
	}
	return out
}

// setReady switches the stand-in's health paths over its control API.
func (s *standinProc) setReady(t testing.TB, ready bool) {
	t.Helper()
	path := "/control/unready"
	if ready {
		path = "/control/ready"
	}
	s.control(t, path)
}

// control POSTs to a path of the stand-in's control API.
func (s *standinProc) control(t testing.TB, path string) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: insecureTLS(""), DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: waitTimeout}
	resp, err := c.Post("https://"+s.addr+path, "text/plain", nil)
	if err != nil {
		t.Fatalf("POST %s on standin %s: %v", path, s.name, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s on standin %s: %s", path, s.name, resp.Status)
	}
}

// daemonProc is a running extractedprism.
type daemonProc struct {
	*proc
	listen string // proxy address
	admin  string // admin address
}

// Probe settings used unless a test needs others: fast, so that state
// changes are seen within a few seconds, yet loose enough that a healthy
// stand-in on a loaded machine is not taken for a dead one (that would
// close its connections and fail clients).
const (
	probeInterval = time.Second
	probeTimeout  = time.Second
)

// startDaemon runs extractedprism on fresh loopback ports in front of
// endpoints, with fast probes, and waits until its admin server answers.
// extra flags come last and win.
func startDaemon(t testing.TB, endpoints []string, extra ...string) *daemonProc {
	t.Helper()
	return startDaemonWith(t, nil, endpoints, extra...)
}

// startDaemonWith is startDaemon with a command prefix (e.g. prlimit).
func startDaemonWith(t testing.TB, prefix, endpoints []string, extra ...string) *daemonProc {
	t.Helper()
	for attempt := 1; ; attempt++ {
		port, adminPort := freePort(t), freePort(t)
		args := []string{daemonBin,
			"--endpoints", strings.Join(endpoints, ","),
			"--bind-address", "127.0.0.1", "--bind-port", strconv.Itoa(port),
			"--health-port", strconv.Itoa(adminPort),
			"--health-interval", probeInterval.String(), "--health-timeout", probeTimeout.String(),
			"--state-file", "", "--log-level", "info",
		}
		args = append(args, extra...)
		d := &daemonProc{listen: loopback(port), admin: loopback(adminPort)}
		d.proc = startProc(t, "extractedprism", nil, append(slices.Clone(prefix), args...)...)
		err := d.waitAdmin()
		if err == nil {
			return d
		}
		// Another process may have taken a port between the check and
		// the bind; try new ports then.
		if attempt < 3 && strings.Contains(d.out.String(), "address already in use") {
			continue
		}
		t.Fatalf("extractedprism did not come up: %v", err)
	}
}

// startDaemonArgs runs extractedprism with exactly args (the caller sets
// addresses, e.g. in a config file) and waits for the admin server.
func startDaemonArgs(t testing.TB, listen, admin string, args ...string) *daemonProc {
	t.Helper()
	d := &daemonProc{listen: listen, admin: admin}
	d.proc = startProc(t, "extractedprism", nil, append([]string{daemonBin}, args...)...)
	if err := d.waitAdmin(); err != nil {
		t.Fatalf("extractedprism did not come up: %v", err)
	}
	return d
}

// waitAdmin waits until /healthz answers at all.
func (d *daemonProc) waitAdmin() error {
	deadline := time.Now().Add(startTimeout)
	for {
		if _, _, err := d.get("/healthz"); err == nil {
			return nil
		}
		if d.exited() {
			return fmt.Errorf("exited with %v", d.state)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("admin %s not answering after %s", d.admin, startTimeout)
		}
		time.Sleep(pollEvery)
	}
}

// get does GET http://admin<path> on a fresh connection.
func (d *daemonProc) get(path string) (int, string, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + d.admin + path)
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// status fetches and decodes /status.
func (d *daemonProc) status(t testing.TB) status.Document {
	t.Helper()
	doc, err := d.tryStatus()
	if err != nil {
		t.Fatalf("GET /status: %v", err)
	}
	return doc
}

func (d *daemonProc) tryStatus() (status.Document, error) {
	var doc status.Document
	code, body, err := d.get("/status")
	if err != nil {
		return doc, err
	}
	if code != http.StatusOK {
		return doc, fmt.Errorf("/status answered %d: %s", code, body)
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		return doc, fmt.Errorf("/status: %w in %q", err, body)
	}
	return doc, nil
}

// upstreamState returns the state of addr in /status ("" if absent).
func (d *daemonProc) upstreamState(addr string) (string, status.Document, error) {
	doc, err := d.tryStatus()
	if err != nil {
		return "", doc, err
	}
	for _, u := range doc.Upstreams {
		if u.Address == addr {
			return u.State, doc, nil
		}
	}
	return "", doc, nil
}

// waitState waits until addr has state want in /status and returns how
// long that took.
func (d *daemonProc) waitState(t testing.TB, addr, want string, timeout time.Duration) time.Duration {
	t.Helper()
	return waitFor(t, timeout, fmt.Sprintf("upstream %s to be %s", addr, want), func() (bool, string) {
		st, doc, err := d.upstreamState(addr)
		if err != nil {
			return false, err.Error()
		}
		return st == want, fmt.Sprintf("%+v", doc.Upstreams)
	})
}

// waitReady waits until /readyz answers 200.
func (d *daemonProc) waitReady(t testing.TB) {
	t.Helper()
	waitFor(t, startTimeout, "extractedprism /readyz 200", func() (bool, string) {
		code, body, err := d.get("/readyz")
		if err != nil {
			return false, err.Error()
		}
		return code == http.StatusOK, fmt.Sprintf("%d %s", code, body)
	})
}

// waitAllUp waits until every addr is up in /status.
func (d *daemonProc) waitAllUp(t testing.TB, addrs []string) {
	t.Helper()
	for _, a := range addrs {
		d.waitState(t, a, "up", startTimeout)
	}
}
