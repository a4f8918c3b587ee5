// Package admin serves the health and introspection endpoints on the admin
// port: /healthz (liveness), /readyz (readiness), /status (JSON) and
// /metrics (Prometheus). It owns no state: the daemon injects functions
// that report the truth at the time of each request.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// Check reports a condition and a one-line reason.
type Check func() (ok bool, reason string)

// Options configure a Server.
type Options struct {
	// Alive backs /healthz: false only when restarting the process is the
	// cure (the accept loop died).
	Alive Check
	// Ready backs /readyz.
	Ready Check
	// Status builds the /status document.
	Status func() status.Document
	// Metrics serves /metrics; nil means 404.
	Metrics http.Handler
	Logger  *slog.Logger
}

// Server is the admin HTTP server.
type Server struct {
	o   Options
	mux *http.ServeMux
}

// New returns a Server.
func New(o Options) *Server {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{o: o, mux: http.NewServeMux()}
	s.mux.HandleFunc("/healthz", s.check(func() Check { return s.o.Alive }))
	s.mux.HandleFunc("/livez", s.check(func() Check { return s.o.Alive }))
	s.mux.HandleFunc("/readyz", s.check(func() Check { return s.o.Ready }))
	s.mux.HandleFunc("/status", s.status)
	if o.Metrics != nil {
		s.mux.Handle("/metrics", o.Metrics)
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

// Serve answers on ln until ctx is done, then shuts down (giving requests
// in flight up to two seconds). ln is closed when Serve returns.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.o.Logger.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(newReserveListener(ln)) }()
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
