// Package memlimit finds the memory limit the process runs under (its
// cgroup's, v1 or v2) and tells the Go runtime about it, so that the
// garbage collector works harder before the kernel's OOM killer acts.
//
// It owns one decision: the soft limit given to debug.SetMemoryLimit
// (GoLimit). It reads files only; the caller (cmd/extractedprism, at
// process start) logs the result and passes the limit on to whoever sizes
// things by it (the daemon's default proxy.max_connections).
//
// The file system root is injectable, so the detection is tested against
// fake /proc and /sys trees. Nothing it fails to read is fatal: a missing
// or unreadable file means "no limit found", with the reason in
// Result.Err.
package memlimit

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
)

// Margin bounds: the Go soft limit is the cgroup limit minus a tenth of it,
// and at least MinMargin below it. The margin is memory the runtime does
// not count and the kernel does (thread stacks outside the heap, the
// binary's mapped pages, socket buffers, page cache of files read), plus
// room for the collector to act before the hard limit is hit.
const (
	MarginFraction = 10 // the margin is 1/MarginFraction of the limit...
	MinMargin      = 4 << 20
)

// unlimitedV1 is where cgroup v1 spells "no limit": memory.limit_in_bytes
// then holds PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages);
// any value this large is no limit.
const unlimitedV1 = int64(1) << 62

// maxFileBytes bounds what is read of one file under /proc or /sys.
const maxFileBytes = 1 << 20

// Limit is the memory limit found for the process.
type Limit struct {
	// Bytes is the limit (0 = none found).
	Bytes int64
	// Source is the file it was read from, under the root given to Detect
	// ("" when there is no limit).
	Source string
}

// Detect returns the tightest memory limit of the process's cgroup and
// its ancestors that are visible under root ("" or "/" for the real
// system). With both hierarchies mounted (hybrid), the v1 memory
// controller wins when the process has one, since then the v2 hierarchy
// carries no memory controller. A limit of "max", the v1 "unlimited"
// value, or one above the machine's physical memory is no limit. It
// returns a zero Limit and an error saying why when the files needed
// cannot be read.
func Detect(root string) (Limit, error) {
	if root == "" {
		root = "/"
	}
	cg, err := readFile(root, "proc/self/cgroup")
	if err != nil {
		return Limit{}, fmt.Errorf("memlimit: %w", err)
	}
	v1Path, v2Path, haveV1, haveV2 := parseProcCgroup(cg)
	mi, err := readFile(root, "proc/self/mountinfo")
	if err != nil {
		return Limit{}, fmt.Errorf("memlimit: %w", err)
	}
	mounts := parseMountinfo(mi)
	var (
		dirs []string
		file string
	)
	switch {
	case haveV1:
		m, ok := findMount(mounts, func(m mount) bool { return m.fstype == "cgroup" && hasOption(m.superOpts, "memory") })
		if !ok {
			return Limit{}, errors.New("memlimit: /proc/self/cgroup names a v1 memory cgroup, but no cgroup mount has the memory controller")
		}
		dirs, file = cgroupDirs(m, v1Path), "memory.limit_in_bytes"
	case haveV2:
		m, ok := findMount(mounts, func(m mount) bool { return m.fstype == "cgroup2" })
		if !ok {
			return Limit{}, errors.New("memlimit: /proc/self/cgroup names a v2 cgroup, but no cgroup2 file system is mounted")
		}
		dirs, file = cgroupDirs(m, v2Path), "memory.max"
	default:
		return Limit{}, errors.New("memlimit: the process is in no memory cgroup")
	}
	physical := physicalMemory(root)
	var best Limit
	var leafErr error
	for i, dir := range dirs {
		name := path.Join(dir, file)
		data, err := readFile(root, name)
		if err != nil {
			// An ancestor without the file (the v2 root has no
			// memory.max) is normal; only the leaf's absence is reported.
			if i == 0 {
				leafErr = err
			}
			continue
		}
		n, limited, err := parseLimit(data)
		if err != nil {
			return Limit{}, fmt.Errorf("memlimit: %s: %w", "/"+name, err)
		}
		if !limited || n >= unlimitedV1 || (physical > 0 && n > physical) {
			continue
		}
		if best.Bytes == 0 || n < best.Bytes {
			best = Limit{Bytes: n, Source: "/" + name}
		}
	}
	if best.Bytes == 0 && leafErr != nil {
		return Limit{}, fmt.Errorf("memlimit: %w", leafErr)
	}
	return best, nil
}

// GoLimit is the soft memory limit for the Go runtime under a cgroup limit
// of limit bytes: limit minus max(limit/MarginFraction, MinMargin), and
// never below half the limit (a tiny limit keeps half for the runtime). It
// returns 0 for no limit.
func GoLimit(limit int64) int64 {
	if limit <= 0 {
		return 0
	}
	margin := max(limit/MarginFraction, MinMargin)
	return max(limit-margin, limit/2)
}

// Result is what Apply found and did.
type Result struct {
	// Limit is the cgroup memory limit (Bytes 0 = none found).
	Limit Limit
	// GoLimit is the runtime's soft memory limit now in force, in bytes
	// (math.MaxInt64 = none).
	GoLimit int64
	// FromEnv: GOMEMLIMIT was set in the environment, so Apply left the
	// runtime's limit as the environment set it.
	FromEnv bool
	// Set: Apply called debug.SetMemoryLimit.
	Set bool
	// Err says why no limit was found, when a file could not be read
	// (informational: the process runs on without a limit).
	Err error
}

// Options are Apply's inputs; zero values are the real system.
type Options struct {
	// Root is the file system root of /proc and /sys (default "/").
	Root string
	// LookupEnv reads the environment (default os.LookupEnv).
	LookupEnv func(string) (string, bool)
	// SetMemoryLimit sets the runtime's limit and returns the previous
	// one; a negative argument only reads it (default
	// debug.SetMemoryLimit).
	SetMemoryLimit func(int64) int64
}

// Apply detects the cgroup memory limit and, when the environment does
// not set GOMEMLIMIT and there is a limit, sets the runtime's soft memory
// limit to GoLimit of it. Call it once, at process start.
func Apply(o Options) Result {
	if o.LookupEnv == nil {
		o.LookupEnv = os.LookupEnv
	}
	if o.SetMemoryLimit == nil {
		o.SetMemoryLimit = debug.SetMemoryLimit
	}
	lim, err := Detect(o.Root)
	r := Result{Limit: lim, Err: err}
	if v, ok := o.LookupEnv("GOMEMLIMIT"); ok && v != "" {
		r.FromEnv = true
	} else if lim.Bytes > 0 {
		o.SetMemoryLimit(GoLimit(lim.Bytes))
		r.Set = true
	}
	r.GoLimit = o.SetMemoryLimit(-1)
	return r
}

// readFile reads root/name, bounded.
func readFile(root, name string) ([]byte, error) {
	f, err := os.DirFS(root).Open(name)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", "/"+name, err)
	}
	defer func() { _ = f.Close() }()
	var b bytes.Buffer
	if _, err := b.ReadFrom(&limited{f: f, n: maxFileBytes}); err != nil {
		return nil, fmt.Errorf("read %s: %w", "/"+name, err)
	}
	return b.Bytes(), nil
}

// limited reads at most n bytes of f.
type limited struct {
	f fs.File
	n int
}

func (l *limited) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("file too large")
	}
	if len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.f.Read(p)
	l.n -= n
	return n, err //nolint:wrapcheck // io.EOF must pass unwrapped
}

// parseProcCgroup returns the v1 memory controller's path and the v2
// path of /proc/self/cgroup, with whether each was present.
func parseProcCgroup(data []byte) (v1, v2 string, haveV1, haveV2 bool) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		id, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		ctrls, p, ok := strings.Cut(rest, ":")
		if !ok {
			continue
		}
		if id == "0" && ctrls == "" {
			v2, haveV2 = p, true
			continue
		}
		for c := range strings.SplitSeq(ctrls, ",") {
			if c == "memory" {
				v1, haveV1 = p, true
			}
		}
	}
	return v1, v2, haveV1, haveV2
}

// mount is one line of /proc/self/mountinfo.
type mount struct {
	root, point, fstype, superOpts string
}

// parseMountinfo parses /proc/self/mountinfo (proc(5)): "id parent
// major:minor root mountpoint options [optional...] - fstype source
// superoptions".
func parseMountinfo(data []byte) []mount {
	var out []mount
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxFileBytes)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f := strings.Fields(pre)
		g := strings.Fields(post)
		if len(f) < 5 || len(g) < 1 {
			continue
		}
		m := mount{root: unescape(f[3]), point: unescape(f[4]), fstype: g[0]}
		if len(g) >= 3 {
			m.superOpts = g[2]
		}
		out = append(out, m)
	}
	return out
}

// unescape undoes mountinfo's octal escapes (\040 for a blank, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func findMount(ms []mount, match func(mount) bool) (mount, bool) {
	for _, m := range ms {
		if match(m) {
			return m, true
		}
	}
	return mount{}, false
}

func hasOption(opts, want string) bool {
	for o := range strings.SplitSeq(opts, ",") {
		if o == want {
			return true
		}
	}
	return false
}

// cgroupDirs returns the directories, relative to the file system root,
// of the process's cgroup and of each ancestor visible in mount m, leaf
// first. The cgroup path of /proc/self/cgroup is relative to the
// hierarchy's root; m.root is the part of the hierarchy mounted at
// m.point (a container often sees only its own cgroup mounted, with its
// path in /proc/self/cgroup still the full one, or "/" under a cgroup
// namespace).
func cgroupDirs(m mount, cgPath string) []string {
	rel := cgPath
	switch {
	case m.root == "/" || m.root == "":
	case rel == m.root:
		rel = "/"
	case strings.HasPrefix(rel, m.root+"/"):
		rel = strings.TrimPrefix(rel, m.root)
	default:
		// The process's cgroup is not below the mounted part: only the
		// mount point itself can be read.
		rel = "/"
	}
	rel = path.Clean("/" + rel)
	base := strings.TrimPrefix(path.Clean(m.point), "/")
	var dirs []string
	for {
		dirs = append(dirs, strings.TrimPrefix(path.Join(base, rel), "/"))
		if rel == "/" {
			break
		}
		rel = path.Dir(rel)
	}
	for i, d := range dirs {
		if d == "" {
			dirs[i] = "."
		}
	}
	return dirs
}

// parseLimit reads a memory.max or memory.limit_in_bytes value: "max" is
// no limit.
func parseLimit(data []byte) (n int64, limited bool, err error) {
	s := strings.TrimSpace(string(data))
	if s == "max" {
		return 0, false, nil
	}
	n, err = strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("%q: not a number of bytes or \"max\"", s)
	}
	if n <= 0 {
		return 0, false, nil
	}
	return n, true, nil
}

// physicalMemory returns MemTotal of /proc/meminfo in bytes (0 if unknown).
func physicalMemory(root string) int64 {
	data, err := readFile(root, "proc/meminfo")
	if err != nil {
		return 0
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || kb <= 0 {
			return 0
		}
		return kb << 10
	}
	return 0
}
