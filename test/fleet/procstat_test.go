package fleet

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat
// (100 on every Linux architecture Go supports).
const clockTicks = 100

// cpuSeconds returns the CPU time (user + system) pid has used so far. CPU
// seconds do not depend on how busy the rest of the machine is, unlike
// wall-clock timings.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	// The command name (field 2) may hold spaces; fields count from after it.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat of %d: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("stat of %d: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("stat of %d: utime %q stime %q", pid, f[11], f[12])
	}
	return float64(ut+st) / clockTicks, nil
}

// rssBytes returns pid's resident set size.
func rssBytes(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("status of %d: VmRSS %q", pid, v)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("status of %d: no VmRSS", pid)
}

// cpuMeter measures the CPU seconds a set of processes use over a window.
type cpuMeter struct {
	pids  []int
	start []float64
	at    time.Time
}

// startCPU starts measuring pids.
func startCPU(pids ...int) (*cpuMeter, error) {
	m := &cpuMeter{pids: pids, at: time.Now()}
	for _, p := range pids {
		c, err := cpuSeconds(p)
		if err != nil {
			return nil, err
		}
		m.start = append(m.start, c)
	}
	return m, nil
}

// stop returns each process's CPU seconds since start and the wall time.
func (m *cpuMeter) stop() ([]float64, time.Duration, error) {
	out := make([]float64, len(m.pids))
	for i, p := range m.pids {
		c, err := cpuSeconds(p)
		if err != nil {
			return nil, 0, err
		}
		out[i] = c - m.start[i]
	}
	return out, time.Since(m.at), nil
}
