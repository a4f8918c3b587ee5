//go:build linux

package integration

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Paths of the binaries under test, built once by TestMain.
var (
	daemonBin  string
	standinBin string
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	flag.Parse()
	if testing.Short() {
		fmt.Fprintln(os.Stderr, "integration: skipped in -short mode (they build and run the real binaries)")
		return 0
	}
	dir, err := os.MkdirTemp("", "extractedprism-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: temp dir:", err)
		return 1
	}
	defer func() { _ = os.RemoveAll(dir) }()
	daemonBin = filepath.Join(dir, "extractedprism")
	standinBin = filepath.Join(dir, "standin")
	start := time.Now()
	for bin, pkg := range map[string]string{
		daemonBin:  "github.com/extractedprism/extractedprism/cmd/extractedprism",
		standinBin: "github.com/extractedprism/extractedprism/test/standin",
	} {
		if err := build(bin, pkg); err != nil {
			fmt.Fprintln(os.Stderr, "integration:", err)
			return 1
		}
	}
	fmt.Fprintf(os.Stderr, "integration: built binaries (race=%v) in %s\n", raceEnabled, time.Since(start).Round(time.Millisecond))
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "integration: goroutine leak:", err)
			code = 1
		}
	}
	return code
}

// build compiles pkg into out with the go command that runs the tests.
func build(out, pkg string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("the go command is needed to build the binaries under test: %w", err)
	}
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, pkg)
	cmd := exec.Command(goBin, args...)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %v: %w", args, err)
	}
	return nil
}
