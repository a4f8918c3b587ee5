// Package e2e runs extractedprism and its discovery against real
// kube-apiservers and etcd.
//
// The test binary creates a network namespace of its own, puts the test API
// server addresses (198.51.100.11-13) on its loopback interface and runs
// itself again inside it; etcd, the apiservers, extractedprism and kubectl all
// run in there, so no traffic leaves the namespace and the ports used
// (7445, 7446, 2379, 6443) cannot collide with anything on the host. The
// namespace and every process left in it are removed when the tests end,
// whether they passed or not.
package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/goleak"
)

// netnsEnv names the namespace the re-executed test binary runs in.
const netnsEnv = "EP_E2E_NETNS"

// apiserverIPs are the addresses of the test apiservers, on the namespace's lo.
var apiserverIPs = []string{"198.51.100.11", "198.51.100.12", "198.51.100.13"}

func TestMain(m *testing.M) {
	if os.Getenv(netnsEnv) == "" {
		os.Exit(runInNetns())
	}
	os.Exit(runInside(m))
}

// runInNetns creates the namespace, runs this binary inside it and removes
// the namespace (and whatever still runs in it) afterwards.
func runInNetns() int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: needs root to create a network namespace")
		return 1
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	name := "ep-e2e-" + hex.EncodeToString(b)
	defer deleteNetns(name)
	setup := [][]string{
		{"netns", "add", name},
		{"-n", name, "link", "set", "lo", "up"},
	}
	for _, ip := range apiserverIPs {
		setup = append(setup, []string{"-n", name, "addr", "add", ip + "/32", "dev", "lo"})
	}
	for _, args := range setup {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: ip %s: %v: %s\n", strings.Join(args, " "), err, out)
			return 1
		}
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", name, os.Args[0]}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"="+name)
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	// Pass interrupts on so the inner run can clean up its processes.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for {
		select {
		case s := <-sigs:
			_ = cmd.Process.Signal(s)
		case err := <-done:
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				return exit.ExitCode()
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "e2e:", err)
				return 1
			}
			return 0
		}
	}
}

// deleteNetns kills every process left in the namespace and deletes it.
func deleteNetns(name string) {
	out, _ := exec.Command("ip", "netns", "pids", name).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: ip netns del %s: %v: %s\n", name, err, out)
	}
}

// runInside runs the tests inside the namespace with a shared etcd.
func runInside(m *testing.M) int {
	var err error
	env, err = newEnvironment()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: setup:", err)
		return 1
	}
	code := func() int {
		defer env.close()
		if err := env.startEtcd(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: etcd:", err)
			return 1
		}
		return m.Run()
	}()
	env.report()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: goroutine leak:", err)
			return 1
		}
	}
	return code
}
