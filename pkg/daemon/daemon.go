// Package daemon wires the components together: it translates the
// configuration into each component's options, starts them from one
// errgroup, applies configuration reloads, and shuts down in order (stop
// being ready, stop accepting, drain, stop the rest).
//
// It is the only package that imports config; components get plain
// options.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"

	"github.com/extractedprism/extractedprism/pkg/admin"
	"github.com/extractedprism/extractedprism/pkg/config"
	"github.com/extractedprism/extractedprism/pkg/discovery"
	"github.com/extractedprism/extractedprism/pkg/health"
	"github.com/extractedprism/extractedprism/pkg/metrics"
	"github.com/extractedprism/extractedprism/pkg/probe"
	"github.com/extractedprism/extractedprism/pkg/proxy"
	"github.com/extractedprism/extractedprism/pkg/status"
	"github.com/extractedprism/extractedprism/pkg/systemd"
	"github.com/extractedprism/extractedprism/pkg/upstream"
	"github.com/extractedprism/extractedprism/pkg/version"
)

// ListenFunc binds a TCP listener.
type ListenFunc func(ctx context.Context, addr string, reusePort bool) (net.Listener, error)

// Options are the daemon's inputs. Config is required; the rest default
// to the real thing.
type Options struct {
	// Config is the initial, validated configuration.
	Config config.Config
	// ConfigPath, Flags and Environ are what Config was loaded from; they
	// are reloaded on file change and on Reload. ConfigPath "" disables
	// reloading from a file (SIGHUP then re-reads environment and flags).
	ConfigPath string
	Flags      *pflag.FlagSet
	Environ    []string
	// Reload receives a value for every SIGHUP.
	Reload <-chan struct{}
	// Logger and Level: Level is adjusted when log.level changes.
	Logger *slog.Logger
	Level  *slog.LevelVar
	// Registry receives the metrics (default: a new registry).
	Registry *prometheus.Registry
	// Listen binds sockets (default proxy.Listen).
	Listen ListenFunc
	// Activated are listeners passed by systemd socket activation.
	Activated []net.Listener
	// Notifier talks to systemd (default: systemd.NewNotifier).
	Notifier *systemd.Notifier
	// MemoryLimit is the process's cgroup memory limit in bytes (0 =
	// none), as found at process start (package memlimit); it sizes the
	// default proxy.max_connections.
	MemoryLimit int64
	// FileLimit is RLIMIT_NOFILE (default: read it); no default
	// proxy.max_connections needs more descriptors than it allows.
	FileLimit uint64
}

// daemon is the running state. Fields set once in Run are not guarded;
// the rest are guarded by mu or atomic.
type daemon struct {
	o       Options
	log     *slog.Logger
	set     *upstream.Set
	proxy   *proxy.Server
	policy  *health.Policy
	guard   *proxy.Guard
	met     *metrics.Metrics
	disc    atomic.Pointer[discovery.Manager]
	notify  *systemd.Notifier
	started time.Time
	// instance names this process in /status (see status.Document).
	instance string

	mu        sync.Mutex
	cfg       config.Config
	listenLn  net.Listener
	adminLn   net.Listener
	adminStop context.CancelFunc
	adminDone chan struct{}
	reloadAt  time.Time
	reloadOK  bool
	reloadErr string

	prober     *prober
	discRunner *runner
	// sharedRunner runs the shared readiness watcher (nil without one).
	sharedRunner *runner
	shutting     atomic.Bool
	statusLine   atomic.Pointer[string] // last STATUS= sent to systemd
	firstList    chan struct{}          // closed at the first endpoint list
	firstOnce    sync.Once
	lastProbeAt  atomic.Int64
	// unknownWarned holds the upstreams whose "readiness unknown" was
	// logged; shared is the shared readiness watcher, if configured.
	unknownWarned sync.Map
	shared        atomic.Pointer[verdictsBox]
	group         *errgroup.Group
	groupCtx      context.Context
}

// Run runs the daemon until ctx is done, then drains and returns nil; it
// returns an error if a socket cannot be bound at start.
func Run(ctx context.Context, o Options) error {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Listen == nil {
		o.Listen = proxy.Listen
	}
	if o.Notifier == nil {
		o.Notifier = systemd.NewNotifier(o.Logger)
	}
	if o.Registry == nil {
		o.Registry = prometheus.NewRegistry()
	}
	if o.FileLimit == 0 {
		o.FileLimit = fileLimit()
	}
	d := &daemon{o: o, log: o.Logger, cfg: o.Config, notify: o.Notifier, started: time.Now(), reloadOK: true,
		firstList: make(chan struct{}), instance: newInstanceName()}
	met, err := metrics.New(o.Registry, metrics.BuildInfo{Version: version.Version, Commit: version.Commit, GoVersion: version.GoVersion()})
	if err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}
	d.met = met
	met.ConfigReloaded(true, d.started) // the start-up load counts as a successful load
	cfg := o.Config
	strategy, err := upstream.ParseStrategy(cfg.Balance.Strategy)
	if err != nil {
		return fmt.Errorf("balance.strategy: %w", err)
	}
	d.set = upstream.NewSet(upstream.Options{
		Rise: cfg.Probe.Rise, Fall: cfg.Probe.Fall, Strategy: strategy,
		OnTransition: d.onTransition,
		// A failure seen on a client connection: a probe decides at once.
		OnSuspect: func(u *upstream.Upstream) { d.prober.probeNow(u.Addr()) },
		OnAdd: func(u *upstream.Upstream) {
			src := d.set.SourceOf(u)
			u.Attachment.Store(d.met.Upstream(u.Addr(), src))
			d.log.Info("upstream added", "upstream", u.Addr(), "source", src)
		},
		OnRemove: func(u *upstream.Upstream) {
			d.met.ForgetUpstream(u.Addr())
			d.log.Info("upstream removed", "upstream", u.Addr(), "connections", u.Active())
			if u.Active() > 0 && d.set.SourceOf(u) != string(discovery.SourceStatic) {
				// Gone from the cluster: its clients move to the
				// apiservers that stay. (A static endpoint removed from
				// the configuration keeps its connections: an
				// operator's edit drops nothing.)
				d.policy.Removed(u)
			}
		},
	})
	d.proxy = proxy.New(d.proxyOptions(cfg))
	d.logConnLimit(d.connLimitFor(cfg.Proxy.MaxConnections), "connection limit")
	d.policy = health.New(d.policyOptions(cfg))

	// Bind before anything runs, so a clash is a clear start-up error.
	ln, err := d.bind(ctx, cfg.ListenAddr(), cfg.Listen.ReusePort, "listen")
	if err != nil {
		return err
	}
	// The admin port shares SO_REUSEPORT with the listener, so a surged
	// instance can start while the old one drains.
	adminLn, err := d.bind(ctx, cfg.AdminAddr(), cfg.Listen.ReusePort, "admin")
	if err != nil {
		_ = ln.Close()
		return err
	}
	if cfg.Listen.ReusePort && len(o.Activated) == 0 {
		if err := proxy.HandoverCheck(); err != nil {
			d.log.Warn("surge handover is not loss-free on this node", "err", err)
		}
	}
	for _, l := range o.Activated {
		if l != ln && l != adminLn {
			_ = l.Close()
		}
	}
	d.listenLn, d.adminLn = ln, adminLn
	// With reuse-port, other sockets of our UID can join the ports: the
	// guard checks that they are ours before steering connections to
	// them, and reports any that is not.
	d.guard = proxy.NewGuard(proxy.GuardOptions{
		Listeners: d.listeners,
		OnChange:  d.met.ListenerStrangers,
		Logger:    d.log.With("component", "listeners"),
	})

	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	g, gctx := errgroup.WithContext(runCtx)
	d.group, d.groupCtx = g, gctx

	// Know the static endpoints before the first connection can arrive;
	// discovery then adds the state file and the cluster's endpoints.
	d.prober = newProber(g, gctx, d.proberOptions(cfg))
	g.Go(func() error { return d.policy.Run(gctx) })
	static := make([]upstream.Endpoint, len(cfg.Endpoints))
	for i, e := range cfg.Endpoints {
		static[i] = upstream.Endpoint{Address: e, Source: string(discovery.SourceStatic)}
	}
	d.set.Reconcile(static)
	d.prober.setTargets(d.set.Addresses())

	proxyCtx, stopProxy := context.WithCancel(context.Background())
	defer stopProxy()
	proxyDone := make(chan struct{})
	go func() {
		defer close(proxyDone)
		_ = d.proxy.Run(proxyCtx)
	}()
	if err := d.proxy.Serve(ln); err != nil {
		stopProxy()
		<-proxyDone
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	}
	d.startAdmin(adminLn)

	if err := d.startDiscovery(cfg); err != nil {
		d.stopAdmin()
		stopProxy()
		<-proxyDone
		cancelRun()
		_ = g.Wait()
		return err
	}
	d.startShared(cfg)
	if o.ConfigPath != "" || o.Reload != nil {
		w := config.NewWatcher(config.WatchOptions{
			Path: o.ConfigPath, Flags: o.Flags, Environ: o.Environ, Initial: cfg, Logger: d.log,
			Debounce: 200 * time.Millisecond, Trigger: o.Reload,
			OnChange: d.apply, OnError: d.reloadFailed, OnLoad: d.loaded,
		})
		g.Go(func() error { return w.Run(gctx) })
	}
	g.Go(func() error { return d.guard.Run(gctx) })
	g.Go(func() error { return d.notify.RunWatchdog(gctx, d.healthyForWatchdog) })
	g.Go(func() error { d.readyNotifier(gctx); return nil })

	d.log.Info("extractedprism started", "version", version.Version, "listen", ln.Addr().String(),
		"admin", adminLn.Addr().String(), "static_endpoints", len(cfg.Endpoints), "discovery", cfg.Discovery.Enabled)
	warnExposed(d.log, "listen", ln.Addr())
	warnExposed(d.log, "admin", adminLn.Addr())

	select {
	case <-ctx.Done():
	case <-gctx.Done():
		d.log.Error("a component stopped unexpectedly; shutting down")
	}
	// Shutdown: not ready any more, stop accepting, drain, then the rest.
	d.shutting.Store(true)
	_ = d.notify.Stopping()
	d.log.Info("shutting down", "connections", d.proxy.Active())
	stopProxy()
	<-proxyDone
	d.stopAdmin()
	cancelRun()
	err = g.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	d.log.Info("stopped")
	return err
}

// bind returns an activated listener for addr if one was passed, else a
// new one.
func (d *daemon) bind(ctx context.Context, addr string, reuse bool, what string) (net.Listener, error) {
	for _, l := range d.o.Activated {
		if l.Addr().String() == addr {
			d.log.Info("using socket-activated listener", "what", what, "address", addr)
			return l, nil
		}
	}
	ln, err := d.o.Listen(ctx, addr, reuse)
	if err != nil {
		return nil, fmt.Errorf("%s address %s: %w", what, addr, err)
	}
	return ln, nil
}

func (d *daemon) proxyOptions(cfg config.Config) proxy.Options {
	p := cfg.Proxy
	drain := p.DrainTimeout
	if drain == 0 {
		drain = -1 // config 0 means cut at once
	}
	return proxy.Options{
		Set:               d.set,
		DialTimeout:       p.DialTimeout,
		KeepAlive:         p.Keepalive,
		UserTimeout:       p.TCPUserTimeout,
		DrainTimeout:      drain,
		DrainSpread:       p.CloseSpread,
		Replay:            p.Replay,
		FirstByteTimeout:  p.FirstByteTimeout,
		ReplayBufferBytes: p.ReplayBufferBytes,
		MaxConnections:    d.connLimitFor(p.MaxConnections).n,
		Rebalance: proxy.RebalanceOptions{
			Enabled: p.Rebalance.Enabled, Tolerance: p.Rebalance.Tolerance, MinAge: p.Rebalance.MinAge,
			Period: p.Rebalance.Period, MaxFractionPerMinute: p.Rebalance.MaxFractionPerMinute,
		},
		SuccessorServes: proxy.OtherListener,
		Observer:        observer{d.met},
		Logger:          d.log.With("component", "proxy"),
	}
}

func (d *daemon) policyOptions(cfg config.Config) health.Options {
	return health.Options{
		Set:         d.set,
		Closer:      d.proxy,
		CloseOnDown: cfg.Proxy.CloseOnDown,
		Spread:      cfg.Proxy.CloseSpread,
		Logger:      d.log.With("component", "health"),
	}
}

func (d *daemon) proberOptions(cfg config.Config) probe.Options {
	pc := cfg.Probe
	return probe.Options{
		Mode: probe.Mode(pc.Mode), Path: pc.Path, Interval: pc.Interval, Timeout: pc.Timeout,
		Jitter: pc.Jitter, TLS: d.probeTLS(pc), Reporter: probeReporter{d},
		BearerTokenFile: pc.BearerTokenFile, ClientCertFile: pc.ClientCertFile, ClientKeyFile: pc.ClientKeyFile,
		Observe: d.probeObserved,
		// Real traffic from an upstream is as good a sign of life as a
		// PING, and costs the apiserver nothing extra. It never stands in
		// for a readiness check.
		Heard: func(addr string, within time.Duration) bool {
			u := d.set.Lookup(addr)
			return u != nil && d.proxy.HeardWithin(u, within)
		},
		Shared: d.sharedVerdict,
		Logger: d.log.With("component", "probe"),
	}
}

func (d *daemon) discoveryOptions(cfg config.Config) discovery.Options {
	dc := cfg.Discovery
	return discovery.Options{
		Logger:             d.log.With("component", "discovery"),
		Static:             slices.Clone(cfg.Endpoints),
		StaticMode:         dc.Static,
		StaticRestoreAfter: dc.StaticRestoreAfter,
		Enabled:            dc.Enabled,
		Kubeconfig:         dc.Kubeconfig,
		ViaLocal:           dc.ViaLocal,
		LocalAddress:       cfg.ListenAddr(),
		ServerName:         dc.ServerName,
		Namespace:          dc.Namespace,
		Service:            dc.Service,
		Debounce:           dc.Debounce,
		StateFile:          dc.StateFile,
		MaxEndpoints:       dc.MaxEndpoints,
		OnUpdate:           d.onEndpoints,
		OnEvent: func(e discovery.Event) {
			switch e.Kind {
			case discovery.EventSync:
				d.met.DiscoverySynced(e.Count, time.Now())
			case discovery.EventWatchRestart:
				d.met.DiscoveryWatchRestarted()
			case discovery.EventDropped:
				d.met.DiscoveryDropped(string(e.Reason), e.Count)
			}
		},
	}
}

func (d *daemon) startDiscovery(cfg config.Config) error {
	m, err := discovery.New(d.discoveryOptions(cfg))
	if err != nil {
		return fmt.Errorf("discovery: %w", err)
	}
	d.disc.Store(m)
	d.discRunner = startRunner(d.group, d.groupCtx, m.Run)
	return nil
}

// onEndpoints applies a new endpoint list from discovery.
func (d *daemon) onEndpoints(eps []discovery.Endpoint) {
	list := make([]upstream.Endpoint, len(eps))
	for i, e := range eps {
		list[i] = upstream.Endpoint{Address: e.Address, Source: string(e.Source)}
	}
	d.set.Reconcile(list)
	d.prober.setTargets(d.set.Addresses())
	d.firstOnce.Do(func() { close(d.firstList) })
}

func (d *daemon) onTransition(t upstream.Transition) {
	if m := upstreamMetrics(t.Upstream); m != nil {
		m.SetHealthy(t.To == upstream.Up)
	}
	lvl := slog.LevelInfo
	if t.To == upstream.Down {
		lvl = slog.LevelWarn
	}
	d.log.Log(context.Background(), lvl, "upstream "+t.To.String(), "upstream", t.Upstream.Addr(),
		"source", t.Source, "from", t.From.String(), "cause", t.Cause.String(), "reason", t.Reason)
	d.policy.Transition(t)
	d.updateStatusLine()
}

// warnExposed logs a warning when a listener is reachable from beyond the
// node: the admin port then serves /status and /metrics to the network,
// the listen port the node's API path to anyone who can reach it.
func warnExposed(log *slog.Logger, what string, a net.Addr) {
	tcp, ok := a.(*net.TCPAddr)
	if !ok || tcp.IP.IsLoopback() {
		return
	}
	exposes := "the node's API server path"
	if what == "admin" {
		exposes = "/healthz, /readyz, /status and /metrics"
	}
	log.Warn(what+" address is not loopback: reachable from the network", "address", a.String(), "exposes", exposes,
		"see", "docs/security.md")
}

func upstreamMetrics(u *upstream.Upstream) *metrics.UpstreamMetrics {
	m, _ := u.Attachment.Load().(*metrics.UpstreamMetrics)
	return m
}

// ready reports readiness: listening, first probe round done, at least one
// healthy upstream, accepting, not shutting down.
func (d *daemon) ready() (bool, string) {
	if d.shutting.Load() {
		return false, "shutting down"
	}
	if !d.proxy.Listening() {
		return false, "listener not bound"
	}
	if err := d.proxy.AcceptError(); err != nil {
		return false, "cannot accept connections: " + err.Error()
	}
	up, unknown, total := d.set.Counts()
	switch {
	case total == 0:
		return false, "no upstream configured"
	case up > 0:
		return true, fmt.Sprintf("%d/%d upstreams healthy", up, total)
	case unknown > 0:
		return false, fmt.Sprintf("waiting for the first probe round (%d/%d probed)", total-unknown, total)
	}
	return false, fmt.Sprintf("no healthy upstream (0/%d)", total)
}

// alive reports liveness: false only when the proxy's accept loop or an
// event loop of its data path has died (the reason says which). A
// stranger on a listener's port makes it degraded but alive: a restart
// would not remove the stranger, only drop this process's connections.
func (d *daemon) alive() (bool, string) {
	if err := d.proxy.LivenessError(); err != nil {
		return false, err.Error()
	}
	reason := "accept loop alive"
	if err := d.proxy.AcceptError(); err != nil {
		reason = "accept loop alive, retrying: " + err.Error()
	}
	if d.guard != nil {
		if ss := d.guard.Strangers(); len(ss) > 0 {
			parts := make([]string, len(ss))
			for i, s := range ss {
				parts[i] = s.String()
			}
			reason += "; degraded: another process listens on this balancer's port and gets a share of its connections: " +
				strings.Join(parts, "; ")
		}
	}
	return true, reason
}

// listeners returns the listeners the Guard watches.
func (d *daemon) listeners() map[string]net.Listener {
	d.mu.Lock()
	defer d.mu.Unlock()
	return map[string]net.Listener{"listen": d.listenLn, "admin": d.adminLn}
}

// healthyForWatchdog is polled by the systemd watchdog: the proxy is alive
// (its accept loops and event loops) and the prober has reported recently
// (or has nothing to probe).
func (d *daemon) healthyForWatchdog() bool {
	if !d.proxy.Alive() {
		return false
	}
	_, _, total := d.set.Counts() // also proves the set's lock is not wedged
	if total == 0 {
		return true
	}
	d.mu.Lock()
	p := d.cfg.Probe
	d.mu.Unlock()
	last := d.lastProbeAt.Load()
	if last == 0 {
		return time.Since(d.started) < 3*(p.Interval+p.Timeout)+10*time.Second
	}
	return time.Since(time.Unix(0, last)) < 3*(p.Interval+p.Timeout)+10*time.Second
}

// readyNotifier sends READY=1 once the listener is bound and the first
// probe round has finished (or after a bounded wait), and keeps STATUS=
// current.
func (d *daemon) readyNotifier(ctx context.Context) {
	d.mu.Lock()
	p := d.cfg.Probe
	d.mu.Unlock()
	deadline := time.Now().Add(2*p.Timeout + p.Interval + 5*time.Second)
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		_, unknown, _ := d.set.Counts()
		listed := false
		select {
		case <-d.firstList:
			listed = true
		default:
		}
		if ok, _ := d.ready(); ok || (listed && unknown == 0) || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
	d.updateStatusLine()
	_ = d.notify.Ready()
	ok, reason := d.ready()
	d.log.Info("startup complete", "ready", ok, "reason", reason, "after", time.Since(d.started).Round(time.Millisecond))
	t.Reset(5 * time.Second)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.updateStatusLine()
		}
	}
}

func (d *daemon) updateStatusLine() {
	up, _, total := d.set.Counts()
	line := fmt.Sprintf("%d/%d upstreams healthy, %d connections", up, total, d.proxy.Active())
	if !d.reloadStatusOK() {
		line += "; last config reload failed"
	}
	if p := d.statusLine.Load(); p != nil && *p == line {
		return
	}
	d.statusLine.Store(&line)
	_ = d.notify.Status(line)
}

func (d *daemon) reloadStatusOK() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reloadOK
}

// startAdmin serves the admin endpoints on ln until stopAdmin.
func (d *daemon) startAdmin(ln net.Listener) {
	srv := admin.New(admin.Options{
		Alive:   d.alive,
		Ready:   d.ready,
		Status:  d.statusDoc,
		Metrics: promhttp.HandlerFor(d.o.Registry, promhttp.HandlerOpts{}),
		Logger:  d.log.With("component", "admin"),
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, ln); err != nil {
			d.log.Error("admin server stopped", "err", err)
		}
	}()
	d.mu.Lock()
	d.adminLn, d.adminStop, d.adminDone = ln, cancel, done
	d.mu.Unlock()
}

func (d *daemon) stopAdmin() {
	d.mu.Lock()
	stop, done := d.adminStop, d.adminDone
	d.adminStop, d.adminDone = nil, nil
	d.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
}

// newInstanceName returns 16 random hex digits.
func newInstanceName() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b[:])
}

func (d *daemon) statusDoc() status.Document {
	ready, reason := d.ready()
	alive, _ := d.alive()
	d.mu.Lock()
	listen := ""
	if d.listenLn != nil {
		listen = d.listenLn.Addr().String()
	}
	cs := status.Config{File: d.o.ConfigPath, LastReload: d.reloadAt, LastReloadOK: d.reloadOK, LastReloadError: d.reloadErr}
	reuse := d.cfg.Listen.ReusePort
	d.mu.Unlock()
	doc := status.Document{
		Ready: ready, Reason: reason, Alive: alive, Version: version.Version, Listen: listen,
		Instance: d.instance, Started: d.started, ReusePort: reuse, ShuttingDown: d.shutting.Load(),
		ActiveConnections: d.proxy.Active(), MaxConnections: int64(d.proxy.MaxConnections()),
		RefusedConnections: d.proxy.Refused(), Config: cs, Upstreams: []status.Upstream{},
	}
	for _, st := range d.set.Snapshot() {
		doc.Upstreams = append(doc.Upstreams, status.Upstream{
			Address: st.Address, Source: st.Source, State: st.State.String(), Since: st.Since, Reason: st.Reason,
			LastProbe: st.LastProbe, LastProbeOK: st.LastProbeOK, LastProbeLatencySeconds: st.LastLatency.Seconds(),
			LastError: st.LastError, ReadinessUnknown: st.ReadinessUnknown, ReadinessShared: st.ReadinessShared,
			ActiveConnections: st.Active, TotalConnections: st.Total, Failures: st.Failures,
		})
	}
	if m := d.disc.Load(); m != nil {
		ds := m.Status()
		doc.Discovery = status.Discovery{Enabled: ds.Enabled, State: ds.State, LastSync: ds.LastSync,
			LastError: ds.LastError, Discovered: ds.Discovered}
	}
	return doc
}

// reloadFailed keeps the running configuration and makes the failure
// visible: log, metric, /status and systemd STATUS=.
func (d *daemon) reloadFailed(err error) {
	now := time.Now()
	d.mu.Lock()
	d.reloadAt, d.reloadOK, d.reloadErr = now, false, err.Error()
	d.mu.Unlock()
	d.met.ConfigReloaded(false, now)
	d.log.Error("configuration reload failed; keeping the running configuration", "file", d.o.ConfigPath, "err", err)
	d.updateStatusLine()
}

// loaded records a successful reload that changed nothing (for example a
// bad edit reverted), clearing an earlier failure; apply records changes.
func (d *daemon) loaded(_ config.Config, changed bool) {
	if changed {
		return
	}
	now := time.Now()
	d.mu.Lock()
	d.reloadAt, d.reloadOK, d.reloadErr = now, true, ""
	d.mu.Unlock()
	d.met.ConfigReloaded(true, now)
	d.updateStatusLine()
}

// apply switches to a new, validated configuration without dropping a
// connection.
func (d *daemon) apply(next config.Config) {
	_ = d.notify.Reloading()
	defer func() { _ = d.notify.Ready() }()
	d.mu.Lock()
	prev := d.cfg
	d.mu.Unlock()
	var problems []error

	if next.Log.Level != prev.Log.Level && d.o.Level != nil {
		var lvl slog.Level
		if err := lvl.UnmarshalText([]byte(next.Log.Level)); err == nil {
			d.o.Level.Set(lvl)
		}
	}
	if next.Log.Format != prev.Log.Format {
		d.log.Warn("log.format changes take effect at the next restart", "running", prev.Log.Format, "configured", next.Log.Format)
	}

	// Listener: bind the new one first; on failure keep the old one.
	if next.ListenAddr() != prev.ListenAddr() || next.Listen.ReusePort != prev.Listen.ReusePort {
		ln, err := d.o.Listen(context.Background(), next.ListenAddr(), next.Listen.ReusePort)
		if err == nil {
			err = d.proxy.Serve(ln)
		}
		if err != nil {
			problems = append(problems, fmt.Errorf("listen address %s: %w (still serving %s)", next.ListenAddr(), err, prev.ListenAddr()))
			next.Listen = prev.Listen
		} else {
			d.mu.Lock()
			old := d.listenLn
			d.listenLn = ln
			d.mu.Unlock()
			d.proxy.StopListener(old)
			d.log.Info("listener moved; connections of the old one keep flowing", "from", prev.ListenAddr(), "to", ln.Addr().String())
		}
	}
	if next.AdminAddr() != prev.AdminAddr() {
		ln, err := d.o.Listen(context.Background(), next.AdminAddr(), next.Listen.ReusePort)
		if err != nil {
			problems = append(problems, fmt.Errorf("admin address %s: %w (still serving %s)", next.AdminAddr(), err, prev.AdminAddr()))
			// Keep serving where we are, even if the old admin address
			// was derived from the listen address that just changed.
			next.Admin.Address, next.Admin.Port = prev.Admin.Address, prev.Admin.Port
		} else {
			d.stopAdmin()
			d.startAdmin(ln)
			d.log.Info("admin server moved", "from", prev.AdminAddr(), "to", ln.Addr().String())
		}
	}

	strategy, _ := upstream.ParseStrategy(next.Balance.Strategy)
	d.set.SetThresholds(next.Probe.Rise, next.Probe.Fall, strategy)
	d.proxy.SetOptions(d.proxyOptions(next))
	if was, now := d.connLimitFor(prev.Proxy.MaxConnections), d.connLimitFor(next.Proxy.MaxConnections); was != now {
		// Lowering it cuts nothing: new connections are refused until
		// enough of the established ones have ended.
		d.logConnLimit(now, "connection limit changed")
	}
	d.policy.SetOptions(d.policyOptions(next))
	if !reflect.DeepEqual(next.Probe, prev.Probe) {
		d.prober.restart(d.proberOptions(next))
		d.log.Info("probe settings changed; prober restarted", "mode", next.Probe.Mode, "interval", next.Probe.Interval)
	}
	discChanged := !reflect.DeepEqual(next.Discovery, prev.Discovery) ||
		(next.Discovery.ViaLocal && next.ListenAddr() != prev.ListenAddr())
	sharedChanged := discChanged || !reflect.DeepEqual(next.Probe.SharedReadiness, prev.Probe.SharedReadiness)
	if sharedChanged {
		d.stopShared()
	}
	if discChanged {
		d.discRunner.stop()
		if err := d.startDiscovery(next); err != nil {
			problems = append(problems, err)
		}
	} else if !slices.Equal(next.Endpoints, prev.Endpoints) {
		if m := d.disc.Load(); m != nil {
			m.SetStatic(next.Endpoints)
		}
	}
	if sharedChanged {
		d.startShared(next)
	}

	now := time.Now()
	d.mu.Lock()
	d.cfg = next
	d.reloadAt = now
	d.reloadOK = len(problems) == 0
	d.reloadErr = ""
	if len(problems) > 0 {
		d.reloadErr = errors.Join(problems...).Error()
	}
	d.mu.Unlock()
	d.met.ConfigReloaded(len(problems) == 0, now)
	if len(problems) > 0 {
		d.log.Error("configuration applied in part", "err", errors.Join(problems...))
	} else {
		d.log.Info("configuration reloaded", "summary", next.Summary())
	}
	d.updateStatusLine()
}
