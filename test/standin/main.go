// Command standin runs stand-in kube-apiservers for tests, the demo and the
// benchmarks.
//
//	standin --listen 127.0.0.1:16443 [--listen ADDR ...] [--name a] [--unready] [--hang]
//
// It prints "standin NAME listening on ADDR" on stdout for each listener once
// it accepts connections. SIGUSR1 toggles readiness; SIGTERM and SIGINT stop
// it (after --shutdown-delay, during which /readyz answers 500) with exit
// status 0. See package internal/standin for the paths it serves.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
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
	handshakeTimeout := fs.Duration("handshake-timeout", 10*time.Second, "close connections that send no request headers (TLS handshake included) within this time (kube-apiserver: 32s)")
	certOut := fs.String("cert-out", "", "write the self-signed serving certificate (PEM) to this file")
	logLevel := fs.String("log-level", "info", "log level: debug, info, warn, error")
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
			Certificate: &tls.Certificate{Certificate: cert.Certificate, PrivateKey: cert.PrivateKey, Leaf: cert.Leaf},
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
