package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// valid returns a configuration that passes Validate.
func valid() Config {
	c := Defaults()
	c.Endpoints = []string{"10.0.0.1:6443", "10.0.0.2:6443", "[fd00::3]:6443"}
	return c
}

// writeCA writes a self-signed CA certificate in PEM to dir and returns its path.
func writeCA(t *testing.T, dir string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultsWithEndpointIsValid(t *testing.T) {
	if err := valid().Validate(); err != nil {
		t.Fatalf("valid config rejected:\n%v", err)
	}
}

func TestValidateRules(t *testing.T) {
	dir := t.TempDir()
	ca := writeCA(t, dir)
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		mod  func(c *Config)
		// want is "" for a valid config, else "path: message fragment".
		want string
	}{
		// listen / admin
		{"listen port 0", func(c *Config) { c.Listen.Port = 0 }, "listen.port: 0: must be between 1 and 65535"},
		{"listen port 65536", func(c *Config) { c.Listen.Port = 65536 }, "listen.port: 65536: must be between 1 and 65535"},
		{"listen port 1", func(c *Config) { c.Listen.Port = 1 }, ""},
		{"listen port 65535", func(c *Config) { c.Listen.Port = 65535 }, ""},
		{"listen port negative", func(c *Config) { c.Listen.Port = -1 }, "listen.port: -1: must be between"},
		{"admin port 0", func(c *Config) { c.Admin.Port = 0 }, "admin.port: 0: must be between 1 and 65535"},
		{"admin port 70000", func(c *Config) { c.Admin.Port = 70000 }, "admin.port: 70000: must be between"},
		{"listen address empty", func(c *Config) { c.Listen.Address = "" }, "listen.address: must not be empty"},
		{"listen address bad", func(c *Config) { c.Listen.Address = "127.0.0.1:80" }, `listen.address: "127.0.0.1:80": not an IP address or host name`},
		{"listen address ipv6", func(c *Config) { c.Listen.Address = "::1" }, ""},
		{"listen address name", func(c *Config) { c.Listen.Address = "localhost" }, ""},
		{"listen address all", func(c *Config) { c.Listen.Address = "0.0.0.0" }, ""},
		{"admin address bad", func(c *Config) { c.Admin.Address = "not valid" }, `admin.address: "not valid": not an IP address`},
		{"admin address set", func(c *Config) { c.Admin.Address = "0.0.0.0" }, ""},
		{"admin clashes with listen", func(c *Config) { c.Admin.Port = 7445 }, "admin.port: admin address 127.0.0.1:7445 clashes with listen address 127.0.0.1:7445"},
		{"admin clashes via wildcard", func(c *Config) { c.Admin.Port = 7445; c.Admin.Address = "0.0.0.0" }, "admin.port: admin address 0.0.0.0:7445 clashes"},
		{"admin clashes ipv6 spelled differently", func(c *Config) {
			c.Listen.Address = "::1"
			c.Admin.Address = "0:0:0:0:0:0:0:1"
			c.Admin.Port = 7445
		}, "admin.port: admin address [0:0:0:0:0:0:0:1]:7445 clashes"},
		{"admin same port other address", func(c *Config) { c.Admin.Port = 7445; c.Admin.Address = "127.0.0.2" }, ""},

		// endpoints
		{"endpoint missing port", func(c *Config) { c.Endpoints = []string{"10.0.0.1:6443", "10.0.0.1"} }, `endpoints[1]: "10.0.0.1": missing port`},
		{"endpoint empty port", func(c *Config) { c.Endpoints = []string{"10.0.0.1:"} }, `endpoints[0]: "10.0.0.1:": missing port`},
		{"endpoint port 0", func(c *Config) { c.Endpoints = []string{"10.0.0.1:0"} }, `endpoints[0]: "10.0.0.1:0": invalid port "0" (must be 1-65535)`},
		{"endpoint port 65536", func(c *Config) { c.Endpoints = []string{"10.0.0.1:65536"} }, `endpoints[0]: "10.0.0.1:65536": invalid port "65536"`},
		{"endpoint port name", func(c *Config) { c.Endpoints = []string{"10.0.0.1:https"} }, `endpoints[0]: "10.0.0.1:https": invalid port "https"`},
		{"endpoint missing host", func(c *Config) { c.Endpoints = []string{":6443"} }, `endpoints[0]: ":6443": missing host`},
		{"endpoint empty", func(c *Config) { c.Endpoints = []string{""} }, `endpoints[0]: "": empty endpoint`},
		{"endpoint ipv6 unbracketed", func(c *Config) { c.Endpoints = []string{"fd00::1:6443"} }, `endpoints[0]: "fd00::1:6443": IPv6 address must be in brackets: "[fd00::1]:6443"`},
		{"endpoint ipv6 no port", func(c *Config) { c.Endpoints = []string{"fd00::1"} }, `endpoints[0]: "fd00::1": IPv6 address needs brackets and a port`},
		{"endpoint ipv6 bracketed no port", func(c *Config) { c.Endpoints = []string{"[fd00::1]"} }, `endpoints[0]: "[fd00::1]": missing port`},
		{"endpoint ipv4 bracketed", func(c *Config) { c.Endpoints = []string{"[10.0.0.1]:6443"} }, `endpoints[0]: "[10.0.0.1]:6443": brackets are for IPv6 addresses only`},
		{"endpoint scheme", func(c *Config) { c.Endpoints = []string{"https://10.0.0.1:6443"} }, `endpoints[0]: "https://10.0.0.1:6443": must be host:port without a scheme`},
		{"endpoint blank", func(c *Config) { c.Endpoints = []string{"10.0.0.1: 6443"} }, `endpoints[0]: "10.0.0.1: 6443": must not contain blanks`},
		{"endpoint bad host", func(c *Config) { c.Endpoints = []string{"a_b$:6443"} }, `endpoints[0]: "a_b$:6443": "a_b$" is not an IP address or host name`},
		{"endpoint host name", func(c *Config) { c.Endpoints = []string{"cp1.example.com:6443"} }, ""},
		{"endpoint duplicate", func(c *Config) { c.Endpoints = []string{"10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.1:6443"} }, `endpoints[2]: "10.0.0.1:6443": duplicate of endpoints[0]`},
		{"endpoint duplicate name case", func(c *Config) { c.Endpoints = []string{"CP1:6443", "cp1:6443"} }, `endpoints[1]: "cp1:6443": duplicate of endpoints[0]`},
		{"endpoint duplicate ipv6 spelling", func(c *Config) { c.Endpoints = []string{"[fd00::1]:6443", "[fd00:0::1]:6443"} }, `endpoints[1]: "[fd00:0::1]:6443": duplicate of endpoints[0]`},
		{"endpoint same host other port", func(c *Config) { c.Endpoints = []string{"10.0.0.1:6443", "10.0.0.1:6444"} }, ""},
		{"endpoint is own listener", func(c *Config) { c.Endpoints = []string{"127.0.0.1:7445"} }, `endpoints[0]: "127.0.0.1:7445": is extractedprism's own listen address 127.0.0.1:7445; traffic would loop`},
		{"endpoint loopback with wildcard listener", func(c *Config) { c.Listen.Address = "0.0.0.0"; c.Endpoints = []string{"localhost:7445"} }, `endpoints[0]: "localhost:7445": is extractedprism's own listen address`},
		{"no endpoints", func(c *Config) { c.Endpoints = nil }, "endpoints: at least one endpoint is required (set endpoints, --endpoints or EP_ENDPOINTS), unless discovery.enabled is true with a non-empty discovery.state_file to start from"},
		{"no endpoints, discovery without state file", func(c *Config) {
			c.Endpoints = nil
			c.Discovery.Enabled = true
			c.Discovery.StateFile = ""
		}, "endpoints: at least one endpoint is required"},
		{"no endpoints, discovery with state file", func(c *Config) { c.Endpoints = nil; c.Discovery.Enabled = true }, ""},

		// probe
		{"probe mode bad", func(c *Config) { c.Probe.Mode = "http" }, `probe.mode: "http": must be one of https, tcp`},
		{"probe mode tcp", func(c *Config) { c.Probe.Mode = "tcp" }, ""},
		{"probe path relative", func(c *Config) { c.Probe.Path = "readyz" }, `probe.path: "readyz": must start with "/"`},
		{"probe path empty", func(c *Config) { c.Probe.Path = "" }, `probe.path: "": must start with "/"`},
		{"probe path blank", func(c *Config) { c.Probe.Path = "/ready z" }, `probe.path: "/ready z": must not contain blanks`},
		{"probe path query", func(c *Config) { c.Probe.Path = "/readyz?verbose" }, ""},
		{"probe interval 0", func(c *Config) { c.Probe.Interval = 0 }, "probe.interval: 0s: must be greater than 0"},
		{"probe interval negative", func(c *Config) { c.Probe.Interval = -time.Second }, "probe.interval: -1s: must be greater than 0"},
		{"probe timeout 0", func(c *Config) { c.Probe.Timeout = 0 }, "probe.timeout: 0s: must be greater than 0"},
		{"probe timeout above interval", func(c *Config) { c.Probe.Timeout = 3 * time.Second }, "probe.timeout: 3s exceeds probe.interval 2s; a probe must end before the next one is due"},
		{"probe timeout equal interval", func(c *Config) { c.Probe.Timeout = 2 * time.Second }, ""},
		{"probe seed helm values", func(c *Config) { c.Probe.Interval = 20 * time.Second; c.Probe.Timeout = 15 * time.Second }, ""},
		{"probe rise 0", func(c *Config) { c.Probe.Rise = 0 }, "probe.rise: 0: must be at least 1"},
		{"probe fall 0", func(c *Config) { c.Probe.Fall = 0 }, "probe.fall: 0: must be at least 1"},
		{"probe rise fall 1", func(c *Config) { c.Probe.Rise = 1; c.Probe.Fall = 1 }, ""},
		{"probe jitter negative", func(c *Config) { c.Probe.Jitter = -0.1 }, "probe.jitter: -0.1: must be between 0 and 0.5"},
		{"probe jitter too large", func(c *Config) { c.Probe.Jitter = 0.6 }, "probe.jitter: 0.6: must be between 0 and 0.5"},
		{"probe jitter NaN", func(c *Config) { c.Probe.Jitter = math.NaN() }, "probe.jitter: NaN: must be between 0 and 0.5"},
		{"probe jitter 0", func(c *Config) { c.Probe.Jitter = 0 }, ""},
		{"probe jitter 0.5", func(c *Config) { c.Probe.Jitter = 0.5 }, ""},
		{"probe client cert without key", func(c *Config) { c.Probe.ClientCertFile = "/pki/client.pem" },
			`probe.client_key_file: empty while probe.client_cert_file is "/pki/client.pem": give both`},
		{"probe client key without cert", func(c *Config) { c.Probe.ClientKeyFile = "/pki/client.key" },
			`probe.client_cert_file: empty while probe.client_key_file is "/pki/client.key": give both`},
		{"probe token file missing is not fatal", func(c *Config) { c.Probe.BearerTokenFile = "/nonexistent/token" }, ""},
		{"probe ca none", func(c *Config) { c.Probe.CAFile = ProbeCANone }, ""},
		{"shared readiness bad name", func(c *Config) {
			c.Probe.SharedReadiness.Namespace = "kube-system"
			c.Probe.SharedReadiness.Name = "Readiness_Map"
		}, `probe.shared_readiness.name: "Readiness_Map": must be a lowercase DNS label`},
		{"shared readiness stale_after zero", func(c *Config) {
			c.Probe.SharedReadiness.Namespace = "kube-system"
			c.Probe.SharedReadiness.StaleAfter = 0
		}, "probe.shared_readiness.stale_after: "},
		{"probe ca missing", func(c *Config) { c.Probe.CAFile = filepath.Join(dir, "missing.pem") }, `probe.ca_file: "` + filepath.Join(dir, "missing.pem") + `": cannot read: open `},
		{"probe ca not pem", func(c *Config) { c.Probe.CAFile = notPEM }, `probe.ca_file: "` + notPEM + `": holds no PEM certificate`},
		{"probe ca ok", func(c *Config) { c.Probe.CAFile = ca }, ""},
		{"probe ca device", func(c *Config) { c.Probe.CAFile = "/dev/zero" }, `probe.ca_file: "/dev/zero": cannot read: not a regular file`},
		{"probe server name bad", func(c *Config) { c.Probe.ServerName = "bad name" }, `probe.server_name: "bad name": not an IP address or host name`},
		{"probe server name ok", func(c *Config) { c.Probe.ServerName = "kubernetes.default.svc" }, ""},

		// balance
		{"balance bad", func(c *Config) { c.Balance.Strategy = "random" }, `balance.strategy: "random": must be one of least-connections, round-robin`},
		{"balance round robin", func(c *Config) { c.Balance.Strategy = "round-robin" }, ""},

		// proxy
		{"dial timeout 0", func(c *Config) { c.Proxy.DialTimeout = 0 }, "proxy.dial_timeout: 0s: must be greater than 0"},
		{"keepalive 0 is off", func(c *Config) { c.Proxy.Keepalive = 0 }, ""},
		{"keepalive negative", func(c *Config) { c.Proxy.Keepalive = -time.Second }, "proxy.keepalive: -1s: must not be negative (0 turns it off)"},
		{"tcp user timeout 0", func(c *Config) { c.Proxy.TCPUserTimeout = 0 }, ""},
		{"tcp user timeout negative", func(c *Config) { c.Proxy.TCPUserTimeout = -1 }, "proxy.tcp_user_timeout: -1ns: must not be negative"},
		{"drain timeout 0", func(c *Config) { c.Proxy.DrainTimeout = 0 }, ""},
		{"drain timeout negative", func(c *Config) { c.Proxy.DrainTimeout = -time.Second }, "proxy.drain_timeout: -1s: must not be negative"},
		{"first byte timeout 0", func(c *Config) { c.Proxy.FirstByteTimeout = 0 }, ""},
		{"first byte timeout negative", func(c *Config) { c.Proxy.FirstByteTimeout = -time.Second }, "proxy.first_byte_timeout: -1s: must not be negative"},
		{"replay buffer too small", func(c *Config) { c.Proxy.ReplayBufferBytes = 1023 }, "proxy.replay_buffer_bytes: 1023: must be between 1024 (1 KiB) and 1048576 (1 MiB)"},
		{"replay buffer too large", func(c *Config) { c.Proxy.ReplayBufferBytes = 1<<20 + 1 }, "proxy.replay_buffer_bytes: 1048577: must be between 1024"},
		{"replay buffer bounds", func(c *Config) { c.Proxy.ReplayBufferBytes = 1024 }, ""},
		{"replay buffer upper bound", func(c *Config) { c.Proxy.ReplayBufferBytes = 1 << 20 }, ""},
		{"max connections 0 is derived", func(c *Config) { c.Proxy.MaxConnections = 0 }, ""},
		{"max connections small", func(c *Config) { c.Proxy.MaxConnections = 1 }, ""},
		{"max connections upper bound", func(c *Config) { c.Proxy.MaxConnections = 1 << 20 }, ""},
		{"max connections negative", func(c *Config) { c.Proxy.MaxConnections = -5 },
			"proxy.max_connections: -5: must be between 0 (derived from the memory limit) and 1048576"},
		{"max connections too large", func(c *Config) { c.Proxy.MaxConnections = 1<<20 + 1 },
			"proxy.max_connections: 1048577: must be between 0"},
		{"rebalance tolerance 0", func(c *Config) { c.Proxy.Rebalance.Tolerance = 0 }, "proxy.rebalance.tolerance: 0: must be above 0 and at most 1"},
		{"rebalance tolerance 1.5", func(c *Config) { c.Proxy.Rebalance.Tolerance = 1.5 }, "proxy.rebalance.tolerance: 1.5: must be above 0 and at most 1"},
		{"rebalance min age 0", func(c *Config) { c.Proxy.Rebalance.MinAge = 0 }, ""},
		{"rebalance min age negative", func(c *Config) { c.Proxy.Rebalance.MinAge = -time.Minute }, "proxy.rebalance.min_age: -1m0s: must not be negative"},
		{"rebalance period 0", func(c *Config) { c.Proxy.Rebalance.Period = 0 }, "proxy.rebalance.period: 0s: must be greater than 0"},
		{"rebalance fraction 0", func(c *Config) { c.Proxy.Rebalance.MaxFractionPerMinute = 0 }, "proxy.rebalance.max_fraction_per_minute: 0: must be above 0 and at most 1"},
		{"rebalance fraction 2", func(c *Config) { c.Proxy.Rebalance.MaxFractionPerMinute = 2 }, "proxy.rebalance.max_fraction_per_minute: 2: must be above 0 and at most 1"},
		{"rebalance fraction 1", func(c *Config) { c.Proxy.Rebalance.MaxFractionPerMinute = 1 }, ""},

		// discovery
		{"discovery static bad", func(c *Config) { c.Discovery.Static = "never" }, `discovery.static: "never": must be one of always, bootstrap-only`},
		{"discovery static bootstrap-only", func(c *Config) { c.Discovery.Static = "bootstrap-only" }, ""},
		{"discovery restore 0", func(c *Config) { c.Discovery.StaticRestoreAfter = 0 }, "discovery.static_restore_after: 0s: must be greater than 0"},
		{"discovery debounce 0", func(c *Config) { c.Discovery.Debounce = 0 }, ""},
		{"discovery debounce negative", func(c *Config) { c.Discovery.Debounce = -time.Second }, "discovery.debounce: -1s: must not be negative"},
		{"discovery namespace empty", func(c *Config) { c.Discovery.Namespace = "" }, `discovery.namespace: "": must be a lowercase DNS label`},
		{"discovery namespace upper", func(c *Config) { c.Discovery.Namespace = "Default" }, `discovery.namespace: "Default": must be a lowercase DNS label`},
		{"discovery service bad", func(c *Config) { c.Discovery.Service = "-kubernetes" }, `discovery.service: "-kubernetes": must be a lowercase DNS label`},
		{"discovery server name bad", func(c *Config) { c.Discovery.ServerName = "a b" }, `discovery.server_name: "a b": not an IP address or host name`},
		{"discovery state file empty", func(c *Config) { c.Discovery.StateFile = "" }, ""},

		// log
		{"log level bad", func(c *Config) { c.Log.Level = "verbose" }, `log.level: "verbose": must be one of debug, info, warn, error`},
		{"log level debug", func(c *Config) { c.Log.Level = "debug" }, ""},
		{"log format bad", func(c *Config) { c.Log.Format = "yaml" }, `log.format: "yaml": must be one of text, json`},
		{"log format json", func(c *Config) { c.Log.Format = "json" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.mod(&c)
			err := c.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("unexpected error:\n%v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want %q", tt.want)
			}
			fes := FieldErrors(err)
			if len(fes) != 1 {
				t.Fatalf("want exactly one problem, got %d:\n%v", len(fes), err)
			}
			if got := fes[0].Error(); !strings.Contains(got, tt.want) {
				t.Fatalf("error\n  %s\nwant it to contain\n  %s", got, tt.want)
			}
			wantPath := tt.want[:strings.Index(tt.want, ": ")]
			if fes[0].Path != wantPath {
				t.Fatalf("Path = %q, want %q", fes[0].Path, wantPath)
			}
		})
	}
}

func TestValidateReportsAllProblems(t *testing.T) {
	c := valid()
	c.Listen.Port = 0
	c.Probe.Mode = "udp"
	c.Endpoints = []string{"a", "b:1", "b:1"}
	c.Log.Format = "xml"
	fes := FieldErrors(c.Validate())
	var paths []string
	for _, fe := range fes {
		paths = append(paths, fe.Path)
	}
	want := []string{"listen.port", "endpoints[0]", "endpoints[2]", "probe.mode", "log.format"}
	if strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Fatalf("paths = %v, want %v", paths, want)
	}
}

func TestAddrsAndSummary(t *testing.T) {
	c := valid()
	if got := c.ListenAddr(); got != "127.0.0.1:7445" {
		t.Errorf("ListenAddr = %q", got)
	}
	if got := c.AdminAddr(); got != "127.0.0.1:7446" {
		t.Errorf("AdminAddr = %q", got)
	}
	want := "3 endpoints, listen 127.0.0.1:7445, admin 127.0.0.1:7446, probe https /readyz every 2s, balance least-connections, discovery off"
	if got := c.Summary(); got != want {
		t.Errorf("Summary =\n  %s\nwant\n  %s", got, want)
	}
	c.Listen.Address = "::1"
	c.Admin.Address = "0.0.0.0"
	c.Endpoints = c.Endpoints[:1]
	c.Probe.Mode = "tcp"
	c.Discovery.Enabled = true
	if got := c.ListenAddr(); got != "[::1]:7445" {
		t.Errorf("ListenAddr = %q", got)
	}
	if got := c.AdminAddr(); got != "0.0.0.0:7446" {
		t.Errorf("AdminAddr = %q", got)
	}
	want = "1 endpoint, listen [::1]:7445, admin 0.0.0.0:7446, probe tcp every 2s, balance least-connections, discovery on (default/kubernetes, static always)"
	if got := c.Summary(); got != want {
		t.Errorf("Summary =\n  %s\nwant\n  %s", got, want)
	}
}

func TestMaxEndpointsBounds(t *testing.T) {
	for _, n := range []int{0, -1, 1025} {
		c := Defaults()
		c.Endpoints = []string{"10.0.0.1:6443"}
		c.Discovery.MaxEndpoints = n
		err := c.Validate()
		want := fmt.Sprintf("discovery.max_endpoints: %d: must be between 1 and 1024", n)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("max_endpoints %d: error %v, want one containing %q", n, err, want)
		}
	}
}

func TestAdminAddressDefaultsToLoopback(t *testing.T) {
	c := Defaults()
	c.Listen.Address = "0.0.0.0"
	if got := c.AdminAddr(); got != "127.0.0.1:7446" {
		t.Fatalf("admin address with listen.address 0.0.0.0 = %s, want 127.0.0.1:7446", got)
	}
	c.Admin.Address = "::"
	if got := c.AdminAddr(); got != "[::]:7446" {
		t.Fatalf("explicit admin.address :: = %s, want [::]:7446", got)
	}
}
