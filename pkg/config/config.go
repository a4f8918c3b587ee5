// Package config holds the extractedprism configuration: the Config value
// and its defaults, loading from a YAML file, EP_* environment variables
// and command-line flags (koanf), strict validation that reports every
// problem with its field path, and a Watcher that reloads the file on
// change or on demand (SIGHUP).
//
// The schema is configs/extractedprism.yaml; every yaml key is the koanf
// tag of a field below. Precedence: flags > environment > file > defaults.
package config

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// Config is the whole extractedprism configuration. The koanf tags are
// the keys of the YAML file.
type Config struct {
	Listen    Listen    `koanf:"listen"`
	Admin     Admin     `koanf:"admin"`
	Endpoints []string  `koanf:"endpoints"`
	Probe     Probe     `koanf:"probe"`
	Balance   Balance   `koanf:"balance"`
	Proxy     Proxy     `koanf:"proxy"`
	Discovery Discovery `koanf:"discovery"`
	Log       Log       `koanf:"log"`
}

// Listen is the local API server endpoint that clients connect to.
type Listen struct {
	// Address is the IP address or host name to bind.
	Address string `koanf:"address"`
	// Port is the TCP port to bind (1-65535).
	Port int `koanf:"port"`
	// ReusePort sets SO_REUSEPORT on both ports, so a new instance can
	// bind while the old one drains (a surge handover). Any process of the
	// same UID can then bind them too; off, the ports are this process's
	// alone.
	ReusePort bool `koanf:"reuse_port"`
}

// Admin is the HTTP server for /healthz, /readyz, /status and /metrics.
type Admin struct {
	// Address to bind; "" means DefaultAdminHost, whatever Listen.Address
	// is (see Config.AdminAddr).
	Address string `koanf:"address"`
	// Port to bind (1-65535).
	Port int `koanf:"port"`
}

// Probe configures the active health checks of the upstreams.
type Probe struct {
	// Mode is "https" (GET Path, healthy on 200) or "tcp" (connect only).
	Mode string `koanf:"mode"`
	// Path is the HTTP path probed in https mode; it starts with "/".
	Path string `koanf:"path"`
	// Interval is the time between two probes of one upstream.
	Interval time.Duration `koanf:"interval"`
	// Timeout is the deadline of one probe (connect, TLS and request).
	Timeout time.Duration `koanf:"timeout"`
	// Rise is the number of consecutive successes that mark a down upstream up.
	Rise int `koanf:"rise"`
	// Fall is the number of consecutive failures that mark an up upstream down.
	Fall int `koanf:"fall"`
	// Jitter is the fraction (0 to 0.5) of Interval added or removed at random.
	Jitter float64 `koanf:"jitter"`
	// CAFile is a PEM CA bundle to verify the apiserver ("" = the service-account CA if present, else do not verify; "none" = do not verify).
	CAFile string `koanf:"ca_file"`
	// ServerName is the TLS server name sent by probes ("" = the upstream host).
	ServerName string `koanf:"server_name"`
	// BearerTokenFile holds a token sent with readiness checks, re-read when it changes ("" = none; sent only to a verified apiserver).
	BearerTokenFile string `koanf:"bearer_token_file"`
	// ClientCertFile is a PEM client certificate presented by probes, re-read when it changes ("" = none).
	ClientCertFile string `koanf:"client_cert_file"`
	// ClientKeyFile is the PEM key of client_cert_file ("" = none; may be the same file).
	ClientKeyFile string `koanf:"client_key_file"`
	// SharedReadiness reads the cluster's shared readiness verdicts instead of checking readiness from every node.
	SharedReadiness SharedReadiness `koanf:"shared_readiness"`
}

// SharedReadiness names the ConfigMap into which one elected publisher
// writes every apiserver's /readyz answers for the whole cluster.
type SharedReadiness struct {
	// Namespace of the verdict ConfigMap ("" = off: every node checks readiness itself).
	Namespace string `koanf:"namespace"`
	// Name of the verdict ConfigMap.
	Name string `koanf:"name"`
	// StaleAfter is how long without an update the verdicts stay trusted; then the node checks readiness itself.
	StaleAfter time.Duration `koanf:"stale_after"`
}

// Balance selects how an upstream is chosen for a new connection.
type Balance struct {
	// Strategy is "least-connections" or "round-robin".
	Strategy string `koanf:"strategy"`
}

// Proxy configures the TCP forwarding of client connections.
type Proxy struct {
	// DialTimeout is the deadline of one upstream connect before the next is tried.
	DialTimeout time.Duration `koanf:"dial_timeout"`
	// Keepalive is the TCP keepalive idle time on both legs (0 = off).
	Keepalive time.Duration `koanf:"keepalive"`
	// TCPUserTimeout is TCP_USER_TIMEOUT on both legs (0 = kernel default).
	TCPUserTimeout time.Duration `koanf:"tcp_user_timeout"`
	// DrainTimeout is the time established connections get at shutdown (0 = close at once).
	DrainTimeout time.Duration `koanf:"drain_timeout"`
	// CloseOnDown closes an upstream's connections when it is down and another upstream is up.
	CloseOnDown bool `koanf:"close_on_down"`
	// CloseSpread is the window over which a down upstream's connections are closed (0 = all at once),
	// and the end of a drain handed over to a successor, in which the streams left are cut spread out.
	CloseSpread time.Duration `koanf:"close_spread"`
	// Replay replays the client's handshake to another upstream if the first fails before answering.
	Replay bool `koanf:"replay"`
	// FirstByteTimeout bounds the wait for the upstream's first byte (0 = no limit).
	FirstByteTimeout time.Duration `koanf:"first_byte_timeout"`
	// ReplayBufferBytes is the size of the kept client handshake (1 KiB to 1 MiB).
	ReplayBufferBytes int `koanf:"replay_buffer_bytes"`
	// MaxConnections caps the client connections proxied at once, over all
	// upstreams; one more is accepted and reset at once (0 = derived from
	// the memory limit and the descriptor limit by the daemon, see
	// docs/configuration.md "Connection limit").
	MaxConnections int `koanf:"max_connections"`
	// Rebalance spreads connections again after an upstream recovers.
	Rebalance Rebalance `koanf:"rebalance"`
}

// Rebalance configures the gradual closing of surplus connections.
type Rebalance struct {
	// Enabled turns rebalancing on.
	Enabled bool `koanf:"enabled"`
	// Tolerance is the spread allowed above the fair share (0.2 = 20 %).
	Tolerance float64 `koanf:"tolerance"`
	// MinAge protects connections younger than this from rebalancing (0 = none protected).
	MinAge time.Duration `koanf:"min_age"`
	// Period is the minimum time between two rebalancing closes.
	Period time.Duration `koanf:"period"`
	// MaxFractionPerMinute caps the fraction of all connections closed per minute.
	MaxFractionPerMinute float64 `koanf:"max_fraction_per_minute"`
}

// Discovery configures the EndpointSlice watch that learns API servers.
type Discovery struct {
	// Enabled turns the watch on.
	Enabled bool `koanf:"enabled"`
	// Kubeconfig is the kubeconfig for the watch ("" = in-cluster).
	Kubeconfig string `koanf:"kubeconfig"`
	// ViaLocal sends discovery traffic through our own listener.
	ViaLocal bool `koanf:"via_local"`
	// ServerName is the TLS server name used when ViaLocal is on.
	ServerName string `koanf:"server_name"`
	// Namespace of the watched service.
	Namespace string `koanf:"namespace"`
	// Service is the name of the watched service.
	Service string `koanf:"service"`
	// Static is "always" or "bootstrap-only".
	Static string `koanf:"static"`
	// StaticRestoreAfter restores static endpoints after discovery was lost this long.
	StaticRestoreAfter time.Duration `koanf:"static_restore_after"`
	// Debounce merges bursts of EndpointSlice changes (0 = apply each change).
	Debounce time.Duration `koanf:"debounce"`
	// StateFile is the last-known-good list of discovered endpoints ("" = none).
	StateFile string `koanf:"state_file"`
	// MaxEndpoints caps the discovered and state-file endpoints in use.
	MaxEndpoints int `koanf:"max_endpoints"`
}

// Log configures the daemon's logger.
type Log struct {
	// Level is debug, info, warn or error. The seed system's dpanic, panic
	// and fatal are accepted and read as error (see LogLevels).
	Level string `koanf:"level"`
	// Format is text or json.
	Format string `koanf:"format"`
}

// Accepted values of the enumerated keys.
const (
	ProbeModeHTTPS = "https"
	ProbeModeTCP   = "tcp"
	// ProbeCANone as probe.ca_file: do not verify, even where the
	// service-account CA exists.
	ProbeCANone = "none"

	StrategyLeastConnections = "least-connections"
	StrategyRoundRobin       = "round-robin"

	StaticAlways        = "always"
	StaticBootstrapOnly = "bootstrap-only"

	LogFormatText = "text"
	LogFormatJSON = "json"
)

// LogLevels are the accepted values of log.level. The last three are the
// seed system's levels above error; slog has no level above error, so
// Load turns each of them into "error": the daemon then logs only errors,
// which is what those levels ask for (the daemon never panics or exits
// through its logger).
var LogLevels = []string{"debug", "info", "warn", "error", "dpanic", "panic", "fatal"}

// canonicalLogLevel maps the seed system's levels above error to error.
func canonicalLogLevel(level string) string {
	switch level {
	case "dpanic", "panic", "fatal":
		return "error"
	}
	return level
}

// Defaults returns the built-in configuration; it equals
// configs/extractedprism.yaml (a test keeps them in step).
func Defaults() Config {
	return Config{
		Listen:    Listen{Address: "127.0.0.1", Port: 7445, ReusePort: false},
		Admin:     Admin{Address: "", Port: 7446},
		Endpoints: []string{},
		Probe: Probe{
			Mode:     ProbeModeHTTPS,
			Path:     "/readyz",
			Interval: 2 * time.Second,
			Timeout:  2 * time.Second,
			Rise:     2,
			Fall:     2,
			Jitter:   0.2,
			SharedReadiness: SharedReadiness{
				Name:       "extractedprism-readiness",
				StaleAfter: 30 * time.Second,
			},
		},
		Balance: Balance{Strategy: StrategyLeastConnections},
		Proxy: Proxy{
			DialTimeout:       time.Second,
			Keepalive:         30 * time.Second,
			TCPUserTimeout:    30 * time.Second,
			DrainTimeout:      30 * time.Second,
			CloseOnDown:       true,
			CloseSpread:       5 * time.Second,
			Replay:            true,
			FirstByteTimeout:  5 * time.Second,
			ReplayBufferBytes: 16384,
			MaxConnections:    0,
			Rebalance: Rebalance{
				Enabled:              false,
				Tolerance:            0.2,
				MinAge:               time.Minute,
				Period:               time.Second,
				MaxFractionPerMinute: 0.1,
			},
		},
		Discovery: Discovery{
			Enabled:            false,
			ViaLocal:           true,
			Namespace:          "default",
			Service:            "kubernetes",
			Static:             StaticAlways,
			StaticRestoreAfter: 5 * time.Minute,
			Debounce:           time.Second,
			StateFile:          "/var/lib/extractedprism/endpoints.json",
			MaxEndpoints:       32,
		},
		Log: Log{Level: "info", Format: LogFormatText},
	}
}

// ListenAddr is the host:port of the proxy listener.
func (c Config) ListenAddr() string {
	return net.JoinHostPort(c.Listen.Address, strconv.Itoa(c.Listen.Port))
}

// DefaultAdminHost is the admin server's address when admin.address is
// empty: loopback, whatever the listen address, so that binding the
// listener to every address does not open the admin port to the network.
const DefaultAdminHost = "127.0.0.1"

// AdminHost is the host the admin server binds: admin.address, or
// DefaultAdminHost when it is empty.
func (c Config) AdminHost() string {
	if c.Admin.Address != "" {
		return c.Admin.Address
	}
	return DefaultAdminHost
}

// AdminAddr is the host:port of the admin server (see AdminHost).
func (c Config) AdminAddr() string {
	return net.JoinHostPort(c.AdminHost(), strconv.Itoa(c.Admin.Port))
}

// Summary describes the configuration in one line, for `validate` and logs.
func (c Config) Summary() string {
	var b strings.Builder
	switch n := len(c.Endpoints); n {
	case 1:
		b.WriteString("1 endpoint")
	default:
		fmt.Fprintf(&b, "%d endpoints", n)
	}
	fmt.Fprintf(&b, ", listen %s, admin %s", c.ListenAddr(), c.AdminAddr())
	if c.Probe.Mode == ProbeModeHTTPS {
		fmt.Fprintf(&b, ", probe https %s every %s", c.Probe.Path, c.Probe.Interval)
	} else {
		fmt.Fprintf(&b, ", probe %s every %s", c.Probe.Mode, c.Probe.Interval)
	}
	fmt.Fprintf(&b, ", balance %s", c.Balance.Strategy)
	if c.Discovery.Enabled {
		fmt.Fprintf(&b, ", discovery on (%s/%s, static %s)",
			c.Discovery.Namespace, c.Discovery.Service, c.Discovery.Static)
	} else {
		b.WriteString(", discovery off")
	}
	return b.String()
}
