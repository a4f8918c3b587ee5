//go:build linux

package memcg

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Paths of the binaries under test, and why the tests skip (empty: they
// run).
var (
	daemonBin  string
	standinBin string
	skipReason string
)

// wantNofile is the descriptor limit the test sets for itself and the
// daemon (which holds two descriptors per proxied connection); nofile is
// what it got: a process without CAP_SYS_RESOURCE (e.g. in a container)
// cannot go above its hard limit, and the load is sized to fit.
const wantNofile = 65536

var nofile uint64

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if err := prerequisites(); err != nil {
		skipReason = err.Error()
		fmt.Fprintln(os.Stderr, "memcg: skipping:", skipReason)
		return m.Run()
	}
	if dir := os.Getenv("EP_MEMCG_BIN"); dir != "" {
		daemonBin, standinBin = filepath.Join(dir, "extractedprism"), filepath.Join(dir, "standin")
		for _, b := range []string{daemonBin, standinBin} {
			if _, err := os.Stat(b); err != nil {
				fmt.Fprintf(os.Stderr, "memcg: EP_MEMCG_BIN=%s: %v\n", dir, err)
				return 1
			}
		}
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "extractedprism-memcg-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "memcg: temp dir:", err)
		return 1
	}
	defer func() { _ = os.RemoveAll(dir) }()
	daemonBin, standinBin = filepath.Join(dir, "extractedprism"), filepath.Join(dir, "standin")
	start := time.Now()
	for bin, pkg := range map[string]string{daemonBin: "./cmd/extractedprism", standinBin: "./test/standin"} {
		if err := build(bin, pkg); err != nil {
			fmt.Fprintln(os.Stderr, "memcg:", err)
			return 1
		}
	}
	fmt.Fprintf(os.Stderr, "memcg: built the binaries in %s\n", time.Since(start).Round(time.Millisecond))
	return m.Run()
}

// prerequisites tells why the test cannot run here, nil if it can: it
// needs root, a memory controller and enough descriptors.
func prerequisites() error {
	if testing.Short() {
		return fmt.Errorf("-short given")
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root to create a memory cgroup (uid %d)", os.Geteuid())
	}
	if _, err := detectCgroup(); err != nil {
		return err
	}
	lim := syscall.Rlimit{Cur: wantNofile, Max: wantNofile}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		// Without CAP_SYS_RESOURCE: up to the hard limit.
		if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("RLIMIT_NOFILE: %w", err)
		}
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("raise RLIMIT_NOFILE to its hard limit %d: %w", lim.Max, err)
		}
	}
	nofile = lim.Cur
	if nofile < minNofile {
		return fmt.Errorf("RLIMIT_NOFILE %d is below the %d the load needs and cannot be raised", nofile, minNofile)
	}
	return nil
}

// build compiles pkg (relative to the repository root) into out as the
// release does: no cgo, no race detector.
func build(out, pkg string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("the go command is needed to build the binaries under test (or set EP_MEMCG_BIN): %w", err)
	}
	args := []string{"build", "-trimpath", "-o", out, pkg}
	cmd := exec.Command(goBin, args...)
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %v: %w", args, err)
	}
	return nil
}
