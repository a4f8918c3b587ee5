// Package node runs extractedprism the ways users deploy it on a node (the
// container image, the kubeadm static pod and the Helm DaemonSet) under a
// real kubelet and containerd, with the kubelet itself reaching its API
// servers through extractedprism.
//
// The test binary creates a network namespace of its own (API servers on
// 198.51.100.11-13, the node on 198.51.100.20, all on the namespace's lo)
// and runs itself again inside it (test/cluster's Netns). The inner run
// also has a mount namespace of its own (ip netns exec makes one): the host paths the manifests use
// (/etc/extractedprism, /var/lib/extractedprism, /var/log/containers) and the
// kernel settings the kubelet insists on are bind mounts of files in the
// test's work directory there, so the host keeps its own. Pods live in a
// cgroup subtree of the test's own. Everything left is killed and removed
// when the tests end, whether they passed or not.
package node

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	harness "github.com/extractedprism/extractedprism/test/cluster"
)

// Environment variables between the outer and the inner run (besides the
// namespace's name, netns.EnvVar).
const (
	workDirEnv = "EP_NODE_WORKDIR"
	cgroupEnv  = "EP_NODE_CGROUP"
)

// netns is the namespace the tests run in.
var netns = &harness.Netns{Prefix: "ep-node", Tag: "node-e2e", EnvVar: "EP_NODE_NETNS"}

// apiserverIPs are the addresses of the test apiservers, on the namespace's lo.
var apiserverIPs = harness.APIServerIPv4[:3]

// nodeIP is the node's address (the kubelet's, on the namespace's lo).
const nodeIP = "198.51.100.20"

// nodeName is the node's name.
const nodeName = "node-e2e"

// hostMountpoints are host directories the manifests reference; the inner
// run bind-mounts directories of its own over them. Created (empty) when
// missing and removed again afterwards.
var hostMountpoints = []string{"/etc/extractedprism", "/var/lib/extractedprism", "/var/log/containers"}

// cgroupRoot is the cgroup (in every hierarchy) under which the kubelet
// puts its pods: named after the run's network namespace, so that runs on
// one machine never share one.
var cgroupRoot = os.Getenv(cgroupEnv)

func TestMain(m *testing.M) {
	if !netns.Inside() {
		os.Exit(runOutside())
	}
	os.Exit(runInside(m))
}

// runOutside prepares what the inner run needs from the host, runs the
// test binary inside a fresh network namespace and cleans up after it.
func runOutside() int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "node-e2e: needs root (network namespace, containerd, kubelet)")
		return 1
	}
	netns.NewName()
	cgroupRoot = "/" + netns.Name
	work, err := os.MkdirTemp("", "ep-node-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "node-e2e: work directory:", err)
		return 1
	}
	if err := os.Chmod(work, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "node-e2e:", err)
		return 1
	}
	var created []string
	defer func() {
		cleanupCgroups(cgroupRoot)
		for i := len(created) - 1; i >= 0; i-- {
			_ = os.Remove(created[i])
		}
		if os.Getenv("EP_NODE_KEEP") == "" {
			_ = os.RemoveAll(work)
		} else {
			fmt.Println("node-e2e: work directory kept in", work)
		}
	}()
	for _, p := range hostMountpoints {
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(p, 0o755); err != nil {
				fmt.Fprintln(os.Stderr, "node-e2e:", err)
				return 1
			}
			created = append(created, p)
		}
	}
	if err := createCgroups(cgroupRoot); err != nil {
		fmt.Fprintln(os.Stderr, "node-e2e: cgroups:", err)
		return 1
	}
	defer netns.Delete()
	netns.Addrs = append(append([]string{}, apiserverIPs...), nodeIP, serviceIP)
	if err := netns.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "node-e2e:", err)
		return 1
	}
	netns.Env = []string{workDirEnv + "=" + work, cgroupEnv + "=" + cgroupRoot}
	return netns.Exec()
}

// cgroupHierarchies lists the mounted cgroup hierarchies (v1, and the v2
// one of a hybrid setup, where runc creates the pods' cgroups too).
func cgroupHierarchies() []string {
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		p := filepath.Join("/sys/fs/cgroup", e.Name())
		if _, err := os.Stat(filepath.Join(p, "cgroup.procs")); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// createCgroups creates root in every hierarchy (cpuset needs its cpus and
// mems copied from the parent before a task or child can use it).
func createCgroups(root string) error {
	for _, h := range cgroupHierarchies() {
		p := filepath.Join(h, root)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return err
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(p, f), b, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(p, f), err)
				}
			}
		}
	}
	return nil
}

// cleanupCgroups kills every process left in root's subtree (pod processes
// live in pod network namespaces, so killing the test namespace's processes
// does not reach them) and removes the subtree, deepest first.
func cleanupCgroups(root string) {
	if !strings.HasPrefix(root, "/ep-node-") {
		// Never a cgroup the test did not create itself.
		fmt.Fprintf(os.Stderr, "node-e2e: not cleaning up cgroup %q\n", root)
		return
	}
	for attempt := 0; attempt < 50; attempt++ {
		left := 0
		for _, h := range cgroupHierarchies() {
			_ = filepath.WalkDir(filepath.Join(h, root), func(p string, d os.DirEntry, err error) error {
				if err != nil || !d.IsDir() {
					return nil
				}
				b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						_ = syscall.Kill(pid, syscall.SIGKILL)
						left++
					}
				}
				return nil
			})
		}
		var dirs []string
		for _, h := range cgroupHierarchies() {
			_ = filepath.WalkDir(filepath.Join(h, root), func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
		}
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = os.Remove(dirs[i])
		}
		if left == 0 && len(dirs) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "node-e2e: cgroup %s not fully removed\n", root)
}

// runInside runs the tests inside the namespaces.
func runInside(m *testing.M) int {
	if !strings.HasPrefix(cgroupRoot, "/ep-node-") {
		fmt.Fprintf(os.Stderr, "node-e2e: %s is %q, want the run's cgroup\n", cgroupEnv, cgroupRoot)
		return 1
	}
	var err error
	env, err = newEnvironment(os.Getenv(workDirEnv))
	if err != nil {
		fmt.Fprintln(os.Stderr, "node-e2e: setup:", err)
		return 1
	}
	code := func() int {
		defer env.close()
		return m.Run()
	}()
	env.Report()
	return code
}
