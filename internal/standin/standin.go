// Package standin is a small stand-in for kube-apiserver, used by tests, the
// demo and the benchmarks. It serves HTTPS (HTTP/1.1 and h2) with a
// self-signed certificate generated in memory and answers the paths a
// load balancer in front of kube-apiserver cares about:
//
//	GET  /readyz, /healthz, /livez  200 "ok", or 500 while unready
//	GET  /                          small JSON naming the server
//	GET  /version                   JSON shaped like kube-apiserver's
//	GET  /bulk?bytes=N              N bytes of payload, fast
//	GET  /stream?interval=100ms     one line per interval until the client goes
//	POST /control/ready             become ready
//	POST /control/unready           become unready (only health paths change)
//	POST /control/slow?delay=6s     become slow: new connections get their
//	                                first byte (the TLS ServerHello) and every
//	                                answer but /control/* comes that late
//	POST /control/fast              answer at once again
//
// Two failure modes imitate broken apiservers below the HTTP layer: Hang
// accepts TCP connections and never reads from or answers them, and
// ResetAfterAccept accepts and immediately resets them.
//
// Authentication imitates kube-apiserver's. A request is authenticated by a
// client certificate verified against Options.ClientCAs (its subject's
// common name is the user) or by an accepted bearer token (Options.Tokens,
// SetTokens, Options.TokenFile); a request with neither is anonymous, and a
// request with a token that is not accepted is answered 401. With
// RequireAuth (kube-apiserver --anonymous-auth=false) every anonymous
// request is answered 401 with kube-apiserver's Status body, health paths
// included, except those to AllowAnonymousPaths. ForbidHealth answers 403
// to anonymous requests of the health paths, as an RBAC without the
// system:public-info-viewer binding does. The /control/* paths never ask
// for credentials, so that tests can always drive the server.
package standin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for Options fields left zero.
const (
	DefaultAddr           = "127.0.0.1:0"
	DefaultName           = "standin"
	DefaultStreamInterval = 100 * time.Millisecond
	// MaxBulkBytes bounds a single /bulk answer (64 GiB).
	MaxBulkBytes = 64 << 30
	// minStreamInterval keeps /stream from turning into a busy loop.
	minStreamInterval = time.Millisecond
)

// Options configure a Server. The zero value is usable: a ready server named
// "standin" on a free loopback port.
type Options struct {
	// Addr is the TCP address to listen on ("host:port"; port 0 picks one).
	Addr string
	// Name identifies this server in answers to GET / and in logs, so a
	// client behind a balancer can tell which upstream answered.
	Name string
	// Logger receives lifecycle messages and, at debug level, net/http's own
	// errors (TLS handshake failures from TCP probes and the like).
	Logger *slog.Logger
	// Unready starts the server unready: health paths answer 500.
	Unready bool
	// LiveWhileUnready keeps /healthz and /livez at 200 while unready, so
	// that only /readyz fails, as kube-apiserver behaves while it shuts down
	// gracefully. By default all three health paths fail while unready.
	LiveWhileUnready bool
	// Hang makes the server accept TCP connections and never read or answer.
	Hang bool
	// ResetAfterAccept makes the server reset every connection right after
	// accepting it.
	ResetAfterAccept bool
	// HandshakeTimeout is how long a new connection may take to send its
	// request headers, TLS handshake included, before it is closed
	// (kube-apiserver: 32 s; default 10 s).
	HandshakeTimeout time.Duration
	// SendBuffer, when set, is the SO_SNDBUF of every accepted connection:
	// what one connection may keep in flight towards its client. A test
	// that runs many slow clients and the stand-ins on one machine sets it
	// so that the stand-ins' socket memory, which a real apiserver keeps on
	// its own machine, does not exhaust this one's net.ipv4.tcp_mem.
	SendBuffer int
	// Certificate is served instead of a freshly generated one when set.
	Certificate *tls.Certificate

	// RequireAuth refuses anonymous requests with 401, like
	// kube-apiserver --anonymous-auth=false. By default anonymous
	// requests are served.
	RequireAuth bool
	// Tokens are the accepted bearer tokens (SetTokens replaces them).
	Tokens []string
	// TokenFile is a file of further accepted bearer tokens in
	// kube-apiserver's --token-auth-file format (a CSV line per token:
	// token,user,uid,groups; a line of the token alone will do). It is read
	// again whenever its modification time or size changes, so that tests
	// can rotate tokens; an unreadable file at Start is an error, later
	// the tokens of its last good read stay.
	TokenFile string
	// ClientCAs authenticate client certificates: a connection presenting
	// one must verify against them (tls.VerifyClientCertIfGiven), and its
	// requests are then authenticated as the certificate's common name.
	ClientCAs *x509.CertPool
	// AllowAnonymousPaths are served to anonymous requests even with
	// RequireAuth, like the paths of kube-apiserver's
	// AuthenticationConfiguration anonymous.conditions (exact paths, such
	// as "/readyz").
	AllowAnonymousPaths []string
	// ForbidHealth answers 403 to anonymous requests of /readyz, /healthz
	// and /livez, as kube-apiserver does when RBAC grants anonymous users
	// nothing (no system:public-info-viewer binding).
	ForbidHealth bool
}

// Server is a running stand-in apiserver. It owns a goroutine serving the
// listener and the per-connection goroutines of net/http; Close stops all of
// them.
type Server struct {
	name     string
	log      *slog.Logger
	liveOK   bool
	sndBuf   int // SO_SNDBUF of accepted connections, 0 = the kernel's autotuning
	ln       net.Listener
	srv      *http.Server
	cert     tls.Certificate
	leaf     *x509.Certificate
	ready    atomic.Bool
	hang     atomic.Bool
	reset    atomic.Bool
	delay    atomic.Int64 // time.Duration of slowness, 0 = fast
	requests atomic.Int64
	started  time.Time
	auth     *authenticator

	stopping    chan struct{} // closed to end open streams
	streamsOnce sync.Once
	stopOnce    sync.Once
	done        chan struct{} // closed when the serve goroutine has returned
	serveErr    error
	stopCtx     func() bool
	handlerMu   sync.RWMutex
	closed      bool
	handlers    sync.WaitGroup

	heldMu     sync.Mutex
	held       map[net.Conn]struct{} // connections accepted in Hang mode
	heldClosed bool
}

// Start listens on opts.Addr and serves until ctx is cancelled or Close or
// Shutdown is called. The server is accepting connections when Start
// returns. Cancelling ctx has the effect of Close.
func Start(ctx context.Context, opts Options) (*Server, error) {
	if opts.Addr == "" {
		opts.Addr = DefaultAddr
	}
	if opts.Name == "" {
		opts.Name = DefaultName
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	host, _, err := net.SplitHostPort(opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("standin: addr %q: %w", opts.Addr, err)
	}
	var cert tls.Certificate
	if opts.Certificate != nil {
		cert = *opts.Certificate
	} else {
		cert, _, err = GenerateCertificate(host)
		if err != nil {
			return nil, err
		}
	}
	leaf := cert.Leaf
	if leaf == nil && len(cert.Certificate) > 0 {
		leaf, err = x509.ParseCertificate(cert.Certificate[0])
		if err != nil {
			return nil, fmt.Errorf("standin: parse certificate: %w", err)
		}
	}
	auth, err := newAuthenticator(opts)
	if err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("standin: listen on addr %q: %w", opts.Addr, err)
	}
	s := &Server{
		name:     opts.Name,
		log:      opts.Logger.With("standin", opts.Name, "addr", ln.Addr().String()),
		liveOK:   opts.LiveWhileUnready,
		sndBuf:   opts.SendBuffer,
		ln:       ln,
		cert:     cert,
		leaf:     leaf,
		started:  time.Now(),
		auth:     auth,
		stopping: make(chan struct{}),
		done:     make(chan struct{}),
		held:     make(map[net.Conn]struct{}),
	}
	s.ready.Store(!opts.Unready)
	s.hang.Store(opts.Hang)
	s.reset.Store(opts.ResetAfterAccept)
	handshake := opts.HandshakeTimeout
	if handshake <= 0 {
		handshake = 10 * time.Second
	}
	s.srv = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: handshake,
		IdleTimeout:       10 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		TLSConfig:         tlsConfig(cert, opts.ClientCAs),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	go func() {
		defer close(s.done)
		err := s.srv.ServeTLS(&modeListener{Listener: ln, s: s}, "", "")
		if !errors.Is(err, http.ErrServerClosed) {
			s.serveErr = fmt.Errorf("standin %s: serve: %w", s.name, err)
		}
	}()
	s.stopCtx = context.AfterFunc(ctx, func() { _ = s.Close() })
	s.log.Info("standin listening", "ready", s.ready.Load(), "hang", opts.Hang, "reset_after_accept", opts.ResetAfterAccept,
		"require_auth", opts.RequireAuth, "client_cas", opts.ClientCAs != nil, "forbid_health", opts.ForbidHealth)
	return s, nil
}

func tlsConfig(cert tls.Certificate, clientCAs *x509.CertPool) *tls.Config {
	c := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
	}
	if clientCAs != nil {
		c.ClientCAs = clientCAs
		c.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return c
}

// Addr is the bound listen address ("127.0.0.1:34567").
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Name is the server's name as given in Options.
func (s *Server) Name() string { return s.name }

// URL is "https://" + Addr().
func (s *Server) URL() string { return "https://" + s.Addr() }

// Certificate is the parsed serving certificate (self-signed, so it is its
// own CA).
func (s *Server) Certificate() *x509.Certificate { return s.leaf }

// CertPool holds the serving certificate, for clients that verify it.
func (s *Server) CertPool() *x509.CertPool {
	p := x509.NewCertPool()
	if s.leaf != nil {
		p.AddCert(s.leaf)
	}
	return p
}

// Requests counts HTTP requests answered so far.
func (s *Server) Requests() int64 { return s.requests.Load() }

// SetReady switches the health paths between 200 and 500.
func (s *Server) SetReady(ready bool) {
	if s.ready.Swap(ready) != ready {
		s.log.Info("standin readiness changed", "ready", ready)
	}
}

// Ready reports whether the health paths answer 200.
func (s *Server) Ready() bool { return s.ready.Load() }

// SetTokens replaces the accepted bearer tokens of Options.Tokens (those
// of Options.TokenFile stay accepted); requests from now on are checked
// against them.
func (s *Server) SetTokens(tokens []string) {
	s.auth.setTokens(tokens)
	s.log.Info("standin tokens changed", "count", len(tokens))
}

// SetHang switches Hang mode for connections accepted from now on.
func (s *Server) SetHang(hang bool) { s.hang.Store(hang) }

// SetResetAfterAccept switches ResetAfterAccept mode for connections
// accepted from now on.
func (s *Server) SetResetAfterAccept(reset bool) { s.reset.Store(reset) }

// Close stops the server abruptly, like a crash that lets the kernel close
// the sockets: the listener and every connection are closed at once,
// streams end. It returns when every goroutine the server started has
// finished. Close is idempotent and safe to call concurrently.
func (s *Server) Close() error {
	s.beginStop(false)
	err := s.srv.Close()
	s.endStreams()
	return s.finish(err)
}

// Shutdown stops the server gracefully: the listener closes, open streams
// end, idle connections close, and in-flight requests may finish until ctx
// is done; then the rest is closed as by Close.
func (s *Server) Shutdown(ctx context.Context) error {
	s.beginStop(true)
	err := s.srv.Shutdown(ctx)
	if err != nil {
		err = errors.Join(err, s.srv.Close())
	}
	return s.finish(err)
}

// Wait blocks until the server has stopped (after Close, Shutdown or the
// cancellation of Start's context) and returns the serve error, if any.
func (s *Server) Wait() error {
	<-s.done
	s.handlers.Wait()
	return s.serveErr
}

// Done is closed once the serve goroutine has returned.
func (s *Server) Done() <-chan struct{} { return s.done }

// beginStop marks the server closed for new requests; streams end now when
// graceful, else only after the connections were closed under them.
func (s *Server) beginStop(graceful bool) {
	s.stopOnce.Do(func() {
		s.stopCtx()
		s.handlerMu.Lock()
		s.closed = true
		s.handlerMu.Unlock()
		s.log.Info("standin stopping", "graceful", graceful)
	})
	if graceful {
		s.endStreams()
	}
}

func (s *Server) endStreams() {
	s.streamsOnce.Do(func() { close(s.stopping) })
}

func (s *Server) finish(err error) error {
	s.heldMu.Lock()
	s.heldClosed = true
	for c := range s.held {
		_ = c.Close()
		delete(s.held, c)
	}
	s.heldMu.Unlock()
	<-s.done
	s.handlers.Wait()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// hold keeps a Hang-mode connection open, unread, until the server stops.
func (s *Server) hold(c net.Conn) {
	s.heldMu.Lock()
	defer s.heldMu.Unlock()
	if s.heldClosed {
		_ = c.Close()
		return
	}
	s.held[c] = struct{}{}
}

// modeListener applies Hang and ResetAfterAccept before net/http sees a
// connection.
type modeListener struct {
	net.Listener
	s *Server
}

func (l *modeListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		switch {
		case l.s.reset.Load():
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			_ = c.Close()
		case l.s.hang.Load():
			l.s.hold(c)
		default:
			if n := l.s.sndBuf; n > 0 {
				if tc, ok := c.(*net.TCPConn); ok {
					_ = tc.SetWriteBuffer(n)
				}
			}
			if d := time.Duration(l.s.delay.Load()); d > 0 {
				return &slowConn{Conn: c, delay: d}, nil
			}
			return c, nil
		}
	}
}

// slowConn delays its first read: the client's first bytes (a TLS
// ClientHello) are answered that much later.
type slowConn struct {
	net.Conn
	delay time.Duration
	once  sync.Once
}

func (c *slowConn) Read(b []byte) (int, error) {
	c.once.Do(func() { time.Sleep(c.delay) }) //nolint:forbidigo // the imitated slowness itself
	return c.Conn.Read(b)
}

// SetSlow makes the server answer new connections and requests d late
// (0: at once).
func (s *Server) SetSlow(d time.Duration) {
	s.delay.Store(int64(max(d, 0)))
	s.log.Info("standin speed changed", "delay", d)
}

func (s *Server) slow(w http.ResponseWriter, r *http.Request) {
	d, err := time.ParseDuration(r.URL.Query().Get("delay"))
	if err != nil || d < 0 {
		http.Error(w, "delay: want a duration such as 6s", http.StatusBadRequest)
		return
	}
	s.SetSlow(d)
	writeJSON(w, map[string]any{"name": s.name, "delay": d.String()})
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", s.health(false))
	mux.HandleFunc("GET /healthz", s.health(true))
	mux.HandleFunc("GET /livez", s.health(true))
	mux.HandleFunc("GET /version", s.version)
	mux.HandleFunc("GET /bulk", s.bulk)
	mux.HandleFunc("GET /stream", s.stream)
	mux.HandleFunc("POST /control/ready", s.control(true))
	mux.HandleFunc("POST /control/unready", s.control(false))
	mux.HandleFunc("POST /control/slow", s.slow)
	mux.HandleFunc("POST /control/fast", func(w http.ResponseWriter, _ *http.Request) {
		s.SetSlow(0)
		writeJSON(w, map[string]any{"name": s.name, "delay": "0s"})
	})
	mux.HandleFunc("GET /{$}", s.root)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.handlerMu.RLock()
		if s.closed {
			s.handlerMu.RUnlock()
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		s.handlers.Add(1)
		s.handlerMu.RUnlock()
		defer s.handlers.Done()
		s.requests.Add(1)
		w.Header().Set("X-Standin-Name", s.name)
		control := strings.HasPrefix(r.URL.Path, "/control/")
		if d := time.Duration(s.delay.Load()); d > 0 && !control {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
		if !control {
			user, ok := s.auth.check(w, r)
			if !ok {
				return
			}
			r = r.WithContext(context.WithValue(r.Context(), userKey{}, user))
		}
		mux.ServeHTTP(w, r)
	})
}

func (s *Server) health(live bool) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if s.ready.Load() || (live && s.liveOK) {
			_, _ = io.WriteString(w, "ok")
			return
		}
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = io.WriteString(w, "[-]standin-ready failed: reason withheld\nhealthz check failed")
	}
}

// userKey carries the authenticated user in a request's context.
type userKey struct{}

// RootInfo is the JSON answer to GET /.
type RootInfo struct {
	Kind  string `json:"kind"`
	Name  string `json:"name"`
	Addr  string `json:"addr"`
	Ready bool   `json:"ready"`
	Proto string `json:"proto"`
	// User is who the request was authenticated as: a client
	// certificate's common name, the user of a token file line, "token"
	// for another accepted token, or UserAnonymous.
	User string `json:"user"`
}

func (s *Server) root(w http.ResponseWriter, r *http.Request) {
	user, _ := r.Context().Value(userKey{}).(string)
	writeJSON(w, RootInfo{Kind: "Standin", Name: s.name, Addr: s.Addr(), Ready: s.ready.Load(), Proto: r.Proto, User: user})
}

// VersionInfo mirrors the JSON kube-apiserver answers on /version.
type VersionInfo struct {
	Major        string `json:"major"`
	Minor        string `json:"minor"`
	GitVersion   string `json:"gitVersion"`
	GitCommit    string `json:"gitCommit"`
	GitTreeState string `json:"gitTreeState"`
	BuildDate    string `json:"buildDate"`
	GoVersion    string `json:"goVersion"`
	Compiler     string `json:"compiler"`
	Platform     string `json:"platform"`
}

func (s *Server) version(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, VersionInfo{
		Major: "1", Minor: "35", GitVersion: "v1.35.4-standin",
		GitCommit: "0000000000000000000000000000000000000000", GitTreeState: "clean",
		BuildDate: s.started.UTC().Format(time.RFC3339), GoVersion: runtime.Version(),
		Compiler: runtime.Compiler, Platform: runtime.GOOS + "/" + runtime.GOARCH,
	})
}

func writeJSON(w http.ResponseWriter, v any) { writeJSONStatus(w, http.StatusOK, v) }

func writeJSONStatus(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

var bulkChunk = func() []byte {
	b := make([]byte, 256<<10)
	for i := range b {
		b[i] = byte('a' + i%26)
	}
	return b
}()

func (s *Server) bulk(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query().Get("bytes")
	n, err := strconv.ParseInt(q, 10, 64)
	if err != nil || n < 0 || n > MaxBulkBytes {
		http.Error(w, fmt.Sprintf("query parameter bytes=%q: want an integer between 0 and %d", q, int64(MaxBulkBytes)), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	for n > 0 {
		chunk := bulkChunk
		if int64(len(chunk)) > n {
			chunk = chunk[:n]
		}
		if _, err := w.Write(chunk); err != nil {
			return
		}
		n -= int64(len(chunk))
	}
}

// StreamEvent is one line of /stream output.
type StreamEvent struct {
	Type   string `json:"type"`
	Server string `json:"server"`
	Seq    int64  `json:"seq"`
}

func (s *Server) stream(w http.ResponseWriter, r *http.Request) {
	interval := DefaultStreamInterval
	if q := r.URL.Query().Get("interval"); q != "" {
		d, err := time.ParseDuration(q)
		if err != nil || d < minStreamInterval {
			http.Error(w, fmt.Sprintf("query parameter interval=%q: want a duration of at least %s", q, minStreamInterval), http.StatusBadRequest)
			return
		}
		interval = d
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	t := time.NewTicker(interval)
	defer t.Stop()
	enc := json.NewEncoder(w)
	for seq := int64(0); ; seq++ {
		if err := enc.Encode(StreamEvent{Type: "TICK", Server: s.name, Seq: seq}); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
		select {
		case <-t.C:
		case <-r.Context().Done():
			return
		case <-s.stopping:
			return
		}
	}
}

func (s *Server) control(ready bool) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		s.SetReady(ready)
		writeJSON(w, map[string]any{"name": s.name, "ready": ready})
	}
}
