package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// bootstrapConfig is an extractedprism config file with discovery in
// bootstrap-only mode.
func bootstrapConfig(static []string, kubeconfig, state string) string {
	eps := ""
	for _, s := range static {
		eps += fmt.Sprintf("  - %q\n", s)
	}
	return fmt.Sprintf(`listen:
  address: 127.0.0.1
  port: 7445
admin:
  port: 7446
endpoints:
%sproxy:
  drain_timeout: 5s
discovery:
  enabled: true
  kubeconfig: %q
  static: bootstrap-only
  static_restore_after: 5s
  state_file: %q
log:
  level: debug
`, eps, kubeconfig, state)
}

// sources renders /status's upstreams as address -> source.
func sources(doc status.Document) map[string]string {
	m := map[string]string{}
	for _, u := range doc.Upstreams {
		m[u.Address] = u.Source
	}
	return m
}

// TestDaemonBootstrapOnly runs extractedprism from a config file with
// static: bootstrap-only: a retired bootstrap address goes once discovery
// works, comes back when discovery is lost, follows a config reload, and goes
// again when discovery returns.
func TestDaemonBootstrapOnly(t *testing.T) {
	a := env.RunAPIServer(t, apiserverIPs[0])
	b := env.RunAPIServer(t, apiserverIPs[1])
	env.WaitReady(t, a, b)
	env.applyRBAC(t, a.Addr())
	// Start once both apiservers are in the EndpointSlice (a fresh one can
	// take a lease period to list itself).
	env.PollSlice(t, apiserverIPs).WaitFor(t, "A and B", time.Now(), 2*time.Minute, func(s []string) bool {
		return slices.Equal(s, []string{a.Addr(), b.Addr()})
	})
	kc, err := env.TokenKubeconfig("discovery", "https://"+a.Addr(), env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	state := filepath.Join(dir, "endpoints.json")
	cfg := filepath.Join(dir, "config.yaml")
	// 198.51.100.14 is a retired bootstrap address: nothing answers there.
	retired, later := "198.51.100.14:6443", "198.51.100.15:6443"
	if err := os.WriteFile(cfg, []byte(bootstrapConfig([]string{a.Addr(), retired}, kc, state)), 0o600); err != nil {
		t.Fatal(err)
	}
	d := env.startDaemon(t, "--config="+cfg)

	_, at := d.waitStatus(t, "static dropped after discovery", 2*time.Minute, func(doc status.Document) bool {
		s := sources(doc)
		return len(s) == 2 && s[a.Addr()] == "discovered" && s[b.Addr()] == "discovered"
	})
	env.Record("bootstrap-only: start -> static endpoints dropped for the discovered ones: %s", at.Sub(d.start).Round(time.Millisecond))

	killed := time.Now()
	a.P.Kill()
	b.P.Kill()
	_, lost := d.waitStatus(t, "discovery error", time.Minute, func(doc status.Document) bool { return doc.Discovery.State == "error" })
	_, at = d.waitStatus(t, "static restored", time.Minute, func(doc status.Document) bool {
		s := sources(doc)
		return s[retired] == "static" && s[a.Addr()] == "static" && s[b.Addr()] == "discovered"
	})
	env.Record("bootstrap-only: apiservers killed -> discovery error %s -> static restored %s later (static_restore_after 5s)",
		lost.Sub(killed).Round(time.Millisecond), at.Sub(lost).Round(time.Millisecond))
	if at.Sub(lost) < 4*time.Second {
		t.Fatalf("static endpoints restored %s after discovery was lost, before static_restore_after (5s)", at.Sub(lost))
	}

	// A config reload replaces the static endpoints.
	reload := time.Now()
	if err := os.WriteFile(cfg+".new", []byte(bootstrapConfig([]string{a.Addr(), later}, kc, state)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(cfg+".new", cfg); err != nil {
		t.Fatal(err)
	}
	d.p.Signal(syscall.SIGHUP)
	_, at = d.waitStatus(t, "reloaded static endpoints", time.Minute, func(doc status.Document) bool {
		s := sources(doc)
		_, old := s[retired]
		return s[later] == "static" && !old
	})
	env.Record("bootstrap-only: config reload -> new static endpoints in /status: %s", at.Sub(reload).Round(time.Millisecond))

	*a = *env.RunAPIServer(t, a.IP)
	*b = *env.RunAPIServer(t, b.IP)
	back := env.WaitReady(t, a)
	_, at = d.waitStatus(t, "static dropped again", 2*time.Minute, func(doc status.Document) bool {
		s := sources(doc)
		_, l := s[later]
		return !l && s[a.Addr()] == "discovered" && doc.Discovery.State == "synced"
	})
	env.Record("bootstrap-only: API back -> static dropped again: %s", at.Sub(back).Round(time.Millisecond))
	if doc, err := d.status(); err == nil && slices.ContainsFunc(doc.Upstreams, func(u status.Upstream) bool { return u.Source == "static" }) {
		t.Fatalf("static endpoints still listed: %s", describe(doc))
	}
	if err := d.p.Stop(time.Minute); err != nil {
		t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v", err)
	}
}
