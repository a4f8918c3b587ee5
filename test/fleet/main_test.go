// Package fleet measures what a fleet of extractedprism nodes costs real
// kube-apiservers: probe cost per probe style, discovery watches and their
// convergence, the reconnect wave when an apiserver dies or hangs, the
// probes and discovery requests when every node starts at once, and the
// shared readiness: its publishers and every node's watch of their
// ConfigMap.
//
// The test binary creates a network namespace of its own, puts the test
// apiserver addresses (198.51.100.11-14) on its loopback interface and runs
// itself again inside it. etcd, the apiservers, every simulated node (one
// extractedprism each, on its own loopback address 127.0.1.x) and every
// client stream run in there, so no traffic leaves the namespace and the
// ports cannot collide with anything on the host. The inner run refuses to
// start anywhere else. The namespace and every process left in it are
// removed when the tests end, whether they passed or not.
//
// Sizes and windows come from the environment (see params): EP_FLEET_NODES
// nodes with EP_FLEET_STREAMS client streams each.
package fleet

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
)

// netnsEnv names the namespace the re-executed test binary runs in.
const netnsEnv = "EP_FLEET_NETNS"

// apiserverIPs are the addresses of the test apiservers, on the namespace's lo.
var apiserverIPs = []string{"198.51.100.11", "198.51.100.12", "198.51.100.13", "198.51.100.14"}

func TestMain(m *testing.M) {
	if os.Getenv(netnsEnv) == "" {
		os.Exit(runInNetns())
	}
	if err := checkInsideNetns(os.Getenv(netnsEnv)); err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(1)
	}
	os.Exit(runInside(m))
}

// checkInsideNetns refuses to run unless this process is in the named
// namespace (and not in the host's), so that the fleet's listeners and the
// signals it sends can never reach anything outside it.
func checkInsideNetns(name string) error {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return fmt.Errorf("read own network namespace: %w", err)
	}
	init, err := os.Readlink("/proc/1/ns/net")
	if err == nil && init == self {
		return fmt.Errorf("%s=%q is set but this process runs in the host's network namespace; refusing to start", netnsEnv, name)
	}
	var st, want syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err != nil {
		return fmt.Errorf("stat own network namespace: %w", err)
	}
	if err := syscall.Stat("/run/netns/"+name, &want); err != nil {
		return fmt.Errorf("network namespace %q: %w", name, err)
	}
	if st.Ino != want.Ino || st.Dev != want.Dev {
		return fmt.Errorf("this process does not run in network namespace %q; refusing to start", name)
	}
	return nil
}

// runInNetns creates the namespace, runs this binary inside it and removes
// the namespace (and whatever still runs in it) afterwards.
func runInNetns() int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "fleet: needs root to create a network namespace")
		return 1
	}
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		return 1
	}
	name := "ep-fleet-" + hex.EncodeToString(b)
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
			fmt.Fprintf(os.Stderr, "fleet: ip %s: %v: %s\n", strings.Join(args, " "), err, out)
			return 1
		}
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", name, os.Args[0]}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), netnsEnv+"="+name)
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
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
				fmt.Fprintln(os.Stderr, "fleet:", err)
				return 1
			}
			return 0
		}
	}
}

// deleteNetns kills every process left in the namespace (by PID, as the
// kernel lists them) and deletes it.
func deleteNetns(name string) {
	out, _ := exec.Command("ip", "netns", "pids", name).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGCONT) // a stopped process dies only once it runs
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "fleet: ip netns del %s: %v: %s\n", name, err, out)
	}
}

// runInside runs the tests inside the namespace with a shared etcd.
func runInside(m *testing.M) int {
	var err error
	env, err = newEnvironment()
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet: setup:", err)
		return 1
	}
	code := func() int {
		defer env.close()
		if err := env.startEtcd(); err != nil {
			fmt.Fprintln(os.Stderr, "fleet: etcd:", err)
			return 1
		}
		return m.Run()
	}()
	env.report()
	return code
}
