//go:build linux

package memcg

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const cgroupRoot = "/sys/fs/cgroup"

// cgroup is a memory cgroup the test created, of cgroup v1's memory
// controller or of cgroup v2.
type cgroup struct {
	v2    bool
	dir   string
	limit int64 // memory limit in bytes
}

// detectCgroup finds the memory controller: cgroup v2 when /sys/fs/cgroup
// is a cgroup2 file system with the memory controller, else cgroup v1's
// memory hierarchy at /sys/fs/cgroup/memory. It returns the directory new
// cgroups go into and whether it is v2.
func detectCgroup() (cgroup, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(cgroupRoot, &st); err != nil {
		return cgroup{}, fmt.Errorf("no cgroup file system at %s: %w", cgroupRoot, err)
	}
	const cgroup2Magic = 0x63677270
	if st.Type == cgroup2Magic {
		b, err := os.ReadFile(filepath.Join(cgroupRoot, "cgroup.controllers"))
		if err != nil || !strings.Contains(" "+strings.TrimSpace(string(b))+" ", " memory ") {
			return cgroup{}, fmt.Errorf("cgroup v2 at %s has no memory controller (cgroup.controllers %q, %v)", cgroupRoot, b, err)
		}
		return cgroup{v2: true, dir: cgroupRoot}, nil
	}
	v1 := filepath.Join(cgroupRoot, "memory")
	if _, err := os.Stat(filepath.Join(v1, "memory.limit_in_bytes")); err != nil {
		return cgroup{}, fmt.Errorf("no memory controller: %s is not cgroup2 and %s has no memory.limit_in_bytes", cgroupRoot, v1)
	}
	return cgroup{dir: v1}, nil
}

// newCgroup creates the cgroup name at the top of the memory hierarchy
// with the limit in bytes and no swap.
func newCgroup(name string, limit int64) (*cgroup, error) {
	parent, err := detectCgroup()
	if err != nil {
		return nil, err
	}
	cg := &cgroup{v2: parent.v2, dir: filepath.Join(parent.dir, name), limit: limit}
	if cg.v2 {
		// The controller must be enabled for the children of the root.
		b, _ := os.ReadFile(filepath.Join(parent.dir, "cgroup.subtree_control"))
		if !strings.Contains(" "+strings.TrimSpace(string(b))+" ", " memory ") {
			if err := os.WriteFile(filepath.Join(parent.dir, "cgroup.subtree_control"), []byte("+memory"), 0o644); err != nil {
				return nil, fmt.Errorf("enable the memory controller in %s: %w", parent.dir, err)
			}
		}
	}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	lim := strconv.FormatInt(limit, 10)
	if cg.v2 {
		if err := cg.write("memory.max", lim); err != nil {
			_ = cg.remove()
			return nil, err
		}
		if cg.exists("memory.swap.max") {
			_ = cg.write("memory.swap.max", "0")
		}
		return cg, nil
	}
	if err := cg.write("memory.limit_in_bytes", lim); err != nil {
		_ = cg.remove()
		return nil, err
	}
	if cg.exists("memory.memsw.limit_in_bytes") {
		_ = cg.write("memory.memsw.limit_in_bytes", lim)
	}
	return cg, nil
}

func (c *cgroup) version() string {
	if c.v2 {
		return "cgroup v2"
	}
	return "cgroup v1"
}

func (c *cgroup) exists(file string) bool {
	_, err := os.Stat(filepath.Join(c.dir, file))
	return err == nil
}

func (c *cgroup) write(file, v string) error {
	if err := os.WriteFile(filepath.Join(c.dir, file), []byte(v), 0o644); err != nil {
		return fmt.Errorf("write %q to %s: %w", v, filepath.Join(c.dir, file), err)
	}
	return nil
}

func (c *cgroup) read(file string) string {
	b, err := os.ReadFile(filepath.Join(c.dir, file))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// procsFile is where a process writes its PID to join the cgroup.
func (c *cgroup) procsFile() string { return filepath.Join(c.dir, "cgroup.procs") }

// keyed reads a "key value" line of a flat-keyed file; -1 when absent.
func (c *cgroup) keyed(file, key string) int64 {
	for l := range strings.SplitSeq(c.read(file), "\n") {
		if k, v, ok := strings.Cut(l, " "); ok && k == key {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err == nil {
				return n
			}
		}
	}
	return -1
}

func (c *cgroup) number(file string) int64 {
	n, err := strconv.ParseInt(c.read(file), 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// oomKills is how many processes the kernel's OOM killer killed in the
// cgroup (memory.oom_control's oom_kill, kernels from 4.13; v2's
// memory.events oom_kill); -1 when the kernel does not say.
func (c *cgroup) oomKills() int64 {
	if c.v2 {
		return c.keyed("memory.events", "oom_kill")
	}
	return c.keyed("memory.oom_control", "oom_kill")
}

// usage is the memory charged to the cgroup now, bytes.
func (c *cgroup) usage() int64 {
	if c.v2 {
		return c.number("memory.current")
	}
	return c.number("memory.usage_in_bytes")
}

// peak is the most memory charged to the cgroup so far (v1
// memory.max_usage_in_bytes, v2 memory.peak from kernel 5.19); -1 when the
// kernel does not keep it.
func (c *cgroup) peak() int64 {
	if c.v2 {
		return c.number("memory.peak")
	}
	return c.number("memory.max_usage_in_bytes")
}

// kernelUsage is the part of usage that is kernel memory (sockets,
// pipes, slab): v1 memory.kmem.usage_in_bytes, v2 memory.stat kernel (or
// kernel_stack + slab + sock on older kernels); -1 when the kernel does
// not say.
func (c *cgroup) kernelUsage() int64 {
	if !c.v2 {
		return c.number("memory.kmem.usage_in_bytes")
	}
	if k := c.keyed("memory.stat", "kernel"); k >= 0 {
		return k
	}
	var sum int64 = -1
	for _, k := range []string{"kernel_stack", "slab", "sock"} {
		if v := c.keyed("memory.stat", k); v >= 0 {
			sum = max(sum, 0) + v
		}
	}
	return sum
}

// limitHits is how often usage reached the limit (v1 memory.failcnt, v2
// memory.events max).
func (c *cgroup) limitHits() int64 {
	if c.v2 {
		return c.keyed("memory.events", "max")
	}
	return c.number("memory.failcnt")
}

// remove deletes the cgroup once its processes are gone.
func (c *cgroup) remove() error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := syscall.Rmdir(c.dir)
		if err == nil || errors.Is(err, syscall.ENOENT) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", c.dir, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
