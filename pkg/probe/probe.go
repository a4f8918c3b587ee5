// Package probe runs active health checks against upstreams.
//
// A Prober owns one goroutine per target. In HTTPS mode each target keeps a
// single kept-alive connection that every probe reuses (a TLS handshake per
// probe is real load on an apiserver when thousands of nodes probe it); in
// TCP mode a probe is a connect. Results go to a Reporter, which
// upstream.Set satisfies. ProbeNow asks for an out-of-turn probe, to
// confirm or clear a failure the proxy saw on a client connection. With
// Options.Heard, a due probe of a healthy target is skipped while real
// traffic from it shows it alive: on a busy fleet most probes are, which
// is most of what probing costs each apiserver.
package probe

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// Mode is the kind of health check.
type Mode string

const (
	// HTTPS: GET Path over TLS; healthy on status 200.
	HTTPS Mode = "https"
	// TCP: a successful connect is healthy.
	TCP Mode = "tcp"
)

// Reporter receives probe results. err is nil when ok.
type Reporter interface {
	Report(addr string, ok bool, latency time.Duration, err error)
}

// DialFunc dials a target.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Options configure a Prober.
type Options struct {
	Mode     Mode          // default HTTPS
	Path     string        // default "/readyz"
	Interval time.Duration // default 2s
	Timeout  time.Duration // default 2s
	// Jitter is the fraction of Interval added or removed at random (0..0.5).
	Jitter float64
	// TLS is the client TLS configuration for HTTPS mode (cloned per
	// target). nil means no verification.
	TLS *tls.Config
	// Dial dials targets (default net.Dialer).
	Dial     DialFunc
	Reporter Reporter
	// Observe, if set, is called after every probe.
	Observe func(addr string, ok bool, d time.Duration)
	// Heard, if set, reports whether real traffic from addr arrived within
	// the given duration. A due probe of a target whose last probe
	// succeeded is skipped while it did (see skipWindow), at most
	// MaxSkipped rounds in a row; ProbeNow's probes are never skipped.
	Heard  func(addr string, within time.Duration) bool
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.Mode == "" {
		o.Mode = HTTPS
	}
	if o.Path == "" {
		o.Path = "/readyz"
	}
	if o.Interval <= 0 {
		o.Interval = 2 * time.Second
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	if o.Jitter < 0 {
		o.Jitter = 0
	}
	if o.Jitter > 0.5 {
		o.Jitter = 0.5
	}
	if o.Dial == nil {
		d := &net.Dialer{}
		o.Dial = d.DialContext
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Prober probes a changing list of targets. Create it with New, start it
// with Run, change targets with SetTargets.
type Prober struct {
	opts Options

	mu      sync.Mutex
	targets map[string]*target
	runCtx  context.Context
	wg      sync.WaitGroup
	pending []string // targets set before Run
}

type target struct {
	addr   string
	cancel context.CancelFunc
	client *http.Client
	tr     *http.Transport
	// now asks the target's loop for a probe at once (capacity 1: asks
	// made while one is pending merge into it).
	now chan struct{}
}

// minProbeGap is the shortest time between the start of one probe of a
// target and the next, however often ProbeNow asks.
const minProbeGap = 100 * time.Millisecond

// MaxSkipped is how many due probes in a row Heard may skip: a target is
// probed at least every MaxSkipped+1 rounds (about 10 s at the default 2 s
// interval), so an apiserver that still sends data but turned unready is
// noticed even while traffic flows.
const MaxSkipped = 4

// skipWindow is how recent traffic must be for a due probe to be skipped:
// the shortest time between two rounds, Interval × (1 − Jitter). Once an
// upstream stops sending (a hung process, a frozen VM) the next round at
// the latest finds its traffic older than that and probes, so the first
// probe after a hang starts no later than without skipping.
func (o Options) skipWindow() time.Duration {
	return time.Duration(float64(o.Interval) * (1 - o.Jitter))
}

// New returns a Prober; nothing runs until Run.
func New(o Options) *Prober {
	return &Prober{opts: o.withDefaults(), targets: map[string]*target{}}
}

// SetTargets makes the prober check exactly addrs. New targets are probed
// at once; removed targets stop.
func (p *Prober) SetTargets(addrs []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.runCtx == nil {
		p.pending = slices.Clone(addrs)
		return
	}
	p.setLocked(addrs)
}

func (p *Prober) setLocked(addrs []string) {
	want := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		want[a] = true
	}
	for a, t := range p.targets {
		if !want[a] {
			t.cancel()
			delete(p.targets, a)
		}
	}
	for a := range want {
		if _, ok := p.targets[a]; ok || p.runCtx.Err() != nil {
			continue
		}
		ctx, cancel := context.WithCancel(p.runCtx)
		t := &target{addr: a, cancel: cancel, now: make(chan struct{}, 1)}
		if p.opts.Mode == HTTPS {
			t.tr = p.transport()
			t.client = &http.Client{Transport: t.tr, CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			}}
		}
		p.targets[a] = t
		p.wg.Add(1)
		go p.loop(ctx, t)
	}
}

// transport returns a transport that keeps exactly one idle HTTP/1.1
// connection per target.
func (p *Prober) transport() *http.Transport {
	var tlsConf *tls.Config
	if p.opts.TLS != nil {
		tlsConf = p.opts.TLS.Clone()
	} else {
		tlsConf = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // verification is opt-in via probe.ca_file
	}
	return &http.Transport{
		DialContext:         p.opts.Dial,
		TLSClientConfig:     tlsConf,
		TLSHandshakeTimeout: p.opts.Timeout,
		MaxIdleConns:        1,
		MaxIdleConnsPerHost: 1,
		MaxConnsPerHost:     1,
		IdleConnTimeout:     0, // keep it for as long as the apiserver does
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
		Proxy:               nil,
	}
}

// ProbeNow asks for a probe of addr at once (at most one per
// minProbeGap); it does nothing if addr is not a target.
func (p *Prober) ProbeNow(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := p.targets[addr]; t != nil {
		select {
		case t.now <- struct{}{}:
		default:
		}
	}
}

// Run probes until ctx is done, then stops every target goroutine and waits
// for them. It returns nil.
func (p *Prober) Run(ctx context.Context) error {
	p.mu.Lock()
	p.runCtx = ctx
	if p.pending != nil {
		p.setLocked(p.pending)
		p.pending = nil
	}
	p.mu.Unlock()
	<-ctx.Done()
	p.mu.Lock()
	for a, t := range p.targets {
		t.cancel()
		delete(p.targets, a)
	}
	p.mu.Unlock()
	p.wg.Wait()
	return nil
}

func (p *Prober) loop(ctx context.Context, t *target) {
	defer p.wg.Done()
	defer func() {
		if t.tr != nil {
			t.tr.CloseIdleConnections()
		}
	}()
	timer := time.NewTimer(0) // first probe at once
	defer timer.Stop()
	var last time.Time
	lastOK, skipped := false, 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			if lastOK && skipped < MaxSkipped && p.opts.Heard != nil && p.opts.Heard(t.addr, p.opts.skipWindow()) {
				// Real traffic just showed the upstream alive: a probe
				// would only add load to it.
				skipped++
				timer.Reset(p.next())
				continue
			}
		case <-t.now:
			if gap := time.Until(last.Add(minProbeGap)); gap > 0 {
				timer.Reset(gap)
				continue
			}
			timer.Stop()
		}
		start := time.Now()
		last = start
		err := p.once(ctx, t)
		d := time.Since(start)
		if ctx.Err() != nil {
			return // cancelled mid-probe: not a verdict on the upstream
		}
		if failure.LocalExhaustion(err) {
			// Out of descriptors here: not a verdict on the upstream.
			p.opts.Logger.Warn("probe skipped: local resources exhausted", "upstream", t.addr, "err", err)
			timer.Reset(p.next())
			continue
		}
		ok := err == nil
		lastOK, skipped = ok, 0
		if !ok && t.tr != nil {
			// Drop a possibly wedged connection; the next probe dials anew.
			t.tr.CloseIdleConnections()
		}
		if p.opts.Reporter != nil {
			p.opts.Reporter.Report(t.addr, ok, d, err)
		}
		if p.opts.Observe != nil {
			p.opts.Observe(t.addr, ok, d)
		}
		p.opts.Logger.Debug("probe", "upstream", t.addr, "ok", ok, "latency", d, "err", err)
		timer.Reset(p.next())
	}
}

// next returns the jittered delay until the next probe.
func (p *Prober) next() time.Duration {
	iv := p.opts.Interval
	if p.opts.Jitter == 0 {
		return iv
	}
	f := 1 + p.opts.Jitter*(2*rand.Float64()-1) //nolint:gosec // jitter needs no crypto randomness
	return time.Duration(float64(iv) * f)
}

// noAnswer is the error of a probe that got no answer within the timeout;
// failure.Classify sees it as a timeout.
type noAnswer struct {
	path    string
	timeout time.Duration
}

func (e noAnswer) Error() string {
	return fmt.Sprintf("probe %s: no answer within %s", e.path, e.timeout)
}

// Timeout reports true: the upstream did not answer in time.
func (noAnswer) Timeout() bool { return true }

func (p *Prober) once(ctx context.Context, t *target) error {
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	if p.opts.Mode == TCP {
		c, err := p.opts.Dial(ctx, "tcp", t.addr)
		if err != nil {
			return fmt.Errorf("tcp probe: %w", err)
		}
		return c.Close()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+t.addr+p.opts.Path, nil)
	if err != nil {
		return fmt.Errorf("build probe request: %w", err)
	}
	req.Header.Set("User-Agent", "extractedprism-probe")
	req.Header.Set("Accept", "text/plain")
	resp, err := t.client.Do(req)
	if err != nil {
		if ctx.Err() != nil && errors.Is(err, context.DeadlineExceeded) {
			return noAnswer{path: p.opts.Path, timeout: p.opts.Timeout}
		}
		return fmt.Errorf("probe %s: %w", p.opts.Path, err)
	}
	// Read the (small) body to the end so the connection is reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("probe %s: %w %d", p.opts.Path, failure.ErrUnready, resp.StatusCode)
	}
	return nil
}
