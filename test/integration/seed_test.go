//go:build linux

package integration

import (
	"encoding/json"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSeedLivenessFlags: a seed system v0.3.0 command line with its
// liveness flags (and their variables) starts a working balancer, and the
// daemon says once that they have no effect and what does their job.
func TestSeedLivenessFlags(t *testing.T) {
	ss := startStandins(t, 1)
	d := startDaemon(t, addrsOf(ss), "--liveness-interval", "5s", "--liveness-threshold=15s", "--log-level", "fatal")
	d.waitReady(t)
	if code, _, err := d.get("/healthz"); err != nil || code != http.StatusOK {
		t.Fatalf("/healthz = %d, %v; want 200", code, err)
	}
	if name, err := getRoot(d.listen); err != nil || name != ss[0].name {
		t.Fatalf("request through %s: %q, %v", d.listen, name, err)
	}
	// --log-level fatal is read as error: the notices (warn) are not logged.
	if out := d.out.String(); strings.Contains(out, "has no effect") {
		t.Errorf("--log-level fatal logged a warning:\n%s", out)
	}
	d.kill()

	d = startDaemon(t, addrsOf(ss), "--liveness-threshold=15s")
	d.waitReady(t)
	out := d.out.String()
	if n := strings.Count(out, "seed system setting accepted but has no effect"); n != 1 ||
		!strings.Contains(out, "setting=--liveness-threshold value=15s") || !strings.Contains(out, "watchdog") {
		t.Errorf("want one notice naming --liveness-threshold=15s and what replaces it, got %d:\n%s", n, out)
	}

	port, adminPort := freePort(t), freePort(t)
	p := startProc(t, "extractedprism", []string{
		"EP_ENDPOINTS=" + ss[0].addr, "EP_BIND_PORT=" + strconv.Itoa(port), "EP_HEALTH_PORT=" + strconv.Itoa(adminPort),
		"EP_STATE_FILE=", "EP_LIVENESS_INTERVAL=5s", "EP_LIVENESS_THRESHOLD=15s",
	}, daemonBin)
	p.waitOutput("setting=EP_LIVENESS_INTERVAL value=5s", startTimeout)
	p.waitOutput("setting=EP_LIVENESS_THRESHOLD value=15s", startTimeout)

	code, stdout, stderr := runCmd(t, nil, "--endpoints", ss[0].addr, "--liveness-threshold", "soon")
	if code != 2 || !strings.Contains(stdout+stderr, "liveness-threshold") || !strings.Contains(stdout+stderr, "soon") {
		t.Errorf("--liveness-threshold soon: exit %d, want 2 naming the flag and the value:\n%s%s", code, stdout, stderr)
	}
	code, stdout, stderr = runCmd(t, []string{"EP_LIVENESS_INTERVAL=0s"}, "--endpoints", ss[0].addr)
	if code != 1 || !strings.Contains(stderr, `liveness-interval: "0s": must be above 0 (from EP_LIVENESS_INTERVAL)`) {
		t.Errorf("EP_LIVENESS_INTERVAL=0s: exit %d, want 1 naming the variable and the value:\n%s%s", code, stdout, stderr)
	}
}

// TestNotConfiguredExit: with no API server configured, run exits with
// status 78 (listed in the unit's RestartPreventExitStatus=) and one line
// naming the file to edit; a wrong value is still status 1.
func TestNotConfiguredExit(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "config.yaml")
	writeFile(t, file, "# shipped configuration: no endpoints yet\nlog:\n  level: info\n")
	base := []string{"--bind-port", strconv.Itoa(freePort(t)), "--health-port", strconv.Itoa(freePort(t))}
	code, stdout, stderr := runCmd(t, nil, append([]string{"--config", file}, base...)...)
	want := "extractedprism: not configured: " + file + " names no API server: edit it and set endpoints"
	if code != 78 || !strings.Contains(stderr, want) {
		t.Errorf("unconfigured file: exit %d, want 78 and %q:\n%s%s", code, want, stdout, stderr)
	}
	t.Logf("unconfigured file: exit %d: %s", code, lastLine(stderr))
	code, _, stderr = runCmd(t, nil, base...)
	if code != 78 || !strings.Contains(stderr, "set --endpoints (or EP_ENDPOINTS)") {
		t.Errorf("no file, no flags: exit %d, want 78 naming --endpoints:\n%s", code, stderr)
	}
	code, _, stderr = runCmd(t, nil, append([]string{"--endpoints", "10.0.0.1"}, base...)...)
	if code != 1 || strings.Contains(stderr, "not configured") {
		t.Errorf("a bad endpoint: exit %d, want 1 without \"not configured\":\n%s", code, stderr)
	}
	if code, _, _ := runCmd(t, nil, "validate", "--config", file); code != 1 {
		t.Errorf("validate of the unconfigured file: exit %d, want 1", code)
	}
}

// TestReloadCommand: `extractedprism reload` (the unit's ExecReload=)
// signals the process only when the configuration is valid, and the
// daemon reloads on that signal.
func TestReloadCommand(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	writeFile(t, good, "endpoints: [\"127.0.0.1:6443\"]\n")
	writeFile(t, bad, "endpoints: [\"no-port\"]\n")

	// sleep dies of SIGHUP: whether it is still running says whether it was signalled.
	sleeper := startProc(t, "sleep", nil, "sleep", "300")
	code, stdout, stderr := runCmd(t, nil, "reload", "--config", bad, "--pid", strconv.Itoa(sleeper.pid()))
	if code != 1 || !strings.Contains(stderr, "no-port") || !strings.Contains(stderr, "not signalled") {
		t.Errorf("reload with an invalid file: exit %d, want 1 naming the value:\n%s%s", code, stdout, stderr)
	}
	if sleeper.exited() {
		t.Fatalf("reload with an invalid file signalled the process")
	}
	code, stdout, stderr = runCmd(t, nil, "reload", "--config", good, "--pid", strconv.Itoa(sleeper.pid()))
	if code != 0 || !strings.Contains(stdout, "sent SIGHUP to process "+strconv.Itoa(sleeper.pid())) {
		t.Errorf("reload with a valid file: exit %d, want 0:\n%s%s", code, stdout, stderr)
	}
	if _, ok := sleeper.wait(waitTimeout); !ok {
		t.Errorf("reload with a valid file: the process was not signalled")
	}
	if code, _, stderr := runCmd(t, nil, "reload", "--config", good); code != 2 || !strings.Contains(stderr, "--pid") {
		t.Errorf("reload without --pid: exit %d, want 2 naming --pid: %s", code, stderr)
	}

	// The daemon reloads its file on the signal.
	ss := startStandins(t, 1)
	cfg := configFile{port: freePort(t), adminPort: freePort(t), endpoints: addrsOf(ss), interval: probeInterval, timeout: probeTimeout}
	file := filepath.Join(dir, "daemon.yaml")
	writeFile(t, file, cfg.yaml())
	d := startDaemonArgs(t, loopback(cfg.port), loopback(cfg.adminPort), "--config", file)
	d.waitReady(t)
	since := time.Now()
	code, stdout, stderr = runCmd(t, nil, "reload", "--config", file, "--pid", strconv.Itoa(d.pid()))
	if code != 0 {
		t.Fatalf("reload of a running daemon: exit %d:\n%s%s", code, stdout, stderr)
	}
	if ok, errText := d.waitReloaded(t, since, "after SIGHUP"); !ok {
		t.Errorf("reload after SIGHUP failed: %s", errText)
	}
}

// TestStatusShortOutputFlag: `status -o json` is `status --output json`.
func TestStatusShortOutputFlag(t *testing.T) {
	ss := startStandins(t, 1)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)
	code, stdout, stderr := runCmd(t, nil, "status", "--address", d.admin, "-o", "json")
	var doc struct {
		Ready bool `json:"ready"`
	}
	if err := json.Unmarshal([]byte(stdout), &doc); err != nil || code != 0 || !doc.Ready {
		t.Errorf("status -o json: exit %d, %v, want 0 and ready JSON:\n%s%s", code, err, stdout, stderr)
	}
	if code, _, stderr := runCmd(t, nil, "status", "--address", d.admin, "-o", "yaml"); code != 2 || !strings.Contains(stderr, `"yaml"`) {
		t.Errorf("status -o yaml: exit %d, want 2 naming the value: %s", code, stderr)
	}
}
