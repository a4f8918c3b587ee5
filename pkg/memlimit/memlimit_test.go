package memlimit

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// tree writes files (path relative to the root -> content) under a
// temporary root and returns it.
func tree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const (
	meminfo = "MemTotal:       16318976 kB\nMemFree:         1000000 kB\n"

	mountsV2 = "25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n" +
		"29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"

	// Hybrid: v1 controllers, and cgroup2 at /sys/fs/cgroup/unified.
	mountsHybrid = "30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n" +
		"31 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n" +
		"34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n" +
		"40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)

func TestDetect(t *testing.T) {
	const mi64 = 64 << 20
	for _, tc := range []struct {
		name       string
		files      map[string]string
		want       int64
		wantSource string
		wantErr    string
	}{
		{
			name: "v2 leaf limit",
			files: map[string]string{
				"proc/self/cgroup":    "0::/kubepods.slice/pod1/cri-abc\n",
				"proc/self/mountinfo": mountsV2,
				"proc/meminfo":        meminfo,
				"sys/fs/cgroup/kubepods.slice/pod1/cri-abc/memory.max": "67108864\n",
				"sys/fs/cgroup/kubepods.slice/pod1/memory.max":         "max\n",
				"sys/fs/cgroup/kubepods.slice/memory.max":              "max\n",
			},
			want: mi64, wantSource: "/sys/fs/cgroup/kubepods.slice/pod1/cri-abc/memory.max",
		},
		{
			name: "v2 tighter ancestor wins",
			files: map[string]string{
				"proc/self/cgroup":    "0::/system.slice/extractedprism.service\n",
				"proc/self/mountinfo": mountsV2,
				"sys/fs/cgroup/system.slice/extractedprism.service/memory.max": "max\n",
				"sys/fs/cgroup/system.slice/memory.max":                        "33554432\n",
			},
			want: 32 << 20, wantSource: "/sys/fs/cgroup/system.slice/memory.max",
		},
		{
			name: "v2 max everywhere",
			files: map[string]string{
				"proc/self/cgroup":                    "0::/user.slice\n",
				"proc/self/mountinfo":                 mountsV2,
				"sys/fs/cgroup/user.slice/memory.max": "max\n",
			},
		},
		{
			name: "v2 under a cgroup namespace",
			files: map[string]string{
				"proc/self/cgroup":         "0::/\n",
				"proc/self/mountinfo":      mountsV2,
				"sys/fs/cgroup/memory.max": "67108864",
			},
			want: mi64, wantSource: "/sys/fs/cgroup/memory.max",
		},
		{
			name: "v2 limit above physical memory is none",
			files: map[string]string{
				"proc/self/cgroup":             "0::/big\n",
				"proc/self/mountinfo":          mountsV2,
				"proc/meminfo":                 meminfo,
				"sys/fs/cgroup/big/memory.max": "1099511627776\n",
			},
		},
		{
			name: "hybrid reads the v1 memory controller",
			files: map[string]string{
				"proc/self/cgroup": "12:memory:/kubepods/burstable/pod1/abc\n" +
					"3:cpu,cpuacct:/kubepods/burstable/pod1/abc\n0::/kubepods/burstable/pod1/abc\n",
				"proc/self/mountinfo": mountsHybrid,
				"proc/meminfo":        meminfo,
				"sys/fs/cgroup/memory/kubepods/burstable/pod1/abc/memory.limit_in_bytes": "67108864\n",
				"sys/fs/cgroup/memory/kubepods/burstable/pod1/memory.limit_in_bytes":     "9223372036854771712\n",
				"sys/fs/cgroup/memory/kubepods/burstable/memory.limit_in_bytes":          "9223372036854771712\n",
				"sys/fs/cgroup/memory/kubepods/memory.limit_in_bytes":                    "9223372036854771712\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes":                             "9223372036854771712\n",
			},
			want: mi64, wantSource: "/sys/fs/cgroup/memory/kubepods/burstable/pod1/abc/memory.limit_in_bytes",
		},
		{
			name: "v1 unlimited",
			files: map[string]string{
				"proc/self/cgroup":    "4:memory:/process_api/x\n0::/\n",
				"proc/self/mountinfo": mountsHybrid,
				"sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes": "9223372036854771712\n",
			},
		},
		{
			name: "v1 container sees only its own cgroup mounted",
			files: map[string]string{
				"proc/self/cgroup":                           "9:memory:/docker/abc\n",
				"proc/self/mountinfo":                        "600 590 0:31 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes": "134217728\n",
			},
			want: 128 << 20, wantSource: "/sys/fs/cgroup/memory/memory.limit_in_bytes",
		},
		{
			name: "v1 mount with an escaped blank",
			files: map[string]string{
				"proc/self/cgroup":               "9:memory:/a\n",
				"proc/self/mountinfo":            "34 30 0:31 / /cg\\040mem rw - cgroup cgroup rw,memory\n",
				"cg mem/a/memory.limit_in_bytes": "104857600\n",
			},
			want: 100 << 20, wantSource: "/cg mem/a/memory.limit_in_bytes",
		},
		{
			name:    "no /proc/self/cgroup",
			files:   map[string]string{"proc/meminfo": meminfo},
			wantErr: "/proc/self/cgroup",
		},
		{
			name: "leaf limit file missing",
			files: map[string]string{
				"proc/self/cgroup":    "0::/gone\n",
				"proc/self/mountinfo": mountsV2,
			},
			wantErr: "/sys/fs/cgroup/gone/memory.max",
		},
		{
			name: "v1 memory cgroup without its mount",
			files: map[string]string{
				"proc/self/cgroup":    "4:memory:/x\n",
				"proc/self/mountinfo": mountsV2,
			},
			wantErr: "no cgroup mount has the memory controller",
		},
		{
			name: "garbage in the limit file",
			files: map[string]string{
				"proc/self/cgroup":           "0::/a\n",
				"proc/self/mountinfo":        mountsV2,
				"sys/fs/cgroup/a/memory.max": "lots\n",
			},
			wantErr: `"lots"`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Detect(tree(t, tc.files))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one naming %q", err, tc.wantErr)
				}
				if got != (Limit{}) {
					t.Errorf("limit %+v with an error", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Bytes != tc.want || got.Source != tc.wantSource {
				t.Errorf("Detect = %+v, want %d from %q", got, tc.want, tc.wantSource)
			}
		})
	}
}

func TestGoLimit(t *testing.T) {
	for limit, want := range map[int64]int64{
		0:         0,
		-1:        0,
		64 << 20:  64<<20 - (64<<20)/10, // 57.6 MiB
		1 << 30:   1<<30 - (1<<30)/10,
		32 << 20:  28 << 20, // the 4 MiB floor of the margin
		6 << 20:   3 << 20,  // never below half
		100 << 20: 90 << 20,
	} {
		if got := GoLimit(limit); got != want {
			t.Errorf("GoLimit(%d) = %d, want %d", limit, got, want)
		}
	}
}

func TestApply(t *testing.T) {
	root := tree(t, map[string]string{
		"proc/self/cgroup":         "0::/\n",
		"proc/self/mountinfo":      mountsV2,
		"sys/fs/cgroup/memory.max": "67108864\n",
	})
	noEnv := func(string) (string, bool) { return "", false }

	t.Run("sets the limit", func(t *testing.T) {
		cur := int64(math.MaxInt64)
		set := func(n int64) int64 {
			prev := cur
			if n >= 0 {
				cur = n
			}
			return prev
		}
		r := Apply(Options{Root: root, LookupEnv: noEnv, SetMemoryLimit: set})
		if !r.Set || r.FromEnv || r.Err != nil || r.Limit.Bytes != 64<<20 {
			t.Fatalf("result %+v", r)
		}
		if want := GoLimit(64 << 20); cur != want || r.GoLimit != want {
			t.Errorf("runtime limit %d, reported %d, want %d", cur, r.GoLimit, want)
		}
	})
	t.Run("GOMEMLIMIT in the environment wins", func(t *testing.T) {
		cur := int64(100 << 20) // as the runtime read it from the environment
		set := func(n int64) int64 {
			prev := cur
			if n >= 0 {
				cur = n
			}
			return prev
		}
		env := func(k string) (string, bool) { return "100MiB", k == "GOMEMLIMIT" }
		r := Apply(Options{Root: root, LookupEnv: env, SetMemoryLimit: set})
		if r.Set || !r.FromEnv || cur != 100<<20 || r.GoLimit != 100<<20 {
			t.Fatalf("result %+v, runtime limit %d", r, cur)
		}
		if r.Limit.Bytes != 64<<20 {
			t.Errorf("the cgroup limit is still reported: %+v", r.Limit)
		}
	})
	t.Run("no cgroup files is no limit, not a failure", func(t *testing.T) {
		calls := 0
		set := func(n int64) int64 {
			if n >= 0 {
				calls++
			}
			return math.MaxInt64
		}
		r := Apply(Options{Root: t.TempDir(), LookupEnv: noEnv, SetMemoryLimit: set})
		if r.Set || calls != 0 || r.Limit.Bytes != 0 || r.Err == nil || r.GoLimit != math.MaxInt64 {
			t.Fatalf("result %+v, %d sets", r, calls)
		}
	})
}

// TestDetectOnThisMachine reads the real files: whatever it finds, it
// must not fail where /proc/self/cgroup exists.
func TestDetectOnThisMachine(t *testing.T) {
	if _, err := os.Stat("/proc/self/cgroup"); err != nil {
		t.Skip("no /proc/self/cgroup")
	}
	l, err := Detect("")
	if err != nil {
		t.Logf("no limit found: %v", err)
		return
	}
	t.Logf("limit %d from %q", l.Bytes, l.Source)
}
