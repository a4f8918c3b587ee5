package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Names of the set-ups under test; direct is the client talking to the
// upstreams itself.
const (
	nameDirect = "direct"
	nameEP     = "extractedprism"
	nameHA     = "haproxy"
	nameNginx  = "nginx"
)

// balancerAddr is where each balancer listens; each has its own port so
// TIME_WAIT sockets of one never disturb the next.
var balancerAddr = map[string]string{
	nameEP:    "127.0.20.100:17445",
	nameHA:    "127.0.20.100:17447",
	nameNginx: "127.0.20.100:17448",
}

const (
	epHealthAddr  = "127.0.20.100:17446"
	healthEvery   = time.Second // health-check interval given to every balancer
	epDrainTimout = 10 * time.Second
)

// env is what the balancers need to know about the machine and upstreams.
type env struct {
	dir    string
	binDir string
	// epBin is the extractedprism binary under test.
	epBin string
	// wrk is the wrk binary, empty when wrk is not used.
	wrk string
	// epLogLevel is extractedprism's --log-level.
	epLogLevel string
	upstreams  []*upstream
}

func (e *env) upstreamAddrs() []string {
	a := make([]string, len(e.upstreams))
	for i, u := range e.upstreams {
		a[i] = u.addr
	}
	return a
}

// targets is where load goes for a set-up: the balancer's one address, or
// the upstreams themselves for direct.
func (e *env) targets(name string) []string {
	if name == nameDirect {
		return e.upstreamAddrs()
	}
	return []string{balancerAddr[name]}
}

// balancerMode is how a scenario needs the balancer to run.
type balancerMode struct {
	// probeToken gives the balancer's health checks benchToken: a
	// --probe-bearer-token-file to extractedprism, an Authorization header
	// in haproxy's check (nginx has no active check).
	probeToken bool
}

// startBalancer starts the named balancer and returns once a request through
// it succeeded, with the time that took. direct returns a nil proc.
func (e *env) startBalancer(ctx context.Context, name string) (*proc, time.Duration, error) {
	return e.startBalancerMode(ctx, name, balancerMode{})
}

// startBalancerMode is startBalancer with the balancer run as mode says.
func (e *env) startBalancerMode(ctx context.Context, name string, mode balancerMode) (*proc, time.Duration, error) {
	if name == nameDirect {
		return nil, 0, nil
	}
	var (
		bin  string
		args []string
	)
	switch name {
	case nameEP:
		bin = e.epBin
		host, port := splitHostPort(balancerAddr[nameEP])
		hhost, hport := splitHostPort(epHealthAddr)
		args = []string{"run",
			"--endpoints", strings.Join(e.upstreamAddrs(), ","),
			"--bind-address", host, "--bind-port", port, "--health-bind-address", hhost, "--health-port", hport,
			"--health-interval", healthEvery.String(), "--health-timeout", healthEvery.String(),
			"--drain-timeout", epDrainTimout.String(), "--log-level", e.epLogLevel, "--state-file", "",
		}
		if mode.probeToken {
			f := filepath.Join(e.dir, probeTokenFile)
			if err := os.WriteFile(f, []byte(benchToken+"\n"), 0o600); err != nil {
				return nil, 0, fmt.Errorf("write %s: %w", f, err)
			}
			ca, err := e.servingCABundle()
			if err != nil {
				return nil, 0, err
			}
			args = append(args, "--probe-bearer-token-file", f, "--probe-ca-file", ca)
		}
	case nameHA:
		cfg := filepath.Join(e.dir, "haproxy.cfg")
		if err := os.WriteFile(cfg, []byte(e.haproxyConfig(mode)), 0o600); err != nil {
			return nil, 0, fmt.Errorf("write %s: %w", cfg, err)
		}
		bin, args = "haproxy", []string{"-db", "-f", cfg}
	case nameNginx:
		cfg := filepath.Join(e.dir, "nginx.conf")
		if err := os.WriteFile(cfg, []byte(e.nginxConfig()), 0o644); err != nil { //nolint:gosec // not secret
			return nil, 0, fmt.Errorf("write %s: %w", cfg, err)
		}
		bin, args = "nginx", []string{"-p", e.dir, "-c", cfg, "-e", "stderr"}
	default:
		return nil, 0, fmt.Errorf("unknown balancer %q", name)
	}
	t0 := time.Now()
	p, err := startProc(e.dir, name, nil, bin, args...)
	if err != nil {
		return nil, 0, err
	}
	c := newHTTPClient(2 * time.Second)
	defer c.CloseIdleConnections()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if p.exited() {
			return nil, 0, fmt.Errorf("%s exited during start-up: %v (log: %s)", name, p.err, p.log.Name())
		}
		if code, _, err := c.get(ctx, balancerAddr[name], "/readyz"); err == nil && code == http.StatusOK {
			return p, time.Since(t0), nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			p.stop(time.Second)
			return nil, 0, fmt.Errorf("%s: no successful request through %s within 30 s (log: %s)", name, balancerAddr[name], p.log.Name())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// haproxyConfig is kubespray's haproxy.cfg for the API server load balancer
// with the check interval shortened to healthEvery; with mode.probeToken
// its check sends benchToken.
func (e *env) haproxyConfig(mode balancerMode) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
    maxconn                 4000

defaults
    mode                    http
    option                  dontlognull
    option                  http-server-close
    option                  redispatch
    retries                 5
    timeout http-request    5m
    timeout queue           5m
    timeout connect         30s
    timeout client          5m
    timeout server          15m
    timeout http-keep-alive 30s
    timeout check           30s
    maxconn                 4000

frontend kube_api_frontend
  bind %s
  mode tcp
  default_backend kube_api_backend

backend kube_api_backend
  mode tcp
  balance leastconn
  default-server inter %dms downinter %dms rise 2 fall 2 slowstart 60s maxconn 1000 maxqueue 256 weight 100
  option httpchk GET /healthz
%s  http-check expect status 200
`, balancerAddr[nameHA], healthEvery.Milliseconds(), healthEvery.Milliseconds(), haproxyCheckSend(mode))
	for _, u := range e.upstreams {
		fmt.Fprintf(&b, "  server %s %s check check-ssl verify none\n", u.name, u.addr)
	}
	return b.String()
}

// haproxyCheckSend is the line that adds benchToken to haproxy's check
// request, when mode asks for it.
func haproxyCheckSend(mode balancerMode) string {
	if !mode.probeToken {
		return ""
	}
	return fmt.Sprintf("  http-check send hdr Authorization \"Bearer %s\"\n", benchToken)
}

// nginxConfig is kubespray's nginx.conf for the API server load balancer
// (stream module, least_conn, proxy_connect_timeout 1s) run in the
// foreground under the harness.
func (e *env) nginxConfig() string {
	var b strings.Builder
	fmt.Fprintf(&b, `load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
pid %s/nginx.pid;
error_log stderr notice;
worker_processes 2;
worker_rlimit_nofile 130048;
worker_shutdown_timeout 10s;

events {
  multi_accept on;
  use epoll;
  worker_connections 16384;
}

stream {
  upstream kube_apiserver {
    least_conn;
`, e.dir)
	for _, u := range e.upstreams {
		fmt.Fprintf(&b, "    server %s;\n", u.addr)
	}
	fmt.Fprintf(&b, `  }

  server {
    listen        %s;
    proxy_pass    kube_apiserver;
    proxy_timeout 10m;
    proxy_connect_timeout 1s;
  }
}
`, balancerAddr[nameNginx])
	return b.String()
}

func splitHostPort(a string) (string, string) {
	i := strings.LastIndexByte(a, ':')
	return a[:i], a[i+1:]
}

// servingCABundle writes the stand-ins' self-signed serving certificates
// into one CA file and returns its path.
func (e *env) servingCABundle() (string, error) {
	certs, err := filepath.Glob(filepath.Join(e.dir, servingCertPrefix+"*.pem"))
	if err != nil || len(certs) == 0 {
		return "", fmt.Errorf("no serving certificates of the stand-ins in %s (%v)", e.dir, err)
	}
	var bundle []byte
	for _, c := range certs {
		b, err := os.ReadFile(c) //nolint:gosec // the harness's own files
		if err != nil {
			return "", fmt.Errorf("read %s: %w", c, err)
		}
		bundle = append(bundle, b...)
	}
	f := filepath.Join(e.dir, "probe-ca.pem")
	if err := os.WriteFile(f, bundle, 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", f, err)
	}
	return f, nil
}
