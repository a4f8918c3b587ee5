package fleet

import (
	"fmt"
	"sync"
)

// Costs per probe kind measured against the real kube-apiserver
// (docs/fleet.md, section 1): a kept-alive GET /readyz and an HTTP/2 PING
// on a kept-alive connection, in apiserver CPU milliseconds.
const (
	getCostMs  = 0.690
	pingCostMs = 0.175
	// sharedCostCores is what the shared readiness adds on the apiserver
	// that carries every node's watch at 5,000 nodes (docs/fleet.md,
	// section 5: heartbeat events, idle watches and the publishers).
	sharedCostCores = 0.09
	fleetScale      = 5000
)

// fleetResult collects the figures of the one-line RESULT summary as the
// tests measure them; unset figures print as "n/a".
var fleetResult struct {
	mu                  sync.Mutex
	idle, traffic       *float64 // probe cores per apiserver at 5,000 nodes
	unreadyOut, hungOut *float64 // seconds until every node avoids it
}

func setResult(p **float64, v float64) {
	fleetResult.mu.Lock()
	defer fleetResult.mu.Unlock()
	*p = &v
}

// resultLine is the RESULT line of bin/fleet-report.txt.
func resultLine() string {
	fleetResult.mu.Lock()
	defer fleetResult.mu.Unlock()
	f := func(p *float64, format string) string {
		if p == nil {
			return "n/a"
		}
		return fmt.Sprintf(format, *p)
	}
	return fmt.Sprintf("RESULT fleet probe_cores_5000_idle=%s probe_cores_5000_traffic=%s unready_out_s=%s hung_out_s=%s",
		f(fleetResult.idle, "%.3f"), f(fleetResult.traffic, "%.3f"), f(fleetResult.unreadyOut, "%.2f"), f(fleetResult.hungOut, "%.2f"))
}

// probeCores scales a rate of liveness PINGs per node per apiserver per
// second to the apiserver cores of 5,000 nodes, with the shared
// readiness's own cost.
func probeCores(pingRate float64) float64 {
	return pingRate*fleetScale*pingCostMs/1000 + sharedCostCores
}
