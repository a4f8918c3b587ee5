// Package units_test checks the shipped systemd unit files with systemd's
// own tools: systemd-analyze verify (syntax, referenced units and binaries)
// and systemd-analyze security (sandbox exposure score).
package units_test

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"gopkg.in/yaml.v3"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// maxExposure is the highest `systemd-analyze security` exposure accepted:
// systemd rates 2.0 and below "OK".
const maxExposure = 2.0

var units = []string{"extractedprism.service", "extractedprism.socket"}

func systemdAnalyze(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatalf("systemd-analyze not found (apt-get install systemd): %v", err)
	}
	return p
}

// hostUnitDir is where the host keeps its own units (sysinit.target, ...).
func hostUnitDir(t *testing.T) string {
	t.Helper()
	for _, d := range []string{"/usr/lib/systemd/system", "/lib/systemd/system"} {
		if _, err := os.Stat(filepath.Join(d, "sysinit.target")); err == nil {
			return d
		}
	}
	t.Fatal("no systemd unit directory with sysinit.target on this host")
	return ""
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

// TestVerify runs systemd-analyze verify on the units inside a root that
// holds what they reference: the host's units and /usr/bin/extractedprism
// (ExecStart= and ExecReload= run nothing else). verify exits 0 on most
// problems, so any stderr output fails.
func TestVerify(t *testing.T) {
	analyze := systemdAnalyze(t)
	root := t.TempDir()
	unitDir := filepath.Join(root, "usr/lib/systemd/system")
	host := hostUnitDir(t)
	entries, err := os.ReadDir(host)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			copyFile(t, filepath.Join(host, e.Name()), filepath.Join(unitDir, e.Name()), 0o644)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/extractedprism"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	args := []string{"verify", "--root=" + root}
	for _, u := range units {
		copyFile(t, u, filepath.Join(unitDir, u), 0o644)
		args = append(args, filepath.Join(unitDir, u))
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(analyze, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Errorf("systemd-analyze %s: %v", strings.Join(args, " "), err)
	}
	if stderr.Len() > 0 || stdout.Len() > 0 {
		t.Errorf("systemd-analyze verify found problems:\n%s%s", stdout.String(), stderr.String())
	}
}

var exposureRE = regexp.MustCompile(`Overall exposure level for extractedprism\.service: ([0-9.]+) (\S+)`)

// TestSecurityExposure asserts the sandbox score systemd computes offline.
func TestSecurityExposure(t *testing.T) {
	out, err := exec.Command(systemdAnalyze(t), "security", "--offline=yes", "--no-pager", "./extractedprism.service").CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := exposureRE.FindSubmatch(out)
	if m == nil {
		t.Fatalf("no overall exposure level in systemd-analyze security output:\n%s", out)
	}
	score, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("systemd-analyze security exposure: %.1f %s", score, m[2])
	if score > maxExposure {
		t.Errorf("exposure %.1f %s, want <= %.1f; systemd-analyze says:\n%s", score, m[2], maxExposure, out)
	}
}

// unitFile is a parsed unit: section -> key -> values in order.
type unitFile map[string]map[string][]string

func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: malformed line %q", path, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

func (u unitFile) get(section, key string) []string { return u[section][key] }

// TestServiceContract pins the directives the daemon and the packages rely on.
func TestServiceContract(t *testing.T) {
	u := parseUnit(t, "extractedprism.service")
	want := map[string]string{
		"Type":                     "notify",
		"NotifyAccess":             "main",
		"ExecStart":                "/usr/bin/extractedprism --config /etc/extractedprism/config.yaml",
		"ExecReload":               "/usr/bin/extractedprism reload --config /etc/extractedprism/config.yaml --pid $MAINPID",
		"Restart":                  "always",
		"RestartPreventExitStatus": "78",
		"StateDirectory":           "extractedprism",
		"ConfigurationDirectory":   "extractedprism",
		"DynamicUser":              "yes",
		"NoNewPrivileges":          "yes",
		"ProtectSystem":            "strict",
		"ProtectHome":              "yes",
		"PrivateTmp":               "yes",
		"PrivateDevices":           "yes",
		"CapabilityBoundingSet":    "",
		"RestrictAddressFamilies":  "AF_INET AF_INET6 AF_UNIX",
		"MemoryDenyWriteExecute":   "yes",
	}
	for k, v := range want {
		if got := u.get("Service", k); !slices.Contains(got, v) {
			t.Errorf("[Service] %s = %q, want %q among them", k, got, v)
		}
	}
	if got := u.get("Service", "SystemCallFilter"); len(got) == 0 || got[0] != "@system-service" {
		t.Errorf("[Service] SystemCallFilter = %q, want @system-service first", got)
	}
	// The watchdog must outlast a few pings, and the stop timeout the default drain.
	if got := u.get("Service", "WatchdogSec"); len(got) != 1 || got[0] == "" || got[0] == "0" {
		t.Errorf("[Service] WatchdogSec = %q, want one non-zero value", got)
	}
	if got := u.get("Unit", "Wants"); len(got) == 0 || !strings.Contains(got[0], "extractedprism.socket") {
		t.Errorf("[Unit] Wants = %q, want extractedprism.socket (started with the service, so its fds are passed)", got)
	}
	if got := u.get("Install", "Also"); !slices.Contains(got, "extractedprism.socket") {
		t.Errorf("[Install] Also = %q, want extractedprism.socket", got)
	}
}

// TestSocketMatchesConfig checks that the socket unit listens exactly where
// the shipped configuration tells the daemon to listen, so the daemon finds
// its activated listeners (it matches them by address).
func TestSocketMatchesConfig(t *testing.T) {
	b, err := os.ReadFile("../configs/extractedprism.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Listen struct {
			Address string `yaml:"address"`
			Port    int    `yaml:"port"`
		} `yaml:"listen"`
		Admin struct {
			Address string `yaml:"address"`
			Port    int    `yaml:"port"`
		} `yaml:"admin"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("configs/extractedprism.yaml: %v", err)
	}
	adminAddr := cfg.Admin.Address
	if adminAddr == "" {
		adminAddr = cfg.Listen.Address
	}
	want := []string{
		cfg.Listen.Address + ":" + strconv.Itoa(cfg.Listen.Port),
		adminAddr + ":" + strconv.Itoa(cfg.Admin.Port),
	}
	u := parseUnit(t, "extractedprism.socket")
	if got := u.get("Socket", "ListenStream"); !slices.Equal(got, want) {
		t.Errorf("[Socket] ListenStream = %q, want %q (listen and admin of configs/extractedprism.yaml, the packaged default)", got, want)
	}
	if got := u.get("Socket", "Service"); !slices.Equal(got, []string{"extractedprism.service"}) {
		t.Errorf("[Socket] Service = %q, want extractedprism.service", got)
	}
	for _, k := range []string{"Accept", "ReusePort"} {
		if got := u.get("Socket", k); len(got) > 0 && got[len(got)-1] != "no" {
			t.Errorf("[Socket] %s = %q, want unset or no", k, got)
		}
	}
}
