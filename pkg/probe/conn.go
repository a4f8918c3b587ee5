package probe

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"

	"golang.org/x/net/http2"
)

// conn is one target's kept-alive probe connection, owned by the target's
// loop goroutine. It speaks HTTP/2 when the server offers it, so that
// liveness can be an HTTP/2 PING (a quarter of what a GET costs the
// apiserver) and readiness a GET on the same connection; against a server
// that only speaks HTTP/1.1 every check is a GET.
type conn struct {
	p    *Prober
	addr string

	h2      *http2.ClientConn //nolint:staticcheck // net/http's ClientConn cannot send a PING; x/net/http2's is the one that can
	certGen uint64            // generation of the client certificate h2 was dialled with
	noH2    bool              // the server chose HTTP/1.1: use h1 from now on
	h1      *http.Client
	tr      *http.Transport
	h1Gen   uint64 // generation of the client certificate of h1's connections
	// spare is the TLS connection on which the server chose HTTP/1.1,
	// handed to the h1 transport's first dial so that no handshake is
	// wasted. The transport dials on goroutines of its own, so spare is
	// guarded by mu.
	mu    sync.Mutex
	spare net.Conn
}

// h2Transport creates client connections on connections dialled here.
var h2Transport = &http2.Transport{} //nolint:staticcheck // see conn.h2

// canPing reports whether the next liveness check can be a PING.
func (c *conn) canPing() bool { return !c.noH2 }

func (c *conn) close() {
	if c.h2 != nil {
		_ = c.h2.Close()
		c.h2 = nil
	}
	c.mu.Lock()
	if c.spare != nil {
		_ = c.spare.Close()
		c.spare = nil
	}
	c.mu.Unlock()
	if c.tr != nil {
		c.tr.CloseIdleConnections()
	}
}

// ensureH2 returns a usable HTTP/2 connection, dialling one if needed (and
// dropping an idle HTTP/1.1 one); it returns nil, nil when the server
// turned out to speak only HTTP/1.1.
func (c *conn) ensureH2(ctx context.Context) (*http2.ClientConn, error) { //nolint:staticcheck // see conn.h2
	if c.noH2 {
		return nil, nil
	}
	gen := c.p.certGen()
	if c.h2 != nil && (!c.h2.CanTakeNewRequest() || gen != c.certGen) {
		// Going away (a GOAWAY, a closed connection), or a renewed
		// client certificate to present: dial anew.
		_ = c.h2.Close()
		c.h2 = nil
	}
	if c.h2 != nil {
		return c.h2, nil
	}
	tc, err := c.dialTLS(ctx, http2.NextProtoTLS, "http/1.1")
	if err != nil {
		return nil, err
	}
	if tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		c.noH2 = true
		if c.tr != nil {
			// HTTP/1.1 already has its connection: keep one.
			_ = tc.Close()
			return nil, nil
		}
		c.mu.Lock()
		c.spare = tc
		c.mu.Unlock()
		return nil, nil
	}
	cc, err := h2Transport.NewClientConn(tc) //nolint:staticcheck // see conn.h2
	if err != nil {
		_ = tc.Close()
		return nil, fmt.Errorf("http2: %w", err)
	}
	c.h2, c.certGen = cc, gen
	if c.tr != nil {
		c.tr.CloseIdleConnections() // one connection per target
	}
	return cc, nil
}

// ping sends an HTTP/2 PING and waits for its acknowledgement. ok is
// false when the server does not speak HTTP/2 (then nothing was sent).
func (c *conn) ping(ctx context.Context) (ok bool, err error) {
	cc, err := c.ensureH2(ctx)
	if err != nil || cc == nil {
		return false, err
	}
	if err := cc.Ping(ctx); err != nil {
		return true, fmt.Errorf("http2 ping: %w", err)
	}
	return true, nil
}

// get sends GET path and returns the status. A token, if given, goes in
// an Authorization header. A GET costs kube-apiserver about twice as much
// over HTTP/2 as over HTTP/1.1 (docs/fleet.md), so with h1 set the GET
// goes over HTTP/1.1 and an HTTP/2 connection is closed: rounds that are
// all GETs keep one HTTP/1.1 connection; rounds that are mostly PINGs
// send their occasional GET on the HTTP/2 connection they have.
func (c *conn) get(ctx context.Context, path, token string, h1 bool) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+c.addr+path, nil)
	if err != nil {
		return 0, fmt.Errorf("build probe request: %w", err)
	}
	req.Header.Set("User-Agent", "extractedprism-probe")
	req.Header.Set("Accept", "text/plain")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	var resp *http.Response
	if h1 && c.h2 != nil {
		_ = c.h2.Close()
		c.h2 = nil
	}
	var cc *http2.ClientConn //nolint:staticcheck // see conn.h2
	if !h1 {
		if cc, err = c.ensureH2(ctx); err != nil {
			return 0, err
		}
	}
	switch {
	case cc != nil:
		resp, err = cc.RoundTrip(req)
	default:
		if gen := c.p.certGen(); gen != c.h1Gen && c.tr != nil {
			// A renewed client certificate: present it on a new
			// connection.
			c.tr.CloseIdleConnections()
			c.h1Gen = gen
		}
		if c.h1 == nil {
			c.h1Gen = c.p.certGen()
			c.tr = c.p.h1Transport(c.dialH1)
			c.h1 = &http.Client{Transport: c.tr, CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			}}
		}
		resp, err = c.h1.Do(req)
	}
	if err != nil {
		return 0, err
	}
	// Read the (small) body to the end so the connection is reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	return resp.StatusCode, nil
}

// dialTLS dials the target and completes a TLS handshake offering protos.
func (c *conn) dialTLS(ctx context.Context, protos ...string) (*tls.Conn, error) {
	raw, err := c.p.opts.Dial(ctx, "tcp", c.addr)
	if err != nil {
		return nil, err
	}
	cfg := c.p.tlsFor(c.addr)
	cfg.NextProtos = protos
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("tls handshake: %w", err)
	}
	return tc, nil
}

// dialH1 is the h1 transport's TLS dial: the spare connection first.
func (c *conn) dialH1(ctx context.Context, _, _ string) (net.Conn, error) {
	c.mu.Lock()
	s := c.spare
	c.spare = nil
	c.mu.Unlock()
	if s != nil {
		return s, nil
	}
	return c.dialTLS(ctx, "http/1.1")
}

// h1Transport returns a transport that keeps exactly one idle HTTP/1.1
// connection per target, dialled by dial.
func (p *Prober) h1Transport(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Transport {
	return &http.Transport{
		DialTLSContext:      dial,
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

// tlsBase returns a fresh copy of the probes' TLS configuration, with the
// client certificate hook when one is configured.
func (p *Prober) tlsBase() *tls.Config {
	var cfg *tls.Config
	if p.opts.TLS != nil {
		cfg = p.opts.TLS.Clone()
	} else {
		cfg = &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // verification is opt-in via probe.ca_file
	}
	if p.cert != nil {
		cfg.GetClientCertificate = p.cert.getClientCertificate
	}
	return cfg
}

// tlsFor returns the TLS configuration of a dial to addr.
func (p *Prober) tlsFor(addr string) *tls.Config {
	cfg := p.tlsBase()
	if cfg.ServerName == "" {
		if host, _, err := net.SplitHostPort(addr); err == nil {
			cfg.ServerName = host
		}
	}
	return cfg
}

// certGen is the generation of the configured client certificate (0
// without one).
func (p *Prober) certGen() uint64 {
	if p.cert == nil {
		return 0
	}
	_, gen, err := p.cert.load()
	if err != nil {
		p.warnOnce("cert:"+err.Error(), "probe client certificate unusable; probing with the last good one or none", "err", err)
	}
	return gen
}

// timedOut reports whether err is the end of a probe's deadline.
func timedOut(ctx context.Context, err error) bool {
	return ctx.Err() != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded))
}
