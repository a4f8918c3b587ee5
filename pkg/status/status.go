// Package status defines the JSON document served at /status on the admin
// port and read by `extractedprism status`. It holds types only; the admin
// server fills them and the status command renders them.
package status

import "time"

// Document is the whole /status answer.
type Document struct {
	// Ready mirrors /readyz; Reason says why (or why not) in one line.
	Ready  bool   `json:"ready"`
	Reason string `json:"reason"`
	// Alive mirrors /healthz (the accept loop is running).
	Alive bool `json:"alive"`
	// Version is the daemon's build version.
	Version string `json:"version"`
	// Listen is the address of the proxy listener ("" before it is bound).
	Listen string `json:"listen"`
	// Instance is a random name this process chose at start: two
	// instances that share the ports (SO_REUSEPORT, during a handover)
	// tell apart which of them answered.
	Instance string `json:"instance,omitempty"`
	// Started is when this process started.
	Started time.Time `json:"started,omitzero"`
	// ReusePort reports whether the ports are bound with SO_REUSEPORT
	// (listen.reuse_port), so that a successor can bind beside them.
	ReusePort bool `json:"reuse_port,omitempty"`
	// ShuttingDown is set once the process drains.
	ShuttingDown bool `json:"shutting_down,omitempty"`
	// ActiveConnections counts client connections currently proxied.
	ActiveConnections int64 `json:"active_connections"`
	// MaxConnections is the cap on ActiveConnections (proxy.max_connections
	// or its derived default; 0 = none); a connection beyond it is reset.
	MaxConnections int64 `json:"max_connections,omitempty"`
	// RefusedConnections counts connections reset because MaxConnections
	// were being proxied, since start.
	RefusedConnections uint64 `json:"refused_connections,omitempty"`
	// Upstreams lists every known upstream, sorted by address.
	Upstreams []Upstream `json:"upstreams"`
	// Discovery is the EndpointSlice watch state.
	Discovery Discovery `json:"discovery"`
	// Config is the configuration reload state.
	Config Config `json:"config"`
}

// Upstream is one API server endpoint as the balancer sees it.
type Upstream struct {
	Address string `json:"address"`
	// Source is where the address came from: "static", "discovered" or "state-file".
	Source string `json:"source"`
	// State is "up", "down" or "unknown" (not yet probed).
	State string `json:"state"`
	// Since is when State last changed.
	Since time.Time `json:"since"`
	// Reason is why State last changed (probe error, dial failure, ...).
	Reason string `json:"reason,omitempty"`
	// LastProbe is when the last probe finished (zero if never).
	LastProbe time.Time `json:"last_probe,omitzero"`
	// LastProbeOK is the result of the last probe.
	LastProbeOK bool `json:"last_probe_ok"`
	// LastProbeLatencySeconds is the duration of the last probe.
	LastProbeLatencySeconds float64 `json:"last_probe_latency_seconds"`
	// LastError is the error of the last failed probe or dial.
	LastError string `json:"last_error,omitempty"`
	// ReadinessUnknown says why the upstream is routed to on liveness
	// alone ("readiness unknown: 401 Unauthorized"), if it is.
	ReadinessUnknown string `json:"readiness_unknown,omitempty"`
	// ReadinessShared: its readiness comes from the cluster's shared verdict.
	ReadinessShared bool `json:"readiness_shared,omitempty"`
	// ActiveConnections counts client connections currently riding on it.
	ActiveConnections int64 `json:"active_connections"`
	// TotalConnections counts client connections ever sent to it.
	TotalConnections uint64 `json:"total_connections"`
	// Failures counts failed probes and failed dials.
	Failures uint64 `json:"failures"`
}

// Discovery is the state of EndpointSlice discovery.
type Discovery struct {
	Enabled bool `json:"enabled"`
	// State is "disabled", "starting", "synced" or "error".
	State      string    `json:"state"`
	LastSync   time.Time `json:"last_sync,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
	Discovered []string  `json:"discovered,omitempty"`
}

// Config is the configuration reload state.
type Config struct {
	File            string    `json:"file,omitempty"`
	LastReload      time.Time `json:"last_reload,omitzero"`
	LastReloadOK    bool      `json:"last_reload_ok"`
	LastReloadError string    `json:"last_reload_error,omitempty"`
}
