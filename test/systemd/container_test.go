//go:build systemdtest

package systemd_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rootfsPackages are installed into the cached container root. procps gives
// kill and pgrep, which the tests run inside the container.
const rootfsPackages = "systemd,systemd-sysv,dbus,procps"

// ensureRootfs returns a Debian bookworm root with systemd, building it with
// debootstrap into cacheDir the first time (about 1.5 minutes) and reusing
// it afterwards. The container never writes to it (--volatile=overlay).
func ensureRootfs(t *testing.T, cacheDir string) string {
	t.Helper()
	rootfs := filepath.Join(cacheDir, "rootfs")
	stamp := filepath.Join(cacheDir, "rootfs.packages")
	if b, err := os.ReadFile(stamp); err == nil && string(b) == rootfsPackages {
		if _, err := os.Stat(filepath.Join(rootfs, "usr/lib/systemd/systemd")); err == nil {
			t.Logf("reusing container root %s", rootfs)
			return rootfs
		}
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Fatalf("debootstrap not found (apt-get install debootstrap systemd-container): %v", err)
	}
	tmp := rootfs + ".tmp"
	for _, p := range []string{tmp, rootfs, stamp} {
		if err := os.RemoveAll(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("building container root %s with debootstrap (about 1.5 minutes)", rootfs)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "debootstrap", "--variant=minbase", "--include="+rootfsPackages,
		"bookworm", tmp, "http://deb.debian.org/debian").CombinedOutput()
	if err != nil {
		t.Fatalf("debootstrap: %v\n%s", err, tail(string(out), 40))
	}
	if err := os.Rename(tmp, rootfs); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stamp, []byte(rootfsPackages), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("container root built in %v", time.Since(start).Round(time.Second))
	return rootfs
}

// container is a Debian system booted with systemd-nspawn. It shares the
// host's network namespace, so its 127.0.0.1 is the host's.
type container struct {
	t       *testing.T
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	pid     int // the container's systemd, as seen from the host
	console string
}

// bootContainer boots rootfs with a throwaway overlay on top, binds hostDir
// read-only at /pkgs (and each of extraBinds, "HOST:CONTAINER", read-only
// too), and waits until systemd has finished booting. The container is
// powered off when the test ends, pass or fail.
func bootContainer(t *testing.T, rootfs, hostDir string, extraBinds ...string) *container {
	t.Helper()
	console := filepath.Join(t.TempDir(), "console.log")
	f, err := os.Create(console)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("eptest%d", os.Getpid())
	args := []string{"--keep-unit", "--register=no", "--console=pipe", "--quiet",
		"--volatile=overlay", "--bind-ro=" + hostDir + ":/pkgs"}
	for _, b := range extraBinds {
		args = append(args, "--bind-ro="+b)
	}
	cmd := exec.Command("systemd-nspawn", append(args, "--machine="+name, "-D", rootfs, "--boot")...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("systemd-nspawn: %v", err)
	}
	c := &container{t: t, cmd: cmd, exited: make(chan struct{}), console: console}
	go func() {
		c.waitErr = cmd.Wait()
		_ = f.Close()
		close(c.exited)
	}()
	t.Cleanup(c.poweroff)

	deadline := time.Now().Add(60 * time.Second)
	for c.pid == 0 {
		select {
		case <-c.exited:
			t.Fatalf("systemd-nspawn exited at boot: %v\n%s", c.waitErr, c.consoleTail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no systemd inside the container after 60s\n%s", c.consoleTail())
		}
		c.pid = initPID(cmd.Process.Pid)
		if c.pid == 0 {
			time.Sleep(50 * time.Millisecond) // polling for the child process to appear
		}
	}
	// The bus appears a moment after systemd starts: poll until boot is done.
	var state string
	if err := waitFor(3*time.Minute, func() bool {
		out, _ := c.exec(30*time.Second, "systemctl", "is-system-running")
		state = strings.TrimSpace(out)
		return state == "running" || state == "degraded" || state == "maintenance" || state == "stopping"
	}); err != nil || (state != "running" && state != "degraded") {
		failed, _ := c.exec(time.Minute, "systemctl", "--failed", "--no-pager")
		t.Fatalf("container boot ended in state %q (%v)\n%s\n%s", state, err, failed, c.consoleTail())
	}
	if state == "degraded" {
		failed, _ := c.exec(time.Minute, "systemctl", "--failed", "--no-pager")
		t.Logf("container booted degraded:\n%s", failed)
	}
	return c
}

// initPID returns the child of nspawn that runs systemd, or 0.
func initPID(nspawn int) int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", nspawn))
	for _, task := range tasks {
		b, _ := os.ReadFile(task)
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if strings.TrimSpace(string(comm)) == "systemd" {
				return pid
			}
		}
	}
	return 0
}

func (c *container) consoleTail() string {
	b, _ := os.ReadFile(c.console)
	return "console:\n" + tail(string(b), 30)
}

// exec runs a command inside the container and returns its stdout; err
// includes stderr.
func (c *container) exec(timeout time.Duration, args ...string) (string, error) {
	return c.execInput(timeout, nil, args...)
}

func (c *container) execInput(timeout time.Duration, stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	full := append([]string{"-t", strconv.Itoa(c.pid), "-a", "env", "-i",
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8", "SYSTEMD_PAGER="}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, ctx.Err())
	}
	if err != nil {
		return stdout.String(), fmt.Errorf("%s: %w\nstdout: %s\nstderr: %s", strings.Join(args, " "), err,
			tail(stdout.String(), 20), tail(stderr.String(), 20))
	}
	return stdout.String(), nil
}

// must runs a command inside the container and fails the test on error.
func (c *container) must(args ...string) string {
	c.t.Helper()
	out, err := c.exec(3*time.Minute, args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// writeFile writes a file inside the container.
func (c *container) writeFile(path, content string) {
	c.t.Helper()
	c.must("mkdir", "-p", filepath.Dir(path))
	if _, err := c.execInput(time.Minute, []byte(content), "sh", "-c", `cat > "$1"`, "sh", path); err != nil {
		c.t.Fatal(err)
	}
}

// show returns systemctl show properties of a unit.
func (c *container) show(unit string, props ...string) map[string]string {
	c.t.Helper()
	out := c.must("systemctl", "show", unit, "--property="+strings.Join(props, ","))
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = v
		}
	}
	return m
}

// journal returns the unit's journal since a cursor-free point ("" = all).
func (c *container) journal(units ...string) string {
	args := []string{"journalctl", "--no-pager", "-o", "short-monotonic"}
	for _, u := range units {
		args = append(args, "-u", u)
	}
	out, err := c.exec(time.Minute, args...)
	if err != nil {
		return err.Error()
	}
	return out
}

// poweroff stops the container: systemctl poweroff, then SIGKILL of
// systemd-nspawn's process group if it has not exited within a minute.
func (c *container) poweroff() {
	select {
	case <-c.exited:
		return
	default:
	}
	if c.pid != 0 {
		if _, err := c.exec(30*time.Second, "systemctl", "poweroff", "--no-block"); err != nil {
			// Without a bus (early boot), SIGRTMIN+4 asks systemd to power off.
			c.t.Logf("systemctl poweroff: %v; sending SIGRTMIN+4 to the container's systemd", err)
			_ = syscall.Kill(c.pid, syscall.Signal(34+4))
		}
	}
	select {
	case <-c.exited:
		return
	case <-time.After(60 * time.Second):
	}
	c.t.Logf("container did not power off within 60s; killing systemd-nspawn (pid %d)", c.cmd.Process.Pid)
	_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		c.t.Errorf("systemd-nspawn (pid %d) still running after SIGKILL", c.cmd.Process.Pid)
	}
}
