package daemon

import (
	"testing"

	"github.com/extractedprism/extractedprism/pkg/probe"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

type fixedVerdicts map[string]probe.Verdict

func (f fixedVerdicts) Lookup(addr string) (probe.Verdict, bool) {
	v, ok := f[addr]
	return v, ok
}

// TestSharedVerdictNeverLeavesNoUpstream: a shared verdict takes an
// upstream out of rotation only while another may still be ready; when it
// would leave none, the node checks readiness itself.
func TestSharedVerdictNeverLeavesNoUpstream(t *testing.T) {
	d := &daemon{set: upstream.NewSet(upstream.Options{})}
	d.set.Reconcile([]upstream.Endpoint{{Address: "10.0.0.1:6443"}, {Address: "10.0.0.2:6443"}, {Address: "10.0.0.3:6443"}})
	if _, fresh := d.sharedVerdict("10.0.0.1:6443"); fresh {
		t.Fatal("a verdict without a watcher")
	}
	unready := probe.Verdict{Code: 500, Reason: "[-]etcd failed"}
	vs := fixedVerdicts{"10.0.0.1:6443": unready, "10.0.0.2:6443": {Ready: true, Code: 200}}
	d.shared.Store(&verdictsBox{vs})
	if v, fresh := d.sharedVerdict("10.0.0.1:6443"); !fresh || v.Ready {
		t.Errorf("unready with a ready one beside: %+v %v, want the unready verdict", v, fresh)
	}
	if _, fresh := d.sharedVerdict("10.0.0.3:6443"); fresh {
		t.Error("an address the verdict does not cover got one")
	}
	// Every covered address unready, one not covered: that one may be
	// ready, so the verdicts stand.
	vs["10.0.0.2:6443"] = unready
	if _, fresh := d.sharedVerdict("10.0.0.1:6443"); !fresh {
		t.Error("verdict dropped although an uncovered upstream may be ready")
	}
	// All unready: fall back to the node's own checks.
	vs["10.0.0.3:6443"] = unready
	for _, a := range d.set.Addresses() {
		if _, fresh := d.sharedVerdict(a); fresh {
			t.Errorf("%s: shared verdict kept although it leaves no upstream ready", a)
		}
	}
}
