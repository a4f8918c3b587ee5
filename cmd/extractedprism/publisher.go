package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/extractedprism/extractedprism/pkg/readiness"
)

// serviceAccountNamespace is where a pod finds its own namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// publisherFlags are the settings of `extractedprism readiness-publisher`.
type publisherFlags struct {
	namespace, configMap, lease, identity string
	interval, timeout, heartbeat          time.Duration
	leaseDuration, renewDeadline, retry   time.Duration
	endpoints                             []string
	endpointSlice                         bool
	kubeconfig, serverName, adminAddress  string
	logLevel, logFormat                   string
}

// publisherCmd runs the readiness publisher: one of a few replicas that
// elect a leader; the leader probes every apiserver's /readyz and
// publishes the explicit answers in a ConfigMap the nodes watch.
func publisherCmd(args []string, stderr io.Writer) int {
	var f publisherFlags
	fs := pflag.NewFlagSet("readiness-publisher", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.namespace, "namespace", "", "namespace of the ConfigMap and the Lease (default: $POD_NAMESPACE, else the service account's namespace)")
	fs.StringVar(&f.configMap, "configmap", readiness.DefaultConfigMap, "name of the ConfigMap the verdicts are published in")
	fs.StringVar(&f.lease, "lease", readiness.DefaultLease, "name of the Lease the replicas elect a leader with")
	fs.StringVar(&f.identity, "identity", "", "this replica's name in the Lease (default: $POD_NAME, else the host name)")
	fs.DurationVar(&f.interval, "interval", readiness.DefaultInterval, "time between two probes of each apiserver")
	fs.DurationVar(&f.timeout, "timeout", readiness.DefaultTimeout, "deadline of one probe")
	fs.DurationVar(&f.heartbeat, "heartbeat", readiness.DefaultHeartbeat, "longest time between two writes of the ConfigMap")
	fs.DurationVar(&f.leaseDuration, "lease-duration", readiness.DefaultLeaseDuration, "how long a leader's Lease holds without renewal: the longest wait before another replica takes over")
	fs.DurationVar(&f.renewDeadline, "renew-deadline", readiness.DefaultRenewDeadline, "how long the leader retries renewing before it stops publishing")
	fs.DurationVar(&f.retry, "retry-period", readiness.DefaultRetryPeriod, "time between two attempts to acquire or renew the Lease")
	fs.StringSliceVar(&f.endpoints, "endpoints", nil, "apiservers to probe besides the kubernetes EndpointSlice's (IP:port, comma-separated)")
	fs.BoolVar(&f.endpointSlice, "endpointslice", true, "probe the addresses of the EndpointSlice default/kubernetes")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig for the API (default: the in-cluster service account)")
	fs.StringVar(&f.serverName, "server-name", "kubernetes.default.svc", "TLS server name the apiservers' certificates are verified for (\"\" = the dialed IP)")
	fs.StringVar(&f.adminAddress, "admin-address", "127.0.0.1:7447", "host:port of the /healthz endpoint for the liveness probe (\"\" = none)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		_, _ = fmt.Fprintf(stderr, "extractedprism readiness-publisher: %v\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		_, _ = fmt.Fprintf(stderr, "extractedprism readiness-publisher: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	logger, err := publisherLogger(f.logLevel, f.logFormat, stderr)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism readiness-publisher: %v\n", err)
		return 2
	}
	// client-go's leader election logs through klog.
	klog.SetSlogLogger(logger.With("component", "leaderelection"))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := runPublisher(ctx, f, logger); err != nil {
		logger.Error("readiness publisher failed", "err", err)
		_, _ = fmt.Fprintf(stderr, "extractedprism readiness-publisher: %v\n", err)
		return 1
	}
	return 0
}

func publisherLogger(level, format string, w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	switch level {
	case "dpanic", "panic", "fatal": // the seed system's levels, read as error like the daemon does
		lvl = slog.LevelError
	default:
		if err := lvl.UnmarshalText([]byte(level)); err != nil {
			return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
		}
	}
	ho := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, ho)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, ho)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// runPublisher builds the client and the probes' credentials, then runs
// the publisher and its /healthz until ctx is done.
func runPublisher(ctx context.Context, f publisherFlags, logger *slog.Logger) error {
	ns, err := publisherNamespace(f.namespace)
	if err != nil {
		return err
	}
	id := f.identity
	if id == "" {
		id = os.Getenv("POD_NAME")
	}
	if id == "" {
		if id, err = os.Hostname(); err != nil {
			return fmt.Errorf("--identity not set and no host name: %w", err)
		}
	}
	cfg, err := publisherRestConfig(f.kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("API client for %s: %w", cfg.Host, err)
	}
	// The probes carry the same credentials and trust the same CA as the
	// API client, verifying each apiserver for serverName.
	probeCfg := rest.CopyConfig(cfg)
	probeCfg.ServerName = f.serverName
	tlsConf, err := rest.TLSConfigFor(probeCfg)
	if err != nil {
		return fmt.Errorf("probe TLS configuration: %w", err)
	}
	auth := func(rt http.RoundTripper) http.RoundTripper {
		wrapped, err := rest.HTTPWrappersForConfig(probeCfg, rt)
		if err != nil {
			logger.Warn("probe credentials unusable; probing without them", "err", err)
			return rt
		}
		return wrapped
	}
	p := readiness.NewPublisher(readiness.PublisherOptions{
		Client: client, Namespace: ns, ConfigMap: f.configMap, Lease: f.lease, Identity: id,
		Interval: f.interval, Timeout: f.timeout, Heartbeat: f.heartbeat,
		LeaseDuration: f.leaseDuration, RenewDeadline: f.renewDeadline, RetryPeriod: f.retry,
		Endpoints: f.endpoints, DisableSlice: !f.endpointSlice,
		TLS: tlsConf, Auth: auth, Logger: logger,
	})
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return p.Run(gctx) })
	if f.adminAddress != "" {
		if err := serveHealthz(gctx, g, f.adminAddress, p, logger); err != nil {
			return err
		}
	}
	return g.Wait()
}

// publisherNamespace is --namespace, else $POD_NAMESPACE, else the
// service account's namespace.
func publisherNamespace(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns, nil
	}
	b, err := os.ReadFile(serviceAccountNamespace)
	if err != nil {
		return "", fmt.Errorf("--namespace not set, no $POD_NAMESPACE: %w", err)
	}
	if ns := strings.TrimSpace(string(b)); ns != "" {
		return ns, nil
	}
	return "", fmt.Errorf("--namespace not set, no $POD_NAMESPACE, and %s is empty", serviceAccountNamespace)
}

func publisherRestConfig(kubeconfig string) (*rest.Config, error) {
	var (
		cfg *rest.Config
		err error
	)
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %q: %w", kubeconfig, err)
		}
	} else if cfg, err = rest.InClusterConfig(); err != nil {
		return nil, fmt.Errorf("in-cluster credentials (or set --kubeconfig): %w", err)
	}
	cfg.UserAgent = "extractedprism-readiness-publisher"
	return cfg, nil
}

// serveHealthz serves GET /healthz on addr in g until ctx is done: 200
// while the publisher runs, saying whether this replica leads.
func serveHealthz(ctx context.Context, g *errgroup.Group, addr string, p *readiness.Publisher, logger *slog.Logger) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("--admin-address %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if p.Leading() {
			_, _ = io.WriteString(w, "ok: leading\n")
			return
		}
		_, _ = io.WriteString(w, "ok: standing by\n")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, MaxHeaderBytes: 8 << 10}
	logger.Info("readiness publisher health endpoint listening", "address", ln.Addr().String())
	g.Go(func() error {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("health endpoint: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return srv.Shutdown(sctx) //nolint:contextcheck // ctx is already done: shutdown needs its own deadline.
	})
	return nil
}
