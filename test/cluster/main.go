package cluster

import (
	"fmt"
	"os"
	"testing"
)

// Main is TestMain's body for a module that runs in the namespace: the
// outer run (Run) when this process is not inside it yet, else inside()
// once CheckInside has passed. It returns the exit code.
func (n *Netns) Main(inside func() int) int {
	if !n.Inside() {
		return n.Run()
	}
	if err := n.CheckInside(); err != nil {
		fmt.Fprintln(os.Stderr, n.Tag+":", err)
		return 1
	}
	return inside()
}

// RunTests is the inner run of a module whose tests share one etcd: it
// makes the environment (NewEnv(o)) and hands it to use, starts etcd with
// o.EtcdFlags, runs the tests, closes the environment (keeping the work
// directory when the variable o.KeepEnv names is set) and prints the
// report. It returns the exit code.
func RunTests(m *testing.M, o Options, use func(*Env)) int {
	e, err := NewEnv(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, o.Name+": setup:", err)
		return 1
	}
	use(e)
	code := func() int {
		defer e.Close(o.KeepEnv != "" && os.Getenv(o.KeepEnv) != "")
		if err := e.StartEtcd(o.EtcdFlags...); err != nil {
			fmt.Fprintln(os.Stderr, o.Name+": etcd:", err)
			return 1
		}
		return m.Run()
	}()
	var extra []string
	if o.ReportExtra != nil {
		extra = o.ReportExtra()
	}
	e.Report(extra...)
	return code
}
