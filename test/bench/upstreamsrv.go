package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

// serveUpstream runs a stand-in apiserver whose TLS handshake and request
// header must arrive within handshake (kube-apiserver gives 32 s; Go's
// net/http applies ReadHeaderTimeout to the TLS handshake too), for the
// silent-client scenario. It answers what the chaos load and the balancers'
// health checks ask for, like bin/standin with --live-while-unready:
// GET /readyz, /healthz, /livez, GET / (naming itself in X-Standin-Name),
// GET /stream, POST /control/ready and /control/unready. It runs until
// SIGTERM or SIGINT and then shuts down gracefully.
func serveUpstream(addr, name string, handshake time.Duration) error {
	srv, ln, err := newUpstreamServer(addr, name, handshake)
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln, "", "") }()
	fmt.Printf("bench upstream %s listening on %s (handshake timeout %s)\n", name, ln.Addr(), handshake)
	select {
	case err := <-done:
		return fmt.Errorf("serve %s: %w", addr, err)
	case <-sigs:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutdown %s: %w", addr, err)
	}
	return nil
}

// newUpstreamServer listens on addr and returns the server of
// serveUpstream, not yet serving (call ServeTLS(ln, "", "")).
func newUpstreamServer(addr, name string, handshake time.Duration) (*http.Server, net.Listener, error) {
	if handshake <= 0 {
		return nil, nil, fmt.Errorf("--upstream-handshake-timeout %s: must be positive", handshake)
	}
	cert, err := selfSigned(addr)
	if err != nil {
		return nil, nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("--serve-upstream %q: %w", addr, err)
	}
	var ready atomic.Bool
	ready.Store(true)
	mux := http.NewServeMux()
	health := func(live bool) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if live || ready.Load() {
				_, _ = io.WriteString(w, "ok")
				return
			}
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, "[-]ready failed\n")
		}
	}
	mux.HandleFunc("GET /readyz", health(false))
	mux.HandleFunc("GET /healthz", health(true))
	mux.HandleFunc("GET /livez", health(true))
	mux.HandleFunc("POST /control/ready", func(http.ResponseWriter, *http.Request) { ready.Store(true) })
	mux.HandleFunc("POST /control/unready", func(http.ResponseWriter, *http.Request) { ready.Store(false) })
	mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
		iv, err := time.ParseDuration(r.URL.Query().Get("interval"))
		if err != nil || iv < time.Millisecond {
			iv = 100 * time.Millisecond
		}
		fl, _ := w.(http.Flusher)
		t := time.NewTicker(iv)
		defer t.Stop()
		for i := 0; ; i++ {
			if _, err := fmt.Fprintf(w, "%d %s\n", i, name); err != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
			select {
			case <-r.Context().Done():
				return
			case <-t.C:
			}
		}
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprintf(w, "{\"name\":%q}\n", name)
	})
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Standin-Name", name)
			mux.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: handshake,
		IdleTimeout:       10 * time.Minute,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	}
	return srv, ln, nil
}

// selfSigned makes a serving certificate for addr's host; the harness's
// clients do not verify it (see tlsConf).
func selfSigned(addr string) (tls.Certificate, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("--serve-upstream %q: %w", addr, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("upstream key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost", "kubernetes"},
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("upstream certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
