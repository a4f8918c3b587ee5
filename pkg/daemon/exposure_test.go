package daemon

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/extractedprism/extractedprism/pkg/discovery"
	"github.com/extractedprism/extractedprism/pkg/metrics"
)

// syncBuffer is a log sink safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// nonLoopbackIPv4 returns an IPv4 address of this machine that is not
// loopback, if it has one.
func nonLoopbackIPv4() (netip.Addr, bool) {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			return p.Addr(), true
		}
	}
	return netip.Addr{}, false
}

// TestListenEverywhereKeepsAdminOnLoopback binds the listener to every
// address, as `bindAddress: 0.0.0.0` does: the admin server stays on
// 127.0.0.1 and the daemon warns that the listener is exposed.
func TestListenEverywhereKeepsAdminOnLoopback(t *testing.T) {
	up := startStandin(t, "a")
	cfg := baseConfig(t, up.Addr())
	cfg.Listen.Address = "0.0.0.0"
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: cfg, Registry: prometheus.NewRegistry(),
			Logger: slog.New(slog.NewTextHandler(logs, nil))})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return")
		}
	})
	r := &running{cfg: cfg}
	waitFor(t, "admin server on 127.0.0.1", 20*time.Second, func() bool { code, _ := r.admin("/healthz"); return code == 200 })
	waitFor(t, "the start-up warning", 20*time.Second, func() bool {
		return strings.Contains(logs.String(), "listen address is not loopback")
	})
	if out := logs.String(); strings.Contains(out, "admin address is not loopback") {
		t.Fatalf("warned about the admin address, which is loopback:\n%s", out)
	}
	if ip, ok := nonLoopbackIPv4(); ok {
		addr := net.JoinHostPort(ip.String(), strconv.Itoa(cfg.Admin.Port))
		if c, err := net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
			_ = c.Close()
			t.Fatalf("admin port answers on %s with listen.address 0.0.0.0 and no admin.address", addr)
		}
		listen := net.JoinHostPort(ip.String(), strconv.Itoa(cfg.Listen.Port))
		c, err := net.DialTimeout("tcp", listen, 2*time.Second)
		if err != nil {
			t.Fatalf("listener not reachable on %s: %v", listen, err)
		}
		_ = c.Close()
	}
}

// TestAdminAddressSetExplicitlyWarns: an operator may expose the admin
// port (for a scraper), and is told so at start.
func TestAdminAddressSetExplicitlyWarns(t *testing.T) {
	up := startStandin(t, "a")
	cfg := baseConfig(t, up.Addr())
	cfg.Admin.Address = "0.0.0.0"
	logs := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: cfg, Registry: prometheus.NewRegistry(),
			Logger: slog.New(slog.NewTextHandler(logs, nil))})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	waitFor(t, "the start-up warning", 20*time.Second, func() bool {
		return strings.Contains(logs.String(), "admin address is not loopback")
	})
	if out := logs.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "/status and /metrics") {
		t.Fatalf("warning does not say what is exposed:\n%s", out)
	}
}

func TestDropReasonsMatchMetrics(t *testing.T) {
	var got []string
	for _, r := range discovery.DropReasons {
		got = append(got, string(r))
	}
	if !slices.Equal(got, metrics.DropReasons) {
		t.Fatalf("discovery drops for %v, metrics export %v", got, metrics.DropReasons)
	}
}
