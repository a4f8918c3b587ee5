// Command standin runs stand-in kube-apiservers for tests, the demo and the
// benchmarks.
//
//	standin --listen 127.0.0.1:16443 [--listen ADDR ...] [--name a] [--unready] [--hang]
//	standin --anonymous-auth=false --client-cert-out DIR [--token TOKEN] [--anonymous-paths /readyz]
//
// With --anonymous-auth=false it answers 401 to requests without an accepted
// bearer token (--token, --token-file) or client certificate (verified
// against --client-ca-file and the CA --client-cert-out writes), as
// kube-apiserver --anonymous-auth=false does; /control/* stays open.
//
// It prints "standin NAME listening on ADDR" on stdout for each listener once
// it accepts connections. SIGUSR1 toggles readiness; SIGTERM and SIGINT stop
// it (after --shutdown-delay, during which /readyz answers 500) with exit
// status 0. See package internal/standin for the paths it serves.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/extractedprism/extractedprism/internal/standin"
)

type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for p := range strings.SplitSeq(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l = append(*l, p)
		}
	}
	return nil
}

// repeatFlag collects every value of a repeated flag as given.
type repeatFlag []string

func (r *repeatFlag) String() string { return strings.Join(*r, ",") }

func (r *repeatFlag) Set(v string) error {
	*r = append(*r, v)
	return nil
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("standin", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var listens listFlag
	fs.Var(&listens, "listen", "address to serve HTTPS on (repeatable or comma-separated; default 127.0.0.1:16443)")
	name := fs.String("name", standin.DefaultName, "server name reported on GET / and in logs")
	unready := fs.Bool("unready", false, "start unready (/readyz, /healthz, /livez answer 500)")
	liveWhileUnready := fs.Bool("live-while-unready", false, "while unready, keep /healthz and /livez at 200 (only /readyz fails), like kube-apiserver shutting down")
	hang := fs.Bool("hang", false, "accept TCP connections and never answer")
	reset := fs.Bool("reset-after-accept", false, "reset every connection right after accepting it")
	shutdownDelay := fs.Duration("shutdown-delay", 0, "on SIGTERM/SIGINT, answer 500 on /readyz for this long before closing the listener")
	shutdownTimeout := fs.Duration("shutdown-timeout", 5*time.Second, "how long in-flight requests may finish after the listener closed")
	sendBuffer := fs.Int("send-buffer", 0, "SO_SNDBUF of every accepted connection in bytes (0: the kernel's autotuning)")
	handshakeTimeout := fs.Duration("handshake-timeout", 10*time.Second, "close connections that send no request headers (TLS handshake included) within this time (kube-apiserver: 32s)")
	certOut := fs.String("cert-out", "", "write the self-signed serving certificate (PEM) to this file")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
	anonymous := fs.Bool("anonymous-auth", true, "serve requests without credentials; false answers them 401, like kube-apiserver --anonymous-auth=false")
	var tokens repeatFlag
	fs.Var(&tokens, "token", "accepted bearer token (repeatable)")
	tokenFile := fs.String("token-file", "", "file of accepted bearer tokens, kube-apiserver's --token-auth-file format (token,user,uid,groups; the token alone will do), read again when it changes")
	clientCAFile := fs.String("client-ca-file", "", "PEM file of CAs that client certificates are verified against")
	var anonPaths listFlag
	fs.Var(&anonPaths, "anonymous-paths", "paths served to anonymous requests even with --anonymous-auth=false (comma-separated, exact, e.g. /livez,/readyz,/healthz)")
	forbidHealth := fs.Bool("forbid-health", false, "answer 403 to anonymous requests of /readyz, /healthz and /livez, as an RBAC without system:public-info-viewer does")
	clientCertOut := fs.String("client-cert-out", "", "generate a client CA and a client certificate, write ca.crt, client.crt and client.key to this directory, and trust the CA")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		_, _ = fmt.Fprintf(stderr, "standin: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if len(listens) == 0 {
		listens = listFlag{"127.0.0.1:16443"}
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		_, _ = fmt.Fprintf(stderr, "standin: --log-level %q: %v\n", *logLevel, err)
		return 2
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	hosts := make([]string, 0, len(listens))
	for _, l := range listens {
		h, _, err := net.SplitHostPort(l)
		if err != nil {
			_, _ = fmt.Fprintf(stderr, "standin: --listen %q: %v\n", l, err)
			return 2
		}
		hosts = append(hosts, h)
	}
	cert, certPEM, err := standin.GenerateCertificate(hosts...)
	if err != nil {
		logger.Error("generate certificate", "err", err)
		return 1
	}
	if *certOut != "" {
		if err := os.WriteFile(*certOut, certPEM, 0o644); err != nil { //nolint:gosec // a public certificate
			logger.Error("write certificate", "cert_out", *certOut, "err", err)
			return 1
		}
	}

	clientCAs, err := clientPool(*clientCAFile, *clientCertOut)
	if err != nil {
		logger.Error("client certificates", "err", err)
		return 1
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Signals are registered before listening so that a SIGTERM sent as soon
	// as the "listening" line appears is handled.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
	defer signal.Stop(sigs)

	servers := make([]*standin.Server, 0, len(listens))
	closeAll := func() {
		for _, s := range servers {
			_ = s.Close()
		}
	}
	for _, addr := range listens {
		s, err := standin.Start(ctx, standin.Options{
			Addr: addr, Name: *name, Logger: logger, Unready: *unready,
			LiveWhileUnready: *liveWhileUnready, Hang: *hang, ResetAfterAccept: *reset, HandshakeTimeout: *handshakeTimeout,
			SendBuffer:  *sendBuffer,
			Certificate: &tls.Certificate{Certificate: cert.Certificate, PrivateKey: cert.PrivateKey, Leaf: cert.Leaf},
			RequireAuth: !*anonymous, Tokens: tokens, TokenFile: *tokenFile, ClientCAs: clientCAs,
			AllowAnonymousPaths: anonPaths, ForbidHealth: *forbidHealth,
		})
		if err != nil {
			logger.Error("start", "listen", addr, "err", err)
			closeAll()
			return 1
		}
		servers = append(servers, s)
		_, _ = fmt.Fprintf(stdout, "standin %s listening on %s\n", *name, s.Addr())
	}

	ready := !*unready
	for sig := range sigs {
		if sig == syscall.SIGUSR1 {
			ready = !ready
			for _, s := range servers {
				s.SetReady(ready)
			}
			continue
		}
		logger.Info("signal received, stopping", "signal", sig.String(), "shutdown_delay", *shutdownDelay)
		break
	}
	for _, s := range servers {
		s.SetReady(false)
	}
	if *shutdownDelay > 0 {
		t := time.NewTimer(*shutdownDelay)
		select {
		case <-t.C:
		case <-sigs: // a second signal cuts the delay short
			t.Stop()
		}
	}
	sctx, scancel := context.WithTimeout(ctx, *shutdownTimeout)
	defer scancel()
	for _, s := range servers {
		if err := s.Shutdown(sctx); err != nil {
			logger.Warn("shutdown", "addr", s.Addr(), "err", err)
		}
	}
	return 0
}

// clientPool is the pool of the CAs in caFile and of a client CA generated
// and written to outDir with a client certificate and key; nil when both
// are empty.
func clientPool(caFile, outDir string) (*x509.CertPool, error) {
	if caFile == "" && outDir == "" {
		return nil, nil
	}
	pool := x509.NewCertPool()
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--client-ca-file: %w", err)
		}
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("--client-ca-file %s: no PEM certificate in it", caFile)
		}
	}
	if outDir != "" {
		pki, err := standin.GenerateClientPKI("system:node:standin-client", "system:nodes")
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(outDir, 0o755); err != nil {
			return nil, fmt.Errorf("--client-cert-out: %w", err)
		}
		for _, f := range []struct {
			name string
			b    []byte
			mode os.FileMode
		}{{"ca.crt", pki.CAPEM, 0o644}, {"client.crt", pki.CertPEM, 0o644}, {"client.key", pki.KeyPEM, 0o600}} {
			if err := os.WriteFile(filepath.Join(outDir, f.name), f.b, f.mode); err != nil {
				return nil, fmt.Errorf("--client-cert-out: %w", err)
			}
		}
		pool.AppendCertsFromPEM(pki.CAPEM)
	}
	return pool, nil
}
