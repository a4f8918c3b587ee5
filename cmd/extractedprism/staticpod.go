package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/extractedprism/extractedprism/pkg/staticpod"
)

const staticPodUsage = `Usage:
  extractedprism static-pod upgrade --manifest FILE [flags]

Starts FILE (the kubeadm manifest with a new image or new flags) as a second
static pod beside the running one, waits until it answers ready, then
removes the old one's manifest: the old pod steps aside and drains, and
127.0.0.1:7445 refuses nothing meanwhile. The pods alternate between the
manifests NAME.yaml and NAME-b.yaml. Run it as root on the node.

Flags:
`

// staticPodCmd runs `extractedprism static-pod SUBCOMMAND`.
func staticPodCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "upgrade" {
		if len(args) > 0 && (args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
			_, _ = fmt.Fprint(stdout, staticPodUsage+staticPodFlags(io.Discard).FlagUsages())
			return 0
		}
		_, _ = fmt.Fprint(stderr, "extractedprism static-pod: want a subcommand\n\n"+staticPodUsage+staticPodFlags(io.Discard).FlagUsages())
		return 2
	}
	fs := staticPodFlags(stderr)
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		_, _ = fmt.Fprintf(stderr, "extractedprism static-pod upgrade: %v\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		_, _ = fmt.Fprintf(stderr, "extractedprism static-pod upgrade: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	file, _ := fs.GetString("manifest")
	if file == "" {
		_, _ = fmt.Fprintln(stderr, "extractedprism static-pod upgrade: --manifest is required: the new version's static pod manifest")
		return 2
	}
	data, err := os.ReadFile(file)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism static-pod upgrade: --manifest: %v\n", err)
		return 2
	}
	dir, _ := fs.GetString("manifest-dir")
	admin, _ := fs.GetString("admin-address")
	timeout, _ := fs.GetDuration("timeout")
	gap, _ := fs.GetBool("allow-gap")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, nil))
	res, err := staticpod.Upgrade(ctx, staticpod.Options{
		Dir: dir, Manifest: data, Admin: admin, ReadyTimeout: timeout, StepAsideTimeout: timeout,
		AllowGap: gap, Logger: log,
	})
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "extractedprism static-pod upgrade: %v\n", err)
		return 1
	}
	switch {
	case res.InPlace:
		_, _ = fmt.Fprintf(stdout, "%s replaced in place: version %s ready after %s\n", res.To, res.New.Version, res.ReadyAfter.Round(time.Second))
	default:
		_, _ = fmt.Fprintf(stdout, "upgraded: %s (version %s) serves, ready after %s; %s removed, its pod stepped aside after %s and drains its connections\n",
			res.To, res.New.Version, res.ReadyAfter.Round(100*time.Millisecond), res.From, res.SteppedAsideAfter.Round(100*time.Millisecond))
	}
	return 0
}

func staticPodFlags(stderr io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet("static-pod upgrade", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.String("manifest", "", "the new version's static pod manifest (required)")
	fs.String("manifest-dir", "/etc/kubernetes/manifests", "the kubelet's static pod directory (staticPodPath)")
	fs.String("admin-address", "127.0.0.1:7446", "admin address (host:port) of the running extractedprism")
	fs.Duration("timeout", 3*time.Minute, "longest wait for the new pod to answer ready, and for the old one to step aside")
	fs.Bool("allow-gap", false, "replace a running pod that cannot share its ports (one bound without SO_REUSEPORT) in place, refusing connects until the new pod has started")
	return fs
}
