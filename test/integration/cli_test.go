//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// runCmd runs the daemon binary to completion (at most startTimeout) and
// returns its exit code and output.
func runCmd(t testing.TB, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, daemonBin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "EP_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, childEnv...)
	cmd.Env = append(cmd.Env, env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("run extractedprism %q: %v", args, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("extractedprism %q still running after %s; output:\n%s%s", args, startTimeout, o.String(), e.String())
	}
	return code, o.String(), e.String()
}

// TestBadInputExits: malformed endpoints and taken ports end the daemon at
// start with a non-zero status and a message naming the bad value.
func TestBadInputExits(t *testing.T) {
	port, adminPort := strconv.Itoa(freePort(t)), strconv.Itoa(freePort(t))
	base := []string{"--bind-port", port, "--health-port", adminPort, "--state-file", ""}
	dir := t.TempDir()
	badFile := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(badFile, []byte("endpoints:\n  - 10.0.0.9\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		env  []string
		args []string
		want []string
	}{
		{"host without port", nil, []string{"--endpoints", "10.0.0.1"}, []string{`"10.0.0.1"`, "port"}},
		{"port without host", nil, []string{"--endpoints", ":6443"}, []string{`":6443"`, "host"}},
		{"port out of range", nil, []string{"--endpoints", "host:99999"}, []string{`"host:99999"`, "99999"}},
		{"empty (exit 78: not configured)", nil, []string{"--endpoints", ""}, []string{"not configured", "set --endpoints"}},
		{"second of two bad", nil, []string{"--endpoints", "127.0.0.1:6443,10.0.0.1"}, []string{"endpoints[1]", `"10.0.0.1"`}},
		{"from the environment", []string{"EP_ENDPOINTS=10.0.0.1"}, nil, []string{`"10.0.0.1"`, "EP_ENDPOINTS"}},
		{"from a file", nil, []string{"--config", badFile}, []string{`"10.0.0.9"`, badFile}},
		{"listen port out of range", nil, []string{"--endpoints", "127.0.0.1:6443", "--bind-port", "70000"}, []string{"70000"}},
	}
	for _, c := range cases {
		args := append(append(slicesClone(base), c.args...), "--log-level", "error")
		code, stdout, stderr := runCmd(t, c.env, args...)
		out := stdout + stderr
		if code == 0 {
			t.Errorf("%s: extractedprism %q exited 0, want non-zero", c.name, c.args)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output does not name %q:\n%s", c.name, w, out)
			}
		}
		t.Logf("%s: exit %d: %s", c.name, code, strings.TrimSpace(out))
	}

	// Port clashes: the port is held by a plain listener (no SO_REUSEPORT),
	// so the kernel refuses the daemon's bind even though it asks for
	// SO_REUSEPORT.
	for _, which := range []string{"listen", "admin"} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		held := ln.Addr().(*net.TCPAddr).Port
		p, a := freePort(t), freePort(t)
		if which == "listen" {
			p = held
		} else {
			a = held
		}
		code, stdout, stderr := runCmd(t, nil, "--endpoints", "127.0.0.1:6443", "--bind-port", strconv.Itoa(p),
			"--health-port", strconv.Itoa(a), "--state-file", "")
		_ = ln.Close()
		out := stdout + stderr
		want := loopback(held)
		if code == 0 {
			t.Errorf("%s port clash: exit 0, want non-zero", which)
		}
		if !strings.Contains(out, want) || !strings.Contains(out, "address already in use") {
			t.Errorf("%s port clash: output does not name %s and the cause:\n%s", which, want, out)
		}
		t.Logf("%s port clash: exit %d: %s", which, code, lastLine(out))
	}
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// TestStatusAndValidateExitCodes: `extractedprism status` exits 0 when
// the instance is ready and 1 when it is not or cannot be reached;
// `validate` exits 0 on a good file, 1 with every problem on a bad one,
// 2 on bad usage.
func TestStatusAndValidateExitCodes(t *testing.T) {
	ss := startStandins(t, 1)
	d := startDaemon(t, addrsOf(ss))
	d.waitReady(t)

	code, stdout, stderr := runCmd(t, nil, "status", "--address", d.admin)
	if code != 0 || !strings.Contains(stdout, ss[0].addr) {
		t.Errorf("status of a ready instance: exit %d, want 0 and a table naming %s:\n%s%s", code, ss[0].addr, stdout, stderr)
	}
	code, stdout, stderr = runCmd(t, nil, "status", "--address", d.admin, "--output", "json")
	var doc struct {
		Ready     bool `json:"ready"`
		Upstreams []struct {
			Address string `json:"address"`
			State   string `json:"state"`
		} `json:"upstreams"`
	}
	if err := json.Unmarshal([]byte(stdout), &doc); err != nil || code != 0 || !doc.Ready || len(doc.Upstreams) != 1 || doc.Upstreams[0].State != "up" {
		t.Errorf("status --output json of a ready instance: exit %d, err %v, want 0 and ready JSON:\n%s%s", code, err, stdout, stderr)
	}
	if code, _, stderr := runCmd(t, nil, "status", "--address", d.admin, "--output", "yaml"); code != 2 || !strings.Contains(stderr, "yaml") {
		t.Errorf("status --output yaml: exit %d, want 2 naming the value: %s", code, stderr)
	}

	ss[0].setReady(t, false)
	waitFor(t, waitTimeout, "/readyz 503", func() (bool, string) {
		code, body, err := d.get("/readyz")
		return err == nil && code == http.StatusServiceUnavailable, fmt.Sprintf("%d %s %v", code, body, err)
	})
	code, stdout, stderr = runCmd(t, nil, "status", "--address", d.admin)
	if code != 1 || !strings.Contains(stdout, ss[0].addr) {
		t.Errorf("status of an unready instance: exit %d, want 1 and the table:\n%s%s", code, stdout, stderr)
	}
	t.Logf("status, not ready: exit %d:\n%s", code, stdout)

	d.kill()
	d.wait(waitTimeout)
	code, _, stderr = runCmd(t, nil, "status", "--address", d.admin, "--timeout", "5s")
	if code != 1 || !strings.Contains(stderr, d.admin) {
		t.Errorf("status of a stopped instance: exit %d, want 1 and a message naming %s: %s", code, d.admin, stderr)
	}

	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	writeFile(t, good, "endpoints:\n  - 127.0.0.1:6443\n  - 127.0.0.2:6443\nprobe:\n  interval: 1s\n  timeout: 500ms\n")
	writeFile(t, bad, "endpoint:\n  - 127.0.0.1:6443\nprobe:\n  interval: soon\n  fall: 0\n")
	code, stdout, stderr = runCmd(t, nil, "validate", "--config", good)
	if code != 0 || !strings.Contains(stdout, "OK") {
		t.Errorf("validate good file: exit %d, want 0 and OK:\n%s%s", code, stdout, stderr)
	}
	t.Logf("validate good file: exit %d: %s", code, strings.TrimSpace(stdout))
	code, stdout, stderr = runCmd(t, nil, "validate", "--config", bad)
	out := stdout + stderr
	if code != 1 {
		t.Errorf("validate bad file: exit %d, want 1:\n%s", code, out)
	}
	for _, w := range []string{bad, "endpoint", "probe.interval", "soon"} {
		if !strings.Contains(out, w) {
			t.Errorf("validate bad file: output does not name %q:\n%s", w, out)
		}
	}
	t.Logf("validate bad file: exit %d:\n%s", code, out)
	if code, _, stderr := runCmd(t, nil, "validate", "--no-such-flag"); code != 2 {
		t.Errorf("validate --no-such-flag: exit %d, want 2: %s", code, stderr)
	}
	if code, _, stderr := runCmd(t, nil, "validate", "--config", filepath.Join(dir, "missing.yaml")); code != 1 || !strings.Contains(stderr, "missing.yaml") {
		t.Errorf("validate of a missing file: exit %d, want 1 naming the file: %s", code, stderr)
	}
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestStaticPodUpgradeBadInput: `extractedprism static-pod upgrade` exits 2
// on bad usage and 1 when it cannot upgrade, naming what is wrong, and
// changes nothing in the static pod directory.
func TestStaticPodUpgradeBadInput(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(t.TempDir(), "new.yaml")
	if err := os.WriteFile(good, []byte("apiVersion: v1\nkind: Pod\nmetadata:\n  name: extractedprism\n  namespace: kube-system\n"+
		"spec:\n  containers:\n    - name: extractedprism\n      image: img:2\n      args: [--reuse-port=true]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"no subcommand", []string{"static-pod"}, 2, []string{"want a subcommand", "static-pod upgrade --manifest FILE"}},
		{"no manifest", []string{"static-pod", "upgrade"}, 2, []string{"--manifest is required"}},
		{"unreadable manifest", []string{"static-pod", "upgrade", "--manifest", filepath.Join(dir, "missing.yaml")}, 2, []string{"missing.yaml"}},
		{"nothing installed", []string{"static-pod", "upgrade", "--manifest", good, "--manifest-dir", dir, "--admin-address", loopback(freePort(t))},
			1, []string{"no static pod named extractedprism or extractedprism-b in " + dir, "install the manifest there first"}},
	}
	for _, c := range cases {
		code, stdout, stderr := runCmd(t, nil, c.args...)
		out := stdout + stderr
		if code != c.code {
			t.Errorf("%s: exit %d, want %d:\n%s", c.name, code, c.code, out)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output does not name %q:\n%s", c.name, w, out)
			}
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("the static pod directory changed: %v", entries)
	}
}
