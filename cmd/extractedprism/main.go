// Command extractedprism is a per-node TCP load balancer for the
// Kubernetes API server: local clients use https://127.0.0.1:7445 and the
// raw TCP stream goes to a healthy kube-apiserver.
//
// Subcommands: run (the default), validate, reload, status, version,
// readiness-publisher (see publisher.go) and static-pod (staticpod.go).
//
// Exit status: 0 on success, 1 on an error (an invalid configuration, a
// failed start), 2 on bad usage, and ExitNotConfigured (78) when run finds
// no API server to balance to: the service unit lists it in
// RestartPreventExitStatus=, so a freshly installed package waits to be
// configured instead of restarting every second.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/extractedprism/extractedprism/pkg/config"
	"github.com/extractedprism/extractedprism/pkg/daemon"
	"github.com/extractedprism/extractedprism/pkg/memlimit"
	"github.com/extractedprism/extractedprism/pkg/status"
	"github.com/extractedprism/extractedprism/pkg/systemd"
	"github.com/extractedprism/extractedprism/pkg/version"
)

// ExitNotConfigured is the exit status of `run` when the configuration
// names no API server: EX_CONFIG of sysexits.h.
const ExitNotConfigured = 78

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `extractedprism: per-node load balancer for the Kubernetes API server

Usage:
  extractedprism [run] [flags]            run the balancer (default)
  extractedprism validate [flags]         check the configuration and exit
  extractedprism reload --pid PID [flags] check the configuration, then send
                                          SIGHUP to the running instance PID
  extractedprism status [--address A] [-o|--output table|json]
                                          show the upstreams of a running instance
  extractedprism version                  print version, commit and Go version
  extractedprism readiness-publisher [flags]
                                          probe the apiservers' /readyz once for the
                                          cluster and publish it to the nodes
  extractedprism static-pod upgrade --manifest FILE [flags]
                                          upgrade the kubeadm static pod without
                                          refusing a connection

Run "extractedprism run --help" for the flags.
`

func run(args []string, stdout, stderr io.Writer) int {
	sub := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	switch sub {
	case "run":
		return runDaemon(args, stderr)
	case "validate":
		return validate(args, stdout, stderr)
	case "reload":
		return reloadCmd(args, stdout, stderr)
	case "status":
		return statusCmd(args, stdout, stderr)
	case "readiness-publisher":
		return publisherCmd(args, stderr)
	case "static-pod":
		return staticPodCmd(args, stdout, stderr)
	case "version":
		_, _ = fmt.Fprintf(stdout, "extractedprism %s (commit %s, %s)\n", version.Version, version.Commit, version.GoVersion())
		return 0
	case "help":
		_, _ = fmt.Fprint(stdout, usage)
		return 0
	}
	_, _ = fmt.Fprintf(stderr, "extractedprism: unknown subcommand %q\n\n%s", sub, usage)
	return 2
}

// loadConfig parses flags and loads the configuration; on failure it
// prints every problem and returns ok=false.
func loadConfig(name string, args []string, stderr io.Writer, extra ...func(*pflag.FlagSet)) (cfg config.Config, path string, fs *pflag.FlagSet, code int) {
	fs = pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(stderr)
	config.RegisterFlags(fs)
	for _, add := range extra {
		add(fs)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return cfg, "", nil, 0
		}
		_, _ = fmt.Fprintf(stderr, "extractedprism %s: %v\n", name, err)
		return cfg, "", nil, 2
	}
	if fs.NArg() > 0 {
		_, _ = fmt.Fprintf(stderr, "extractedprism: unexpected argument %q\n", fs.Arg(0))
		return cfg, "", nil, 2
	}
	path = config.ConfigPath(fs, os.Environ())
	cfg, err := config.Load(path, fs, os.Environ())
	if err != nil {
		if name == "run" && config.NotConfigured(err) {
			if len(config.FieldErrors(err)) > 1 {
				printConfigError(stderr, path, err)
			}
			printNotConfigured(stderr, path)
			return cfg, path, nil, ExitNotConfigured
		}
		printConfigError(stderr, path, err)
		return cfg, path, nil, 1
	}
	return cfg, path, fs, -1
}

// printNotConfigured says, in one line, what to edit before starting again.
func printNotConfigured(w io.Writer, path string) {
	what := "the flags and environment name no API server: set --endpoints (or EP_ENDPOINTS)"
	if path != "" {
		what = fmt.Sprintf("%s names no API server: edit it and set endpoints", path)
	}
	_, _ = fmt.Fprintf(w, "extractedprism: not configured: %s (or enable discovery with a state file), "+
		"then start extractedprism again; exit status %d (systemd does not restart it)\n", what, ExitNotConfigured)
}

func printConfigError(w io.Writer, path string, err error) {
	where := "configuration"
	if path != "" {
		where = path
	}
	fes := config.FieldErrors(err)
	if len(fes) == 0 {
		_, _ = fmt.Fprintf(w, "extractedprism: invalid %s: %v\n", where, err)
		return
	}
	_, _ = fmt.Fprintf(w, "extractedprism: invalid %s: %d problem(s):\n", where, len(fes))
	for _, fe := range fes {
		_, _ = fmt.Fprintf(w, "  %v\n", fe)
	}
}

func validate(args []string, stdout, stderr io.Writer) int {
	cfg, path, _, code := loadConfig("validate", args, stderr)
	if code >= 0 {
		return code
	}
	where := "flags and environment"
	if path != "" {
		where = path
	}
	_, _ = fmt.Fprintf(stdout, "%s: OK: %s\n", where, cfg.Summary())
	return 0
}

// reloadCmd validates the configuration like `validate`, then sends SIGHUP
// to the running instance named by --pid, which makes it reload. The
// service unit's ExecReload= runs it, so reloading needs no kill binary.
func reloadCmd(args []string, stdout, stderr io.Writer) int {
	var pid *int
	_, path, _, code := loadConfig("reload", args, stderr, func(fs *pflag.FlagSet) {
		pid = fs.Int("pid", 0, "process id of the running extractedprism (systemd: $MAINPID)")
	})
	switch {
	case code == 1:
		_, _ = fmt.Fprintln(stderr, "extractedprism reload: configuration not valid; the running instance was not signalled")
		return code
	case code >= 0: // --help, bad usage
		return code
	}
	if *pid <= 0 {
		_, _ = fmt.Fprintf(stderr, "extractedprism reload: --pid %d: want the process id of the running extractedprism\n", *pid)
		return 2
	}
	if err := syscall.Kill(*pid, syscall.SIGHUP); err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism reload: signal process %d: %v\n", *pid, err)
		return 1
	}
	where := "flags and environment"
	if path != "" {
		where = path
	}
	_, _ = fmt.Fprintf(stdout, "%s: OK; sent SIGHUP to process %d\n", where, *pid)
	return 0
}

func newLogger(cfg config.Config, w io.Writer) (*slog.Logger, *slog.LevelVar) {
	lv := new(slog.LevelVar)
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(cfg.Log.Level)); err == nil {
		lv.Set(lvl)
	}
	ho := &slog.HandlerOptions{Level: lv}
	if cfg.Log.Format == config.LogFormatJSON {
		return slog.New(slog.NewJSONHandler(w, ho)), lv
	}
	if w == os.Stderr && systemd.StderrIsJournal() {
		// The journal stamps lines itself and reads the priority prefix.
		ho.ReplaceAttr = systemd.JournalAttr
	}
	return slog.New(slog.NewTextHandler(w, ho)), lv
}

func runDaemon(args []string, stderr io.Writer) int {
	cfg, path, fs, code := loadConfig("run", args, stderr)
	if code >= 0 {
		return code
	}
	logger, level := newLogger(cfg, stderr)
	for _, s := range config.SupersededSettings(fs, os.Environ()) {
		logger.Warn("seed system setting accepted but has no effect; remove it",
			"setting", s.Source, "value", s.Value, "instead", s.Instead)
	}
	mem := applyMemoryLimit(logger)
	activated, err := systemd.ActivatedListeners()
	if err != nil {
		logger.Warn("ignoring socket activation", "err", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default:
			}
		}
	}()

	err = daemon.Run(ctx, daemon.Options{
		Config: cfg, ConfigPath: path, Flags: fs, Environ: os.Environ(), Reload: reload,
		Logger: logger, Level: level, Activated: activated, MemoryLimit: mem.Limit.Bytes,
	})
	if err != nil {
		logger.Error("extractedprism failed", "err", err)
		_, _ = fmt.Fprintf(stderr, "extractedprism: %v\n", err)
		return 1
	}
	return 0
}

// applyMemoryLimit tells the Go runtime about the cgroup memory limit
// (unless GOMEMLIMIT is set) and logs, in one line, the limits the runtime
// works under. GOMAXPROCS needs nothing of ours: since Go 1.25 the runtime
// derives its default from the cgroup CPU limit and follows changes of it.
func applyMemoryLimit(logger *slog.Logger) memlimit.Result {
	r := memlimit.Apply(memlimit.Options{})
	var limit, source, gomemlimit any = "none", "none", "none"
	if r.Limit.Bytes > 0 {
		limit, source = r.Limit.Bytes, r.Limit.Source
	}
	if r.GoLimit != math.MaxInt64 {
		gomemlimit = r.GoLimit
	}
	from := "none"
	switch {
	case r.FromEnv:
		from = "GOMEMLIMIT"
	case r.Set:
		from = "memory_limit minus margin"
	}
	args := []any{"memory_limit", limit, "source", source, "gomemlimit", gomemlimit, "gomemlimit_from", from,
		"gomaxprocs", runtime.GOMAXPROCS(0)}
	logger.Info("runtime limits", args...)
	if r.Err != nil {
		logger.Debug("no memory limit found", "err", r.Err)
	}
	return r
}

func statusCmd(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("status", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("address", "127.0.0.1:7446", "admin address (host:port) of the running extractedprism")
	output := fs.StringP("output", "o", "table", "output format: table or json")
	timeout := fs.Duration("timeout", 5*time.Second, "request timeout")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		_, _ = fmt.Fprintf(stderr, "extractedprism status: %v\n", err)
		return 2
	}
	if *output != "table" && *output != "json" {
		_, _ = fmt.Fprintf(stderr, "extractedprism status: --output %q: want table or json\n", *output)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	url := "http://" + *addr + "/status"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism status: --address %q: %v\n", *addr, err)
		return 2
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism status: cannot reach %s: %v\n", url, err)
		return 1
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		_, _ = fmt.Fprintf(stderr, "extractedprism status: %s answered %s\n", url, resp.Status)
		return 1
	}
	var doc status.Document
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<20)).Decode(&doc); err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism status: bad answer from %s: %v\n", url, err)
		return 1
	}
	if *output == "json" {
		err = status.RenderJSON(stdout, doc)
	} else {
		err = status.RenderTable(stdout, doc, time.Now())
	}
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism status: %v\n", err)
		return 1
	}
	if !doc.Ready {
		return 1
	}
	return 0
}
