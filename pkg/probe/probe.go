// Package probe runs active health checks against upstreams.
//
// Two questions, two signals (see Result). Liveness, "is the apiserver's
// process answering at all", is proved by any answer from its user space:
// an HTTP status of any code, an HTTP/2 PING acknowledged, or data
// received on the node's own proxied connections (Options.Heard).
// Readiness, "does it say it serves", is only ever what its readiness
// path answers: a check of this node, or the cluster's shared verdict
// (Options.Shared) when one is fresh. Liveness evidence never stands in
// for a readiness check.
//
// A Prober owns one goroutine per target. In HTTPS mode each target keeps
// a single kept-alive connection (HTTP/2 when offered) that every probe
// reuses: a TLS handshake per probe is real load on an apiserver when
// thousands of nodes probe it. Each round is one of:
//   - a GET of Path, with the configured credentials: a liveness proof and
//     this node's readiness answer. Rounds are GETs whenever readiness
//     must be checked here (no fresh shared verdict).
//   - with a fresh shared verdict, readiness comes from it and liveness
//     from an HTTP/2 PING, or from recent traffic (no I/O at all, at most
//     MaxSkipped rounds in a row).
//   - after a 401/403 without usable credentials, readiness cannot be
//     checked: liveness is kept with PINGs, and every MaxSkipped+1 rounds
//     a GET looks again.
//
// In TCP mode a probe is a connect. Results go to a Reporter. ProbeNow
// asks for an out-of-turn probe (always with I/O), to confirm or clear a
// failure the proxy saw on a client connection; Reassess asks for the
// shared verdict to be applied at once, without I/O.
package probe

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/extractedprism/extractedprism/pkg/failure"
)

// Mode is the kind of health check.
type Mode string

const (
	// HTTPS: GET Path over TLS (and HTTP/2 PINGs for liveness).
	HTTPS Mode = "https"
	// TCP: a successful connect is alive; readiness stays unknown.
	TCP Mode = "tcp"
)

// Reporter receives probe results.
type Reporter interface {
	Report(addr string, r Result)
}

// DialFunc dials a target.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Verdict is a shared readiness verdict about one target: what the
// apiserver's readiness path answered when checked once for the cluster.
type Verdict struct {
	Ready  bool
	Code   int
	Reason string
}

// Options configure a Prober.
type Options struct {
	Mode     Mode          // default HTTPS
	Path     string        // default "/readyz"
	Interval time.Duration // default 2s
	Timeout  time.Duration // default 2s
	// Jitter is the fraction of Interval added or removed at random (0..0.5).
	Jitter float64
	// TLS is the client TLS configuration for HTTPS mode (cloned per
	// connection). nil means no verification.
	TLS *tls.Config
	// BearerTokenFile, if set, holds a token sent with every GET of Path;
	// it is read again whenever the file changes. It is sent only when
	// TLS verifies the server: a token must not go to whoever answers on
	// an address.
	BearerTokenFile string
	// ClientCertFile and ClientKeyFile, if set, are a client certificate
	// presented on every probe connection; they are read again when
	// either changes, and the connection is then dialled anew.
	ClientCertFile, ClientKeyFile string
	// Dial dials targets (default net.Dialer).
	Dial     DialFunc
	Reporter Reporter
	// Observe, if set, is called after every reported round.
	Observe func(addr string, r Result)
	// Heard, if set, reports whether real traffic from addr arrived within
	// the given duration: liveness evidence that lets a due PING be
	// skipped (see skipWindow), at most MaxSkipped rounds in a row. It
	// never replaces a readiness check.
	Heard func(addr string, within time.Duration) bool
	// Shared, if set, returns the cluster's shared readiness verdict for
	// addr and whether a fresh one exists. While it does, this node checks
	// only liveness.
	Shared func(addr string) (Verdict, bool)
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
	opts  Options
	token *tokenFile // nil without BearerTokenFile
	cert  *keyPair   // nil without a client certificate

	mu      sync.Mutex
	targets map[string]*target
	runCtx  context.Context
	wg      sync.WaitGroup
	pending []string // targets set before Run

	warnMu sync.Mutex
	warned map[string]bool // credential problems already logged
}

// target is one probed address; its fields below the channels belong to
// its loop goroutine alone.
type target struct {
	addr   string
	cancel context.CancelFunc
	// now asks the loop for a probe at once; reassess for the shared
	// verdict to be applied without I/O (capacity 1: asks made while one
	// is pending merge into it).
	now      chan struct{}
	reassess chan struct{}

	conn      *conn
	lastOK    bool // the last reported round was a success
	lastAlive bool
	skipped   int  // rounds in a row answered without I/O, or with a PING while readiness cannot be checked
	noCheck   bool // the last GET said readiness cannot be checked with these credentials (401/403)
	noCheckAt int  // the status of that answer
}

// minProbeGap is the shortest time between the start of one probe of a
// target and the next, however often ProbeNow asks.
const minProbeGap = 100 * time.Millisecond

// MaxSkipped bounds how many rounds in a row may go without the fuller
// check: rounds that take liveness from traffic instead of a PING, and
// rounds that PING instead of GET after a 401/403 (so that new
// credentials or permissions are noticed within MaxSkipped+1 rounds).
const MaxSkipped = 4

// skipWindow is how recent traffic must be to stand in for a PING: the
// shortest time between two rounds, Interval × (1 − Jitter). With the
// round after a skipped one at most Interval × (1 + Jitter) later, a hang
// gets its first PING within 1.6 + 2.4 s of the last data at defaults,
// and is out within 1.6 + 2.4 + 2 + 0.5 + 2 = 8.5 s. Once an
// upstream stops sending (a hung process, a frozen VM) the next round at
// the latest finds its traffic older than that and pings, so the first
// check after a hang starts no later than without skipping.
func (o Options) skipWindow() time.Duration {
	return time.Duration(float64(o.Interval) * (1 - o.Jitter))
}

// New returns a Prober; nothing runs until Run.
func New(o Options) *Prober {
	p := &Prober{opts: o.withDefaults(), targets: map[string]*target{}, warned: map[string]bool{}}
	if p.opts.BearerTokenFile != "" {
		p.token = &tokenFile{path: p.opts.BearerTokenFile}
	}
	if p.opts.ClientCertFile != "" && p.opts.ClientKeyFile != "" {
		p.cert = &keyPair{certPath: p.opts.ClientCertFile, keyPath: p.opts.ClientKeyFile}
	}
	return p
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
		t := &target{addr: a, cancel: cancel, now: make(chan struct{}, 1), reassess: make(chan struct{}, 1)}
		t.conn = &conn{p: p, addr: a}
		p.targets[a] = t
		p.wg.Add(1)
		go p.loop(ctx, t)
	}
}

// ProbeNow asks for a probe of addr at once (at most one per
// minProbeGap); it does nothing if addr is not a target.
func (p *Prober) ProbeNow(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := p.targets[addr]; t != nil {
		kick(t.now)
	}
}

// Reassess asks every target to apply the shared readiness verdict at
// once, without I/O: call it when the verdicts change.
func (p *Prober) Reassess() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range p.targets {
		kick(t.reassess)
	}
}

func kick(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
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

// roundKind says why a round runs.
type roundKind uint8

const (
	due      roundKind = iota // the interval came round
	asked                     // ProbeNow: always with I/O
	reassess                  // Reassess: apply the shared verdict, no I/O
)

func (p *Prober) loop(ctx context.Context, t *target) {
	defer p.wg.Done()
	defer t.conn.close()
	timer := time.NewTimer(0) // first probe at once
	defer timer.Stop()
	var last time.Time
	for {
		kind := due
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-t.now:
			if gap := time.Until(last.Add(minProbeGap)); gap > 0 {
				timer.Reset(gap)
				continue
			}
			timer.Stop()
			kind = asked
		case <-t.reassess:
			kind = reassess
		}
		r, report := p.round(ctx, t, kind)
		if ctx.Err() != nil {
			return // cancelled mid-probe: not a verdict on the upstream
		}
		if kind == reassess {
			if report {
				p.emit(t, r)
				if !r.OK() && t.lastOK {
					// A shared "not ready": confirm it soon, as below.
					timer.Reset(p.confirmGap())
				}
				t.lastOK = r.OK()
			}
			continue // otherwise the next due round stays where it was
		}
		if r.Latency > 0 {
			last = time.Now()
		}
		next := p.next()
		if r.Evidence == EvidencePing {
			// A round taken by traffic is followed by an ordinary one: the
			// first PING after the traffic stops is then at most
			// skipWindow + Interval × (1 + Jitter) after the last data
			// (1.6 + 2.4 s at defaults).
			next = p.nextLive()
		}
		if report {
			p.emit(t, r)
			if !r.OK() && t.lastOK {
				// The first failure after successes: confirm it soon
				// rather than a whole interval later, so that an
				// apiserver that says "not ready" leaves rotation within
				// about one interval, not two.
				next = min(next, p.confirmGap())
			}
			t.lastOK = r.OK()
		}
		timer.Reset(next)
	}
}

func (p *Prober) emit(t *target, r Result) {
	if p.opts.Reporter != nil {
		p.opts.Reporter.Report(t.addr, r)
	}
	if p.opts.Observe != nil {
		p.opts.Observe(t.addr, r)
	}
	p.opts.Logger.Debug("probe", "upstream", t.addr, "alive", r.Alive, "evidence", r.Evidence.String(),
		"readiness", r.Readiness.String(), "shared", r.Shared, "latency", r.Latency, "err", r.Err)
}

// round runs one round for t and returns its result and whether to report
// it (false: it proved nothing either way).
func (p *Prober) round(ctx context.Context, t *target, kind roundKind) (Result, bool) {
	if p.opts.Mode == TCP {
		if kind == reassess {
			return Result{}, false
		}
		return p.finish(t, p.connect(ctx, t))
	}
	v, fresh := Verdict{}, false
	if p.opts.Shared != nil {
		v, fresh = p.opts.Shared(t.addr)
	}
	if !fresh {
		if kind == reassess {
			return Result{}, false
		}
		if kind == due && t.noCheck && t.skipped < MaxSkipped && t.lastAlive && t.conn.canPing() {
			// Readiness cannot be checked with these credentials: keep
			// liveness with a PING, and GET again now and then.
			r := p.live(ctx, t)
			r.Readiness, r.Note = ReadinessUnknown, unknownNote(t.noCheckAt)
			t.skipped++
			return p.finish(t, r)
		}
		return p.finish(t, p.check(ctx, t))
	}
	// Readiness from the shared verdict; liveness from this node.
	var r Result
	switch {
	case kind == reassess:
		if !t.lastAlive {
			return Result{}, false
		}
		r = Result{Alive: true, Evidence: EvidenceEarlier}
	case kind == due && t.lastAlive && t.skipped < MaxSkipped && p.opts.Heard != nil && p.opts.Heard(t.addr, p.opts.skipWindow()):
		// Real traffic just showed the upstream alive: a PING would only
		// add load to it.
		t.skipped++
		r = Result{Alive: true, Evidence: EvidenceTraffic}
	default:
		t.skipped = 0
		r = p.live(ctx, t)
	}
	if r.Alive {
		r.Shared, r.Code = true, v.Code
		if v.Ready {
			r.Readiness = Ready
		} else {
			r.Readiness, r.Err = Unready, unreadyErr(p.opts.Path, v.Code, true)
			if v.Reason != "" {
				r.Err = fmt.Errorf("%w: %s", r.Err, v.Reason)
			}
		}
	}
	return p.finish(t, r)
}

// finish records what the loop keeps of r and decides whether to report
// it: a probe that could not run for want of local resources (out of
// descriptors here) is no verdict on the upstream.
func (p *Prober) finish(t *target, r Result) (Result, bool) {
	if !r.Alive && failure.LocalExhaustion(r.Err) {
		p.opts.Logger.Warn("probe skipped: local resources exhausted", "upstream", t.addr, "err", r.Err)
		return r, false
	}
	if !r.Alive {
		// Drop a possibly wedged connection; the next probe dials anew.
		t.conn.close()
		t.skipped = 0
	}
	t.lastAlive = r.Alive
	return r, true
}

// connect is a TCP-mode round.
func (p *Prober) connect(ctx context.Context, t *target) Result {
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	start := time.Now()
	c, err := p.opts.Dial(ctx, "tcp", t.addr)
	r := Result{Latency: time.Since(start)}
	if err != nil {
		r.Err = fmt.Errorf("tcp probe: %w", err)
		return r
	}
	_ = c.Close()
	r.Alive, r.Evidence = true, EvidenceConnect
	return r
}

// live checks liveness only: a PING where the server speaks HTTP/2, else
// a GET whose status of any code proves the process alive.
func (p *Prober) live(ctx context.Context, t *target) Result {
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	start := time.Now()
	sent, err := t.conn.ping(ctx)
	if sent || err != nil {
		r := Result{Latency: time.Since(start)}
		if err != nil {
			r.Err = p.wrap(ctx, "ping", err)
			return r
		}
		r.Alive, r.Evidence = true, EvidencePing
		return r
	}
	_, err = t.conn.get(ctx, p.opts.Path, "", true)
	r := Result{Latency: time.Since(start)}
	if err != nil {
		r.Err = p.wrap(ctx, p.opts.Path, err)
		return r
	}
	r.Alive, r.Evidence = true, EvidenceAnswer
	return r
}

// check is a GET of Path with the credentials: liveness and this node's
// own readiness answer.
func (p *Prober) check(ctx context.Context, t *target) Result {
	ctx, cancel := context.WithTimeout(ctx, p.opts.Timeout)
	defer cancel()
	start := time.Now()
	// Rounds that are all GETs use HTTP/1.1; the GET of a round among PINGs
	// (readiness that could not be checked) uses their HTTP/2 connection.
	code, err := t.conn.get(ctx, p.opts.Path, p.bearer(), !t.noCheck)
	r := Result{Latency: time.Since(start), Code: code}
	t.skipped, t.noCheck = 0, false
	if err != nil {
		r.Err = p.wrap(ctx, p.opts.Path, err)
		return r
	}
	r.Alive, r.Evidence = true, EvidenceAnswer
	r.Readiness = readinessOf(code)
	switch r.Readiness {
	case Unready:
		r.Err = unreadyErr(p.opts.Path, code, false)
	case ReadinessUnknown:
		r.Note = unknownNote(code)
		t.noCheck, t.noCheckAt = true, code
	}
	return r
}

// bearer returns the token to send, or "" (logging once why not).
func (p *Prober) bearer() string {
	if p.token == nil {
		return ""
	}
	if p.opts.TLS == nil || p.opts.TLS.InsecureSkipVerify {
		p.warnOnce("token-unverified", "probe.bearer_token_file is set but probes do not verify the apiserver (no probe.ca_file): the token is not sent")
		return ""
	}
	tok, err := p.token.get()
	if err != nil {
		p.warnOnce("token:"+err.Error(), "probe token unusable; probing without it", "err", err)
		return ""
	}
	return tok
}

func (p *Prober) warnOnce(key, msg string, args ...any) {
	p.warnMu.Lock()
	seen := p.warned[key]
	p.warned[key] = true
	p.warnMu.Unlock()
	if !seen {
		p.opts.Logger.Warn(msg, args...)
	}
}

// wrap turns a failed round's error into what the set sees: a deadline
// becomes noAnswer (a timeout for failure.Classify).
func (p *Prober) wrap(ctx context.Context, what string, err error) error {
	if timedOut(ctx, err) {
		return noAnswer{path: what, timeout: p.opts.Timeout}
	}
	return fmt.Errorf("probe %s: %w", what, err)
}

// confirmGap is how soon a first failure is probed again: a quarter of
// the interval, at least minProbeGap.
func (p *Prober) confirmGap() time.Duration {
	return max(p.opts.Interval/4, minProbeGap)
}

// LivenessSpacing is how much longer than Interval the round after a PING
// that checked only liveness is: PINGs are what
// every node of a fleet sends every apiserver, so they are its main cost,
// and at 1.5 the hung-apiserver bound still holds: a hang is seen within
// Interval × LivenessSpacing × (1 + Jitter) + Timeout, confirmed a
// quarter Interval and a Timeout later (3.6 + 2 + 0.5 + 2 = 8.1 s at
// defaults, within the 8.8 s of rounds that GET).
const LivenessSpacing = 1.5

// nextLive returns the jittered delay until the round after one that
// checked liveness only.
func (p *Prober) nextLive() time.Duration {
	return time.Duration(float64(p.next()) * LivenessSpacing)
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
