package readiness

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Defaults of PublisherOptions.
const (
	DefaultLease         = "extractedprism-readiness-publisher"
	DefaultInterval      = time.Second
	DefaultTimeout       = time.Second
	DefaultHeartbeat     = 10 * time.Second
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// userAgent names the publisher in the apiservers' logs and audit.
const userAgent = "extractedprism-readiness-publisher"

// PublisherOptions configure a Publisher. Client, Namespace and Identity
// are required; zero durations take the defaults above.
type PublisherOptions struct {
	// Client reads the kubernetes EndpointSlice and writes the Lease and
	// the ConfigMap.
	Client kubernetes.Interface
	// Namespace holds the Lease and the ConfigMap.
	Namespace string
	// ConfigMap is the name of the ConfigMap (default DefaultConfigMap).
	ConfigMap string
	// Lease is the name of the coordination.k8s.io Lease the replicas
	// elect a leader with (default DefaultLease).
	Lease string
	// Identity names this replica in the Lease and the Document.
	Identity string
	// Interval is the time between two probe rounds; Timeout bounds one
	// probe; Heartbeat is the longest time between two writes.
	Interval, Timeout, Heartbeat time.Duration
	// LeaseDuration, RenewDeadline and RetryPeriod are the leader
	// election's timings (client-go's meaning).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// Endpoints are probed besides the addresses of the kubernetes
	// EndpointSlice (IP:port).
	Endpoints []string
	// DisableSlice probes Endpoints only.
	DisableSlice bool
	// TLS verifies the apiservers (cloned per apiserver). nil verifies
	// against the system roots.
	TLS *tls.Config
	// Auth, if set, wraps each apiserver's transport to add credentials.
	Auth func(http.RoundTripper) http.RoundTripper
	// Dial dials the apiservers (default net.Dialer).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Now is the clock of the Document's timestamps and of the heartbeat
	// (default time.Now).
	Now func() time.Time
	// Logger receives the publisher's events (default: discarded).
	Logger *slog.Logger
	// OnPublish, if set, is called after every successful write.
	OnPublish func(Document)
}

func (o PublisherOptions) withDefaults() PublisherOptions {
	if o.ConfigMap == "" {
		o.ConfigMap = DefaultConfigMap
	}
	if o.Lease == "" {
		o.Lease = DefaultLease
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.Interval, DefaultInterval)
	def(&o.Timeout, DefaultTimeout)
	def(&o.Heartbeat, DefaultHeartbeat)
	def(&o.LeaseDuration, DefaultLeaseDuration)
	def(&o.RenewDeadline, DefaultRenewDeadline)
	def(&o.RetryPeriod, DefaultRetryPeriod)
	if o.Dial == nil {
		d := &net.Dialer{Timeout: o.Timeout, KeepAlive: 30 * time.Second}
		o.Dial = d.DialContext
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

func (o PublisherOptions) validate() error {
	var errs []error
	if o.Client == nil {
		errs = append(errs, errors.New("no API client"))
	}
	if o.Namespace == "" {
		errs = append(errs, errors.New("no namespace"))
	}
	if o.Identity == "" {
		errs = append(errs, errors.New("no identity"))
	}
	if o.Timeout > o.Interval {
		errs = append(errs, fmt.Errorf("timeout %s is longer than the interval %s", o.Timeout, o.Interval))
	}
	if o.Heartbeat < o.Interval {
		errs = append(errs, fmt.Errorf("heartbeat %s is shorter than the interval %s", o.Heartbeat, o.Interval))
	}
	if o.RenewDeadline >= o.LeaseDuration {
		errs = append(errs, fmt.Errorf("renew deadline %s must be shorter than the lease duration %s", o.RenewDeadline, o.LeaseDuration))
	}
	for _, e := range o.Endpoints {
		if _, err := canonical(e); err != nil {
			errs = append(errs, err)
		}
	}
	if o.DisableSlice && len(o.Endpoints) == 0 {
		errs = append(errs, errors.New("nothing to probe: no endpoints and the EndpointSlice disabled"))
	}
	return errors.Join(errs...)
}

// Publisher observes the apiservers' readiness once for the cluster and
// publishes it. Several replicas run; the one holding the Lease probes and
// writes, the others wait to take over. Run owns every goroutine and
// connection it starts and stops them before returning.
type Publisher struct {
	opts    PublisherOptions
	static  []string
	leading atomic.Bool
}

// NewPublisher returns a Publisher; nothing runs until Run.
func NewPublisher(o PublisherOptions) *Publisher {
	o = o.withDefaults()
	p := &Publisher{opts: o}
	for _, e := range o.Endpoints {
		if c, err := canonical(e); err == nil {
			p.static = append(p.static, c)
		}
	}
	return p
}

// Leading reports whether this replica holds the Lease and publishes.
func (p *Publisher) Leading() bool { return p.leading.Load() }

// Run takes part in the leader election until ctx is done, publishing
// while it leads. On losing the Lease it stops publishing at once and
// stands for election again. When ctx ends it releases the Lease, so
// another replica takes over without waiting for it to expire. It returns
// nil when ctx is done, or an error for invalid options.
func (p *Publisher) Run(ctx context.Context) error {
	if err := p.opts.validate(); err != nil {
		return fmt.Errorf("readiness publisher: %w", err)
	}
	o := p.opts
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: o.Namespace, Name: o.Lease},
		Client:     o.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: o.Identity},
	}
	o.Logger.Info("readiness publisher standing for election", "lease", o.Namespace+"/"+o.Lease, "identity", o.Identity)
	for ctx.Err() == nil {
		started := make(chan context.Context, 1)
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   o.LeaseDuration,
			RenewDeadline:   o.RenewDeadline,
			RetryPeriod:     o.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            o.Lease,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(lctx context.Context) { started <- lctx },
				OnStoppedLeading: func() {},
				OnNewLeader: func(id string) {
					if id != o.Identity {
						o.Logger.Info("readiness publisher: another replica leads", "leader", id)
					}
				},
			},
		})
		if err != nil {
			return fmt.Errorf("readiness publisher: leader election: %w", err)
		}
		termCtx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			le.Run(termCtx)
		}()
		select {
		case lctx := <-started:
			p.lead(lctx)
		case <-done:
		}
		cancel()
		<-done
		if ctx.Err() == nil {
			o.Logger.Warn("readiness publisher lost the lease; stopped publishing", "identity", o.Identity)
		}
	}
	return nil
}

// lead probes and publishes until ctx (the term of leadership) ends.
func (p *Publisher) lead(ctx context.Context) {
	o := p.opts
	log := o.Logger.With("configmap", o.Namespace+"/"+o.ConfigMap)
	log.Info("readiness publisher leads: probing and publishing", "identity", o.Identity,
		"interval", o.Interval.String(), "heartbeat", o.Heartbeat.String())
	p.leading.Store(true)
	defer p.leading.Store(false)

	st := &store{client: o.Client, namespace: o.Namespace, name: o.ConfigMap}
	checkers := map[string]*checker{}
	defer func() {
		for _, c := range checkers {
			c.close()
		}
	}()
	var (
		discovered []string
		sliceErr   bool
		writeErr   bool
		last       map[string]Entry
		lastWrite  time.Time
		written    bool
	)
	tick := time.NewTicker(o.Interval)
	defer tick.Stop()
	for {
		if !o.DisableSlice {
			addrs, err := sliceAddrs(ctx, o.Client)
			switch {
			case err != nil && ctx.Err() == nil && !sliceErr:
				log.Warn("cannot read the apiservers' EndpointSlice; probing the last known and static addresses", "error", err)
				sliceErr = true
			case err == nil:
				if sliceErr {
					log.Info("reading the apiservers' EndpointSlice again")
					sliceErr = false
				}
				discovered = addrs
			}
		}
		targets := mergeTargets(p.static, discovered)
		answers := p.round(ctx, checkers, targets)
		if ctx.Err() != nil {
			return
		}
		now := o.Now()
		entries := make(map[string]Entry, len(answers))
		for addr, a := range answers {
			if !a.explicit {
				continue
			}
			e := Entry{Ready: a.verdict.Ready, Code: a.verdict.Code, Reason: a.verdict.Reason, Since: now}
			if prev, ok := last[addr]; ok && prev.Verdict() == a.verdict {
				e.Since = prev.Since
			}
			entries[addr] = e
		}
		changed := !written || !sameVerdicts(entries, last)
		if changed || now.Sub(lastWrite) >= o.Heartbeat {
			doc := Document{
				Format: FormatVersion, Publisher: o.Identity, Interval: o.Interval, Heartbeat: o.Heartbeat,
				Published: now, APIServers: entries,
			}
			seq, err := st.write(ctx, doc)
			switch {
			case err != nil && ctx.Err() != nil:
				return
			case err != nil:
				if !writeErr {
					log.Warn("cannot write the readiness ConfigMap; retrying every round", "error", err)
				}
				writeErr = true
			default:
				if writeErr {
					log.Info("writing the readiness ConfigMap again")
					writeErr = false
				}
				if changed {
					logChanges(log, last, entries, answers)
				}
				doc.Sequence = seq
				last, lastWrite, written = entries, now, true
				if o.OnPublish != nil {
					o.OnPublish(doc)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// round probes every target at once, keeping checkers (one kept-alive
// connection each) for the targets and closing those of addresses gone.
func (p *Publisher) round(ctx context.Context, checkers map[string]*checker, targets []string) map[string]answer {
	for addr, c := range checkers {
		if !slices.Contains(targets, addr) {
			c.close()
			delete(checkers, addr)
		}
	}
	for _, addr := range targets {
		if _, ok := checkers[addr]; !ok {
			checkers[addr] = newChecker(addr, p.opts.TLS, p.opts.Auth, p.opts.Dial)
		}
	}
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		out = make(map[string]answer, len(targets))
	)
	for _, addr := range targets {
		c := checkers[addr]
		wg.Go(func() {
			a := c.check(ctx, p.opts.Timeout)
			mu.Lock()
			out[addr] = a
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// logChanges logs each apiserver whose published verdict changed.
func logChanges(log *slog.Logger, before, after map[string]Entry, answers map[string]answer) {
	for addr, e := range after {
		if b, ok := before[addr]; ok && b.Verdict() == e.Verdict() {
			continue
		}
		if e.Ready {
			log.Info("publishing apiserver ready", "apiserver", addr)
		} else {
			log.Warn("publishing apiserver not ready", "apiserver", addr, "code", e.Code, "reason", e.Reason)
		}
	}
	for addr := range before {
		if _, ok := after[addr]; ok {
			continue
		}
		var why error
		if a, ok := answers[addr]; ok {
			why = a.err
		}
		log.Info("no explicit answer from apiserver; publishing no verdict for it (nodes use their own checks)",
			"apiserver", addr, "error", why)
	}
}
