package cluster

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Netns is the network namespace a test binary runs itself in: TestMain
// calls Run in the outer process (as root), which creates the namespace,
// puts Addrs on its loopback interface, runs the same binary with the same
// arguments inside it and removes the namespace and every process left in
// it afterwards, whether the tests passed or not. Inside reports which of
// the two runs a process is.
type Netns struct {
	// Prefix starts the namespace's name (a random suffix follows), for
	// example "ep-e2e".
	Prefix string
	// Tag starts the messages the outer run prints, for example "e2e".
	Tag string
	// EnvVar tells the inner run the namespace's name.
	EnvVar string
	// Addrs are the addresses (IPv4 or IPv6, without a prefix length) put
	// on the namespace's lo.
	Addrs []string
	// Env is added to the inner run's environment.
	Env []string
	// Name is the namespace's name, set by NewName (or Run).
	Name string
}

// Inside reports whether this process is the inner run.
func (n *Netns) Inside() bool { return os.Getenv(n.EnvVar) != "" }

// CheckInside refuses to run unless this process is in the namespace
// EnvVar names (and not in the host's), so that listeners and signals of
// the inner run can never reach anything outside it.
func (n *Netns) CheckInside() error {
	name := os.Getenv(n.EnvVar)
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return fmt.Errorf("read own network namespace: %w", err)
	}
	init, err := os.Readlink("/proc/1/ns/net")
	if err == nil && init == self {
		return fmt.Errorf("%s=%q is set but this process runs in the host's network namespace; refusing to start", n.EnvVar, name)
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

// NewName picks a fresh name for the namespace.
func (n *Netns) NewName() { n.Name = n.Prefix + "-" + RandomHex(4) }

// Create adds the namespace, brings its lo up and puts Addrs on it.
func (n *Netns) Create() error {
	setup := [][]string{
		{"netns", "add", n.Name},
		{"-n", n.Name, "link", "set", "lo", "up"},
	}
	for _, ip := range n.Addrs {
		setup = append(setup, []string{"-n", n.Name, "addr", "add", HostPrefix(ip), "dev", "lo"})
	}
	for _, args := range setup {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// HostName is the name of host i's namespace (AddHost).
func (n *Netns) HostName(i int) string { return fmt.Sprintf("%s-h%d", os.Getenv(n.EnvVar), i) }

// Delete kills every process left in the namespace (by PID, as the kernel
// lists them) and deletes it, and the hosts' namespaces a run left.
func (n *Netns) Delete() {
	hosts, _ := filepath.Glob("/run/netns/" + n.Name + "-h*")
	for _, h := range hosts {
		_ = exec.Command("ip", "netns", "del", filepath.Base(h)).Run()
	}
	out, _ := exec.Command("ip", "netns", "pids", n.Name).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGCONT) // a stopped process dies only once it runs
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "%s: ip netns del %s: %v: %s\n", n.Tag, n.Name, err, out)
	}
}

// Exec runs this binary again inside the namespace, passes interrupts on
// (so that the inner run can clean up its processes) and returns its exit
// code.
func (n *Netns) Exec() int {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name, os.Args[0]}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.Env = append(append(os.Environ(), n.EnvVar+"="+n.Name), n.Env...)
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, n.Tag+":", err)
		return 1
	}
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
				fmt.Fprintln(os.Stderr, n.Tag+":", err)
				return 1
			}
			return 0
		}
	}
}

// Run is the outer run: it needs root, creates the namespace, runs this
// binary inside it and removes the namespace afterwards.
func (n *Netns) Run() int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, n.Tag+": needs root to create a network namespace")
		return 1
	}
	n.NewName()
	defer n.Delete()
	if err := n.Create(); err != nil {
		fmt.Fprintln(os.Stderr, n.Tag+":", err)
		return 1
	}
	return n.Exec()
}
