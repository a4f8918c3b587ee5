// Package discovery keeps the list of API server endpoints that the balancer
// forwards to. It merges three sources: the static bootstrap endpoints from the
// configuration, the endpoints that the cluster itself announces in the
// EndpointSlices of the kubernetes service, and the last-known-good list that
// an earlier run wrote to a state file.
//
// It is the only package of the project that talks to the Kubernetes API.
// A Manager never empties the endpoint set because discovery failed or came
// back empty: static and last-known-good endpoints stay until the cluster says
// something better.
package discovery

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
)

// Source says where an endpoint came from.
type Source string

// Sources of an endpoint, in the order of precedence used when one address is
// known from several sources.
const (
	// SourceStatic is an endpoint from the configuration.
	SourceStatic Source = "static"
	// SourceDiscovered is an endpoint announced in an EndpointSlice.
	SourceDiscovered Source = "discovered"
	// SourceStateFile is an endpoint from the last-known-good state file that
	// discovery has not confirmed (yet).
	SourceStateFile Source = "state-file"
)

// Static modes.
const (
	// StaticAlways keeps the static endpoints in the set at all times.
	StaticAlways = "always"
	// StaticBootstrapOnly drops the static endpoints once discovery has found
	// endpoints, and restores them when discovery is lost for StaticRestoreAfter.
	StaticBootstrapOnly = "bootstrap-only"
)

// Discovery states reported by Status.
const (
	StateDisabled = "disabled"
	StateStarting = "starting"
	StateSynced   = "synced"
	StateError    = "error"
)

// Defaults applied by New to zero-valued options.
const (
	DefaultNamespace  = "default"
	DefaultService    = "kubernetes"
	DefaultServerName = "kubernetes.default.svc"
)

// Endpoint is one API server address and where it came from.
type Endpoint struct {
	// Address is host:port; IPv6 hosts are bracketed.
	Address string
	// Source is where the address came from.
	Source Source
}

// EventKind classifies an Event.
type EventKind string

// Event kinds.
const (
	// EventSync is sent when a discovered list was applied; Count is its length.
	EventSync EventKind = "sync"
	// EventWatchRestart is sent each time the watch is opened again.
	EventWatchRestart EventKind = "watch_restart"
	// EventError is sent for a failed list, watch or state file write.
	EventError EventKind = "error"
	// EventDropped is sent when addresses of an EndpointSlice or the state
	// file are dropped; Reason says why and Count how many (each address
	// counts once, however often it is seen again).
	EventDropped EventKind = "dropped"
)

// Event is a notable moment of discovery, for metrics.
type Event struct {
	Kind   EventKind
	Count  int
	Reason DropReason
	Err    error
}

// Options configure a Manager. The zero value of every field is usable except
// where noted.
type Options struct {
	// Logger receives the package's logs (nil: discarded).
	Logger *slog.Logger
	// Static are the static bootstrap endpoints (host:port).
	Static []string
	// StaticMode is StaticAlways (default) or StaticBootstrapOnly.
	StaticMode string
	// StaticRestoreAfter is how long discovery must be lost before dropped
	// static endpoints come back (StaticBootstrapOnly only; 0 = at once).
	StaticRestoreAfter time.Duration
	// Enabled turns EndpointSlice discovery and the state file on. When false,
	// Run emits the static endpoints and waits for its context.
	Enabled bool
	// Kubeconfig is the kubeconfig path ("" = in-cluster service account).
	Kubeconfig string
	// ViaLocal sends API traffic to LocalAddress (our own listener) instead of
	// the server named in the credentials.
	ViaLocal bool
	// LocalAddress is host:port of our own listener; required with
	// ViaLocal. No endpoint, static, discovered or from the state file, is
	// ever this address (traffic would loop back into the balancer).
	LocalAddress string
	// ServerName is the TLS server name used with ViaLocal ("" = the
	// kubeconfig's, or kubernetes.default.svc).
	ServerName string
	// Namespace and Service name the service whose EndpointSlices are
	// watched (defaults "default" and "kubernetes").
	Namespace, Service string
	// Debounce is the quiet period that merges bursts of changes (0 = none).
	Debounce time.Duration
	// StateFile is the path of the last-known-good file ("" = none).
	StateFile string
	// MaxEndpoints caps the discovered endpoints, and those of the state
	// file, in use (0: DefaultMaxEndpoints); beyond it the first in
	// address order are kept. Loopback, unspecified, link-local and
	// multicast addresses, and LocalAddress, are dropped from both before
	// the cap is applied (static endpoints may be loopback: an operator
	// may run a local stand-in).
	MaxEndpoints int
	// LocalIPs returns the node's addresses, to recognise LocalAddress
	// when it binds every address (nil: the interfaces' addresses).
	LocalIPs func() []netip.Addr
	// OnUpdate receives the merged, de-duplicated list sorted by address. It
	// is called from Run's goroutine, and never with an empty list while
	// static endpoints are configured.
	OnUpdate func([]Endpoint)
	// OnEvent, if set, receives sync, watch restart and error events.
	OnEvent func(Event)
	// Clock returns the current time (nil: time.Now).
	Clock func() time.Time
}

// Status is a snapshot of discovery for /status.
type Status struct {
	Enabled bool
	// State is StateDisabled, StateStarting, StateSynced or StateError.
	State     string
	LastSync  time.Time
	LastError string
	// Discovered is the discovered list in use, sorted.
	Discovered []string
}

// Manager merges static, discovered and last-known-good endpoints.
type Manager struct {
	opts Options
	log  *slog.Logger
	now  func() time.Time

	// newClient builds the API client and a function that closes its idle
	// connections; tests replace it.
	newClient func() (kubernetes.Interface, func(), error)
	// checkEvery is the period of the static restore check.
	checkEvery time.Duration
	// backoff bounds the retry delays of the watch loop.
	backoff backoffPolicy
	// screen drops unusable discovered and state-file addresses.
	screen *screener
	self   self

	staticCh chan struct{}

	mu     sync.Mutex
	static []string
	status Status
}

// New validates the options and returns a Manager. It does no I/O.
func New(o Options) (*Manager, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.StaticMode == "" {
		o.StaticMode = StaticAlways
	}
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.Service == "" {
		o.Service = DefaultService
	}
	if o.MaxEndpoints == 0 {
		o.MaxEndpoints = DefaultMaxEndpoints
	}
	if o.LocalIPs == nil {
		o.LocalIPs = interfaceAddrs
	}
	var errs []error
	if o.MaxEndpoints < 0 {
		errs = append(errs, fmt.Errorf("discovery.max_endpoints: %d is negative", o.MaxEndpoints))
	}
	switch o.StaticMode {
	case StaticAlways, StaticBootstrapOnly:
	default:
		errs = append(errs, fmt.Errorf("discovery.static: %q is not %q or %q", o.StaticMode, StaticAlways, StaticBootstrapOnly))
	}
	if o.StaticRestoreAfter < 0 {
		errs = append(errs, fmt.Errorf("discovery.static_restore_after: %s is negative", o.StaticRestoreAfter))
	}
	if o.Debounce < 0 {
		errs = append(errs, fmt.Errorf("discovery.debounce: %s is negative", o.Debounce))
	}
	static, err := normalizeList("endpoints", o.Static)
	if err != nil {
		errs = append(errs, err)
	}
	if o.Enabled && o.ViaLocal {
		if _, err := normalizeAddress(o.LocalAddress); err != nil {
			errs = append(errs, fmt.Errorf("discovery.via_local: local address: %w", err))
		}
	}
	if o.Enabled && strings.ContainsAny(o.Service, ",=!() ") {
		errs = append(errs, fmt.Errorf("discovery.service: %q is not a valid service name", o.Service))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	m := &Manager{
		opts:       o,
		log:        o.Logger,
		now:        o.Clock,
		checkEvery: time.Second,
		backoff:    defaultBackoff,
		staticCh:   make(chan struct{}, 1),
		status:     Status{Enabled: o.Enabled, State: StateDisabled},
		self:       newSelf(o.LocalAddress, o.LocalIPs),
	}
	m.screen = newScreener(o.MaxEndpoints, m.self, o.Logger, o.Clock, m.event)
	m.static = m.notSelf(static)
	if o.Enabled {
		m.status.State = StateStarting
	}
	m.newClient = m.buildClient
	return m, nil
}

// SetStatic replaces the static endpoints (on a configuration reload); Run
// emits the merged list again. Invalid entries are logged and skipped.
func (m *Manager) SetStatic(static []string) {
	valid := make([]string, 0, len(static))
	for _, s := range static {
		a, err := normalizeAddress(s)
		if err != nil {
			m.log.Warn("ignoring invalid static endpoint", "endpoint", s, "error", err)
			continue
		}
		valid = append(valid, a)
	}
	valid = m.notSelf(dedupSorted(valid))
	m.mu.Lock()
	m.static = valid
	m.mu.Unlock()
	select {
	case m.staticCh <- struct{}{}:
	default:
	}
}

// notSelf returns addrs without the balancer's own listen address, and
// logs it if it was there.
func (m *Manager) notSelf(addrs []string) []string {
	return slices.DeleteFunc(addrs, func(a string) bool {
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			return false
		}
		ip, _ := netip.ParseAddr(host)
		if !m.self.is(ip, host, port) {
			return false
		}
		m.log.Warn("ignoring static endpoint: it is extractedprism's own listen address, traffic would loop",
			"endpoint", a, "listen", m.opts.LocalAddress)
		return true
	})
}

// Status returns a snapshot of the discovery state.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.status
	s.Discovered = slices.Clone(s.Discovered)
	return s
}

func (m *Manager) staticList() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.static)
}

func (m *Manager) setStatus(f func(*Status)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f(&m.status)
}

func (m *Manager) event(e Event) {
	if m.opts.OnEvent != nil {
		m.opts.OnEvent(e)
	}
}

// normalizeAddress checks that s is host:port with a port in 1..65535 and
// writes IP hosts in their canonical form, so that one address is spelt one
// way only.
func normalizeAddress(s string) (string, error) {
	host, port, err := net.SplitHostPort(strings.TrimSpace(s))
	if err != nil {
		return "", fmt.Errorf("%q is not host:port: %w", s, err)
	}
	if host == "" {
		return "", fmt.Errorf("%q has an empty host", s)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return "", fmt.Errorf("%q has an invalid port %q", s, port)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		host = ip.Unmap().WithZone("").String()
	}
	return net.JoinHostPort(host, strconv.FormatUint(p, 10)), nil
}

// normalizeList normalizes every entry of in; errors name field[index].
func normalizeList(field string, in []string) ([]string, error) {
	out := make([]string, 0, len(in))
	var errs []error
	for i, s := range in {
		a, err := normalizeAddress(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s[%d]: %w", field, i, err))
			continue
		}
		out = append(out, a)
	}
	return dedupSorted(out), errors.Join(errs...)
}

func dedupSorted(in []string) []string {
	out := slices.Clone(in)
	slices.Sort(out)
	return slices.Compact(out)
}
