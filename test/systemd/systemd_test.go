//go:build systemdtest

// This file installs the .deb into a Debian system booted with a real
// systemd (systemd-nspawn) and checks what an operator sees: readiness,
// reload, restart and upgrade without a refused connect, the watchdog, the
// sandbox score, and a clean purge. Run it with make systemd-test (root,
// debootstrap and systemd-container needed).

package systemd_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

var (
	repoDir    = flag.String("repo", "../..", "repository root")
	distDir    = flag.String("dist", "", "directory with the built .deb (default REPO/dist)")
	standinBin = flag.String("standin", "", "stand-in apiserver binary (default REPO/bin/standin)")
	nfpmBin    = flag.String("nfpm", "", "nfpm binary, to build the upgrade package (default REPO/bin/nfpm)")
)

// maxExposure is the highest systemd-analyze security score accepted ("OK").
const maxExposure = 2.0

var debArch = map[string]string{"amd64": "amd64", "arm64": "arm64"}

type env struct {
	t         *testing.T
	c         *container
	proxy     string // 127.0.0.1:port clients use
	admin     string // 127.0.0.1:port of /readyz, /status
	http      *http.Client
	proxyPort int
	adminPort int
}

// config is the daemon configuration the test installs.
func (e *env) config(endpoints ...standin) string {
	var eps []string
	for _, s := range endpoints {
		eps = append(eps, strconv.Quote(s.addr))
	}
	return fmt.Sprintf(`# written by the systemd test
listen:
  address: 127.0.0.1
  port: %d
admin:
  port: %d
endpoints: [%s]
probe:
  interval: 1s
  timeout: 500ms
  rise: 1
  fall: 2
proxy:
  drain_timeout: 10s
`, e.proxyPort, e.adminPort, strings.Join(eps, ", "))
}

func (e *env) readyz() (int, error) {
	resp, err := e.http.Get("http://" + e.admin + "/readyz")
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

func (e *env) status() (status.Document, error) {
	var doc status.Document
	resp, err := e.http.Get("http://" + e.admin + "/status")
	if err != nil {
		return doc, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return doc, fmt.Errorf("/status answered %s", resp.Status)
	}
	return doc, json.NewDecoder(resp.Body).Decode(&doc)
}

func addresses(doc status.Document) []string {
	var a []string
	for _, u := range doc.Upstreams {
		a = append(a, u.Address)
	}
	slices.Sort(a)
	return a
}

func sortedAddrs(ss ...standin) []string {
	var a []string
	for _, s := range ss {
		a = append(a, s.addr)
	}
	slices.Sort(a)
	return a
}

// servedBy sends n requests through the proxy and returns who answered.
func (e *env) servedBy(n int) map[string]int {
	e.t.Helper()
	seen := map[string]int{}
	for range n {
		name, err := requestThrough(context.Background(), e.proxy)
		if err != nil {
			e.t.Fatalf("request through %s: %v", e.proxy, err)
		}
		seen[name]++
	}
	return seen
}

func (e *env) mainPID() string {
	e.t.Helper()
	return e.c.show("extractedprism.service", "MainPID")["MainPID"]
}

var exposureRE = regexp.MustCompile(`Overall exposure level for extractedprism\.service: ([0-9.]+) (\S+)`)

func exposure(t *testing.T, out string) float64 {
	t.Helper()
	m := exposureRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no overall exposure level in:\n%s", out)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func step(t *testing.T, format string, args ...any) {
	t.Helper()
	t.Logf("=== "+format, args...)
}

func findDeb(t *testing.T, dir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "extractedprism_*_"+debArch[runtime.GOARCH]+".deb"))
	if len(m) != 1 {
		t.Fatalf("want exactly one extractedprism_*_%s.deb in %s, found %q (run make packages)", debArch[runtime.GOARCH], dir, m)
	}
	return m[0]
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// buildUpgrade builds the same package with a higher version, as a later
// release would be, with nfpm from the repository's nfpm.yaml.
func buildUpgrade(t *testing.T, repo, deb, outDir string) (string, string) {
	t.Helper()
	out, err := exec.Command("dpkg-deb", "-f", deb, "Version").Output()
	if err != nil {
		t.Fatal(err)
	}
	version := strings.TrimSuffix(strings.TrimSpace(string(out)), "-1") + ".1"
	// nfpm.yaml takes the binary staged for one architecture.
	copyFile(t, filepath.Join(repo, "dist/build/linux-"+runtime.GOARCH+"/extractedprism"), filepath.Join(repo, "dist/build/extractedprism"))
	cmd := exec.Command(*nfpmBin, "package", "--config", "nfpm.yaml", "--packager", "deb", "--target", outDir+"/")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "GOARCH="+runtime.GOARCH, "PKG_VERSION="+version)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nfpm: %v\n%s", err, b)
	}
	return findDeb(t, outDir), version + "-1"
}

func TestPackageUnderSystemd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (systemd-nspawn)")
	}
	for _, tool := range []string{"systemd-nspawn", "nsenter", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (apt-get install systemd-container util-linux dpkg): %v", tool, err)
		}
	}
	repo, err := filepath.Abs(*repoDir)
	if err != nil {
		t.Fatal(err)
	}
	if *distDir == "" {
		*distDir = filepath.Join(repo, "dist")
	}
	if *standinBin == "" {
		*standinBin = filepath.Join(repo, "bin/standin")
	}
	if *nfpmBin == "" {
		*nfpmBin = filepath.Join(repo, "bin/nfpm")
	}

	// Packages are handed to the container through a read-only bind mount.
	pkgDir := t.TempDir()
	deb := findDeb(t, *distDir)
	copyFile(t, deb, filepath.Join(pkgDir, filepath.Base(deb)))
	if err := os.Mkdir(filepath.Join(pkgDir, "upgrade"), 0o755); err != nil {
		t.Fatal(err)
	}
	upDeb, upVersion := buildUpgrade(t, repo, deb, filepath.Join(pkgDir, "upgrade"))

	a := startStandin(t, *standinBin, "a")
	b := startStandin(t, *standinBin, "b")
	sc := startStandin(t, *standinBin, "c")

	rootfs := ensureRootfs(t, filepath.Join(repo, ".cache/systemd-test"))
	step(t, "boot %s with systemd-nspawn", rootfs)
	bootStart := time.Now()
	c := bootContainer(t, rootfs, pkgDir)
	t.Logf("container booted in %v", time.Since(bootStart).Round(time.Millisecond))
	e := &env{t: t, c: c, http: &http.Client{Timeout: 10 * time.Second},
		proxyPort: freePort(t), adminPort: freePort(t)}
	e.proxy = fmt.Sprintf("127.0.0.1:%d", e.proxyPort)
	e.admin = fmt.Sprintf("127.0.0.1:%d", e.adminPort)
	t.Cleanup(func() {
		if t.Failed() {
			j := c.journal("extractedprism.service", "extractedprism.socket")
			var notable []string
			for _, l := range strings.Split(j, "\n") {
				if strings.Contains(l, "systemd[1]") || strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
					notable = append(notable, l)
				}
			}
			t.Logf("journal of extractedprism, systemd and WARN/ERROR lines:\n%s\nlast lines:\n%s",
				tail(strings.Join(notable, "\n"), 120), tail(j, 30))
		}
	})

	step(t, "install %s", filepath.Base(deb))
	c.must("apt-get", "install", "-y", "-q", "/pkgs/"+filepath.Base(deb))
	for _, u := range []string{"extractedprism.service", "extractedprism.socket"} {
		p := c.show(u, "UnitFileState", "ActiveState")
		if p["UnitFileState"] != "enabled" || p["ActiveState"] != "inactive" {
			t.Fatalf("after install %s is %v; want enabled and inactive (not started unconfigured)", u, p)
		}
	}

	c.writeFile("/etc/systemd/system/extractedprism.socket.d/ports.conf", fmt.Sprintf(
		"[Socket]\nListenStream=\nListenStream=%s\nListenStream=%s\n", e.proxy, e.admin))
	c.must("systemctl", "daemon-reload")
	checkUnconfiguredStart(t, c)

	step(t, "configure (upstreams a, b; proxy %s, admin %s) and systemctl enable --now", e.proxy, e.admin)
	c.writeFile("/etc/extractedprism/config.yaml", e.config(a, b))
	start := time.Now()
	c.must("systemctl", "enable", "--now", "extractedprism.service")
	t.Logf("systemctl enable --now returned after %v", time.Since(start).Round(time.Millisecond))
	// Type=notify: the start job ends at READY=1, which must mean ready.
	if code, err := e.readyz(); err != nil || code != http.StatusOK {
		t.Fatalf("right after systemctl start returned: /readyz = %d, %v; want 200", code, err)
	}
	doc, err := e.status()
	if err != nil || !doc.Ready || doc.Listen != e.proxy {
		t.Fatalf("right after start: /status ready=%v listen=%q (%v); want ready on %s", doc.Ready, doc.Listen, err, e.proxy)
	}
	svc := c.show("extractedprism.service", "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
	if svc["ActiveState"] != "active" || svc["SubState"] != "running" || !strings.Contains(svc["StatusText"], "upstreams healthy") {
		t.Fatalf("service %v; want active/running with a STATUS= line about upstreams", svc)
	}
	t.Logf("service: %v", svc)
	if p := c.show("extractedprism.socket", "ActiveState"); p["ActiveState"] != "active" {
		t.Fatalf("socket unit %v, want active (started with the service)", p)
	}
	journal := c.journal("extractedprism.service")
	for _, what := range []string{"what=listen address=" + e.proxy, "what=admin address=" + e.admin} {
		if !strings.Contains(journal, "using socket-activated listener") || !strings.Contains(journal, what) {
			t.Errorf("journal lacks \"using socket-activated listener\" with %q: the daemon bound its own socket", what)
		}
	}
	uid := c.must("sh", "-c", `awk '/^Uid:/ {print $2}' /proc/$1/status`, "sh", svc["MainPID"])
	if strings.TrimSpace(uid) == "0" || strings.TrimSpace(uid) == "" {
		t.Errorf("daemon runs as uid %q, want an unprivileged dynamic user", uid)
	}

	step(t, "traffic through %s", e.proxy)
	if seen := e.servedBy(40); len(seen) != 2 || seen["a"] == 0 || seen["b"] == 0 {
		t.Fatalf("40 requests were answered by %v, want both a and b", seen)
	}

	step(t, "systemctl reload after a config change (upstreams a, c)")
	pid := e.mainPID()
	c.writeFile("/etc/extractedprism/config.yaml", e.config(a, sc))
	c.must("systemctl", "reload", "extractedprism.service")
	want := sortedAddrs(a, sc)
	if err := waitFor(30*time.Second, func() bool {
		doc, err := e.status()
		return err == nil && slices.Equal(addresses(doc), want) && doc.Ready
	}); err != nil {
		doc, _ := e.status()
		t.Fatalf("after reload /status upstreams = %v, want %v: %v", addresses(doc), want, err)
	}
	if got := e.mainPID(); got != pid {
		t.Fatalf("reload changed the main pid %s -> %s; want the same process", pid, got)
	}
	if seen := e.servedBy(40); seen["b"] != 0 || seen["c"] == 0 {
		t.Fatalf("after reload 40 requests were answered by %v, want a and c only", seen)
	}

	step(t, "systemctl reload with an invalid config fails and changes nothing")
	c.writeFile("/etc/extractedprism/config.yaml", strings.Replace(e.config(a, sc), "endpoints: [", `endpoints: ["no-port", `, 1))
	if out, err := c.exec(time.Minute, "systemctl", "reload", "extractedprism.service"); err == nil {
		t.Errorf("systemctl reload with endpoint \"no-port\" succeeded (%s); want it to fail", out)
	}
	if err := waitFor(30*time.Second, func() bool {
		doc, err := e.status()
		return err == nil && !doc.Config.LastReloadOK
	}); err != nil {
		t.Errorf("/status config.last_reload_ok stayed true after an invalid file: %v", err)
	}
	if doc, err := e.status(); err != nil || !slices.Equal(addresses(doc), want) || !doc.Ready {
		t.Fatalf("after an invalid config: upstreams %v ready %v (%v); want %v, ready", addresses(doc), doc.Ready, err, want)
	}
	if p := c.show("extractedprism.service", "ActiveState", "MainPID"); p["ActiveState"] != "active" || p["MainPID"] != pid {
		t.Fatalf("after an invalid config the service is %v; want active with pid %s", p, pid)
	}
	c.writeFile("/etc/extractedprism/config.yaml", e.config(a, sc))
	c.must("systemctl", "reload", "extractedprism.service")
	if err := waitFor(30*time.Second, func() bool {
		doc, err := e.status()
		return err == nil && doc.Config.LastReloadOK
	}); err != nil {
		t.Fatalf("config.last_reload_ok not back to true after a good config: %v", err)
	}

	underLoad := func(what string, replaces bool, action func()) loadResult {
		t.Helper()
		l := startLoad(e.proxy, 4)
		if err := l.waitOK(40, 60*time.Second); err != nil {
			res := l.stop()
			t.Fatalf("client loop before %s: %v: %v", what, err, res)
		}
		before := e.mainPID()
		began := time.Now()
		action()
		took := time.Since(began)
		if code, err := e.readyz(); err != nil || code != http.StatusOK {
			l.stop()
			t.Fatalf("right after %s: /readyz = %d, %v; want 200", what, code, err)
		}
		err := l.waitOK(100, 60*time.Second)
		res := l.stop()
		if err != nil {
			t.Fatalf("client loop after %s: %v: %v", what, err, res)
		}
		if after := e.mainPID(); replaces && after == before {
			t.Errorf("%s did not replace the process (main pid still %s)", what, before)
		} else if !replaces && after != before {
			t.Errorf("%s replaced the process (main pid %s -> %s); want it kept", what, before, after)
		}
		t.Logf("RESULT %s (took %v): %v", what, took.Round(time.Millisecond), res)
		if res.Refused != 0 || res.Other != 0 {
			t.Errorf("%s: %d connects refused and %d other failures; want none: %v", what, res.Refused, res.Other, res)
		}
		// The old process serves new connections while it drains: none
		// waits for the drain.
		if res.MaxLatency > time.Second {
			t.Errorf("%s: the slowest new request took %v; want at most 1s", what, res.MaxLatency.Round(time.Millisecond))
		}
		return res
	}

	step(t, "systemctl reload under a client loop, with a long-lived stream open")
	reloadStream, closeReloadStream := openStream(t, e.proxy)
	underLoad("systemctl reload", false, func() { c.must("systemctl", "reload", "extractedprism.service") })
	select {
	case <-reloadStream:
		t.Errorf("systemctl reload cut the open stream; a reload keeps every connection")
	default:
	}
	closeReloadStream()

	step(t, "systemctl restart under a client loop")
	underLoad("systemctl restart", true, func() { c.must("systemctl", "restart", "extractedprism.service") })

	step(t, "systemctl restart under a client loop, with a long-lived stream open (drain_timeout 10s)")
	streamEnded, closeStream := openStream(t, e.proxy)
	restartAt := time.Now()
	underLoad("systemctl restart with an open stream", true, func() { c.must("systemctl", "restart", "extractedprism.service") })
	select {
	case end := <-streamEnded:
		lived := end.Sub(restartAt)
		t.Logf("RESULT the open stream was cut %v after the restart began", lived.Round(time.Millisecond))
		if lived < 9*time.Second {
			t.Errorf("the open stream was cut %v after the restart began; want it to flow until the 10s drain_timeout", lived.Round(time.Millisecond))
		}
	case <-time.After(time.Minute):
		t.Errorf("the stream opened before the restart is still flowing a minute later")
	}
	closeStream()

	step(t, "upgrade to %s under a client loop", upVersion)
	sock := c.show("extractedprism.socket", "ActiveEnterTimestampMonotonic")
	confBefore := c.must("cat", "/etc/extractedprism/config.yaml")
	underLoad("package upgrade", true, func() { c.must("apt-get", "install", "-y", "-q", "/pkgs/upgrade/"+filepath.Base(upDeb)) })
	if got := strings.TrimSpace(c.must("dpkg-query", "-W", "-f", "${Version}", "extractedprism")); got != upVersion {
		t.Errorf("installed version %q after upgrade, want %q", got, upVersion)
	}
	if got := c.show("extractedprism.socket", "ActiveEnterTimestampMonotonic"); got["ActiveEnterTimestampMonotonic"] != sock["ActiveEnterTimestampMonotonic"] {
		t.Errorf("the upgrade restarted extractedprism.socket (%v -> %v); it must keep the sockets open", sock, got)
	}
	if got := c.must("cat", "/etc/extractedprism/config.yaml"); got != confBefore {
		t.Errorf("the upgrade changed /etc/extractedprism/config.yaml")
	}

	step(t, "SIGSTOP of the daemon: the watchdog restarts it")
	c.writeFile("/etc/systemd/system/extractedprism.service.d/watchdog.conf", "[Service]\nWatchdogSec=3s\n")
	c.must("systemctl", "daemon-reload")
	c.must("systemctl", "restart", "extractedprism.service")
	p := c.show("extractedprism.service", "WatchdogUSec", "MainPID", "NRestarts")
	if p["WatchdogUSec"] != "3s" {
		t.Fatalf("WatchdogUSec = %q after the drop-in, want 3s", p["WatchdogUSec"])
	}
	// A healthy daemon keeps the watchdog fed: it survives several periods.
	healthyUntil := time.Now().Add(7 * time.Second)
	if err := waitFor(10*time.Second, func() bool { return time.Now().After(healthyUntil) }); err != nil {
		t.Fatal(err)
	}
	if q := c.show("extractedprism.service", "MainPID", "NRestarts"); q["MainPID"] != p["MainPID"] || q["NRestarts"] != p["NRestarts"] {
		t.Fatalf("a healthy daemon was restarted under WatchdogSec=3s: %v -> %v", p, q)
	}
	c.must("kill", "-STOP", p["MainPID"])
	stopped := time.Now()
	n0, _ := strconv.Atoi(p["NRestarts"])
	if err := waitFor(2*time.Minute, func() bool {
		q := c.show("extractedprism.service", "MainPID", "ActiveState", "SubState")
		return q["MainPID"] != p["MainPID"] && q["MainPID"] != "0" && q["ActiveState"] == "active" && q["SubState"] == "running"
	}); err != nil {
		t.Fatalf("stopped daemon (pid %s) not replaced: %v; service %v", p["MainPID"], err,
			c.show("extractedprism.service", "MainPID", "ActiveState", "SubState", "Result"))
	}
	t.Logf("RESULT watchdog: SIGSTOPped daemon replaced after %v", time.Since(stopped).Round(time.Millisecond))
	q := c.show("extractedprism.service", "NRestarts")
	if n, _ := strconv.Atoi(q["NRestarts"]); n != n0+1 {
		t.Errorf("NRestarts %d -> %d, want one restart", n0, n)
	}
	if j := c.journal("extractedprism.service"); !strings.Contains(j, "Watchdog timeout") {
		t.Errorf("journal lacks systemd's \"Watchdog timeout\" message")
	}
	if err := waitFor(30*time.Second, func() bool { code, err := e.readyz(); return err == nil && code == http.StatusOK }); err != nil {
		t.Fatalf("/readyz after the watchdog restart: %v", err)
	}
	c.must("rm", "/etc/systemd/system/extractedprism.service.d/watchdog.conf")
	c.must("systemctl", "daemon-reload")

	step(t, "systemctl stop leaves the socket listening: a connect starts the daemon again")
	c.must("systemctl", "stop", "extractedprism.service")
	if p := c.show("extractedprism.service", "ActiveState"); p["ActiveState"] != "inactive" {
		t.Fatalf("after systemctl stop the service is %v, want inactive", p)
	}
	if name, err := requestThrough(context.Background(), e.proxy); err != nil {
		t.Errorf("request through %s while the service was stopped: %v; want it served by a socket-activated start", e.proxy, err)
	} else if name != "a" && name != "c" {
		t.Errorf("request through %s answered by %q, want a or c", e.proxy, name)
	}
	// The daemon may serve before READY=1 (upstreams not probed yet are tried).
	if err := waitFor(30*time.Second, func() bool {
		return c.show("extractedprism.service", "ActiveState")["ActiveState"] == "active"
	}); err != nil {
		t.Errorf("after a connect to the socket the service is %v, want active: %v", c.show("extractedprism.service", "ActiveState", "SubState"), err)
	}

	step(t, "systemd-analyze security")
	online := exposure(t, c.must("systemd-analyze", "security", "--no-pager", "extractedprism.service"))
	offline := exposure(t, c.must("systemd-analyze", "security", "--no-pager", "--offline=yes", "/usr/lib/systemd/system/extractedprism.service"))
	t.Logf("RESULT exposure: %.1f (running unit), %.1f (--offline=yes)", online, offline)
	if online > maxExposure || offline > maxExposure {
		t.Errorf("exposure %.1f / %.1f, want <= %.1f", online, offline, maxExposure)
	}

	step(t, "apt-get purge")
	c.must("apt-get", "purge", "-y", "-q", "extractedprism")
	for _, u := range []string{"extractedprism.service", "extractedprism.socket"} {
		if p := c.show(u, "LoadState", "ActiveState"); p["ActiveState"] != "inactive" || p["LoadState"] != "not-found" {
			t.Errorf("after purge %s is %v; want inactive and not-found", u, p)
		}
	}
	if out, err := c.exec(time.Minute, "pgrep", "-a", "extractedprism"); err == nil || strings.TrimSpace(out) != "" {
		t.Errorf("after purge extractedprism processes remain: %q", out)
	}
	for _, addr := range []string{e.proxy, e.admin} {
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err == nil {
			_ = conn.Close()
			t.Errorf("after purge %s still accepts connections", addr)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("after purge connecting to %s: %v, want connection refused", addr, err)
		}
	}
	left := c.must("sh", "-c", `find / -xdev \( -path /proc -o -path /sys -o -path /pkgs -o -path /var/log/journal \) -prune -o -name '*extractedprism*' -print`)
	var leftovers []string
	for _, l := range strings.Fields(left) {
		// The drop-ins this test wrote are the administrator's, not the package's.
		if !strings.HasPrefix(l, "/etc/systemd/system/extractedprism.s") {
			leftovers = append(leftovers, l)
		}
	}
	if len(leftovers) > 0 {
		t.Errorf("after purge left behind: %q", leftovers)
	}
}

// openStream opens GET /stream through the proxy and reads it in the
// background; the channel receives the time the stream ended.
func openStream(t *testing.T, proxy string) (<-chan time.Time, func()) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", proxy, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true, ServerName: "kubernetes"}) //nolint:gosec // stand-in's self-signed certificate
	_ = tc.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(tc, "GET /stream?interval=200ms HTTP/1.1\r\nHost: kubernetes\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(tc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /stream through %s: %v %v", proxy, resp, err)
	}
	_ = tc.SetDeadline(time.Time{})
	ended := make(chan time.Time, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(io.Discard, resp.Body)
		ended <- time.Now()
	}()
	return ended, func() {
		_ = conn.Close()
		<-done
	}
}

// checkUnconfiguredStart starts the service with the configuration the
// package ships (no endpoints), as a boot before the node is configured
// would: the daemon exits with status 78, which RestartPreventExitStatus=
// lists, so systemd does not restart it every second, and the journal says
// in one line what to edit.
func checkUnconfiguredStart(t *testing.T, c *container) {
	t.Helper()
	step(t, "systemctl start with the shipped configuration (no endpoints)")
	if out, err := c.exec(time.Minute, "systemctl", "start", "extractedprism.service"); err == nil {
		t.Fatalf("systemctl start of the unconfigured service succeeded (%s); want it to fail", out)
	}
	props := []string{"ActiveState", "Result", "ExecMainStatus", "NRestarts"}
	p := c.show("extractedprism.service", props...)
	if p["ActiveState"] != "failed" || p["Result"] != "exit-code" || p["ExecMainStatus"] != "78" || p["NRestarts"] != "0" {
		t.Fatalf("unconfigured service %v; want failed with exit status 78 and no restart", p)
	}
	// With Restart=always and RestartSec=1s a restart loop would have
	// restarted it several times within 5 s: watch that long.
	until := time.Now().Add(5 * time.Second)
	if err := waitFor(10*time.Second, func() bool {
		q := c.show("extractedprism.service", props...)
		if q["NRestarts"] != "0" || q["ActiveState"] != "failed" {
			t.Fatalf("unconfigured service restarted: %v", q)
		}
		return time.Now().After(until)
	}); err != nil {
		t.Fatal(err)
	}
	const line = "extractedprism: not configured: /etc/extractedprism/config.yaml names no API server: edit it and set endpoints"
	j := c.journal("extractedprism.service")
	if n := strings.Count(j, line); n != 1 {
		t.Fatalf("journal has %d lines %q, want one:\n%s", n, line, tail(j, 30))
	}
	t.Logf("RESULT unconfigured start: %v, journal: %s", p, line)
	c.must("systemctl", "reset-failed", "extractedprism.service")
}
