// Package admin serves the health and introspection endpoints on the admin
// port: /healthz (liveness), /readyz (readiness), /status (JSON) and
// /metrics (Prometheus). It owns no state: the daemon injects functions
// that report the truth at the time of each request.
//
// Anything on the node can reach the admin port, so what one caller can
// make the server hold or compute is bounded: request headers are capped
// at MaxHeaderBytes and must arrive within ReadHeaderTimeout, at most
// Options.MaxConns connections are held at once (the oldest idle or
// still-sending one makes room for a new one), and /metrics is rendered at
// most once per Options.MetricsInterval for all callers together, so
// kubelet's /healthz and /readyz probes keep answering under a flood.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// Check reports a condition and a one-line reason.
type Check func() (ok bool, reason string)

// Options configure a Server.
type Options struct {
	// Alive backs /healthz: false only when restarting the process is the
	// cure (the accept loop or an event loop of the data path died).
	Alive Check
	// Ready backs /readyz.
	Ready Check
	// Status builds the /status document.
	Status func() status.Document
	// Metrics serves /metrics; nil means 404. Its answers are cached for
	// MetricsInterval.
	Metrics http.Handler
	// MetricsInterval is the shortest time between two renders of
	// Metrics (0: DefaultMetricsInterval).
	MetricsInterval time.Duration
	// MaxConns caps the connections held at once (0: DefaultMaxConns).
	MaxConns int
	// Clock returns the current time (nil: time.Now).
	Clock  func() time.Time
	Logger *slog.Logger
}

// Bounds of the admin server.
const (
	// DefaultMaxConns is the default cap of connections held at once:
	// kubelet's two probes, a scraper and an operator need a handful.
	DefaultMaxConns = 32
	// DefaultMetricsInterval is the default shortest time between two
	// renders of /metrics.
	DefaultMetricsInterval = time.Second
	// MaxHeaderBytes caps a request's header: ours are a few hundred
	// bytes, and a larger cap lets each connection hold more memory.
	MaxHeaderBytes = 8 << 10
	// ReadHeaderTimeout is the time a connection gets to send a request
	// header, so a slow sender holds its place only briefly.
	ReadHeaderTimeout = 2 * time.Second
	// ReadTimeout, WriteTimeout and IdleTimeout bound the rest of a
	// request, its answer, and a kept-alive connection between requests.
	ReadTimeout  = 5 * time.Second
	WriteTimeout = 10 * time.Second
	IdleTimeout  = 30 * time.Second
)

// Server is the admin HTTP server.
type Server struct {
	o       Options
	mux     *http.ServeMux
	metrics *metricsCache

	mu      sync.Mutex
	limiter *connLimiter
}

// New returns a Server.
func New(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.MaxConns <= 0 {
		o.MaxConns = DefaultMaxConns
	}
	if o.MetricsInterval <= 0 {
		o.MetricsInterval = DefaultMetricsInterval
	}
	s := &Server{o: o, mux: http.NewServeMux()}
	s.mux.HandleFunc("/healthz", s.check(func() Check { return s.o.Alive }))
	s.mux.HandleFunc("/livez", s.check(func() Check { return s.o.Alive }))
	s.mux.HandleFunc("/readyz", s.check(func() Check { return s.o.Ready }))
	s.mux.HandleFunc("/status", s.status)
	if o.Metrics != nil {
		s.metrics = newMetricsCache(o.Metrics, o.MetricsInterval, o.Clock)
		s.mux.Handle("/metrics", s.metrics)
	}
	return s
}

// Handler returns the HTTP handler (for tests and embedding).
func (s *Server) Handler() http.Handler { return s.mux }

func allowRead(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

func (s *Server) check(get func() Check) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !allowRead(w, r) {
			return
		}
		ok, reason := false, "not configured"
		if c := get(); c != nil {
			ok, reason = c()
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		if r.Method == http.MethodGet {
			if ok {
				_, _ = fmt.Fprintf(w, "ok: %s\n", reason)
			} else {
				_, _ = fmt.Fprintf(w, "not ok: %s\n", reason)
			}
		}
	}
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	if !allowRead(w, r) {
		return
	}
	if s.o.Status == nil {
		http.Error(w, "status not available", http.StatusNotFound)
		return
	}
	d := s.o.Status()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		return
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(d)
}

// Stats are counters of the connection cap, for tests and diagnostics.
type Stats struct {
	// Conns is the number of connections held now.
	Conns int
	// Oversized is how many of them have sent more of a request than a
	// real client would without it reaching a handler: the first to make
	// room for a newcomer.
	Oversized int
	// Shed is the number of connections closed to stay under the cap.
	Shed uint64
	// MetricsRenders is the number of renders of /metrics so far.
	MetricsRenders uint64
}

// Stats returns the current counters.
func (s *Server) Stats() Stats {
	var st Stats
	s.mu.Lock()
	l := s.limiter
	s.mu.Unlock()
	if l != nil {
		st.Conns, st.Oversized, st.Shed = l.held()
	}
	if s.metrics != nil {
		st.MetricsRenders = s.metrics.rendered()
	}
	return st
}

// Serve answers on ln until ctx is done, then shuts down (giving requests
// in flight up to two seconds). ln is closed when Serve returns.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	limiter := newConnLimiter(newReserveListener(ln), s.o.MaxConns, s.o.Clock)
	s.mu.Lock()
	s.limiter = limiter
	s.mu.Unlock()
	srv := &http.Server{
		Handler:           limiter.wrap(s.mux),
		MaxHeaderBytes:    MaxHeaderBytes,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		ConnState:         limiter.connState,
		ConnContext:       limiter.connContext,
		ErrorLog:          slog.NewLogLogger(s.o.Logger.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(limiter) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("admin server on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("admin server on %s: %w", ln.Addr(), err)
	}
	return nil
}
