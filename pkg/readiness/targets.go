package readiness

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/extractedprism/extractedprism/pkg/discovery"
)

// The apiservers publish themselves in this EndpointSlice, and only its
// addresses (and the static ones) are probed.
const (
	sliceNamespace = "default"
	sliceName      = "kubernetes"
)

// canonical returns addr as netip prints it ("10.0.0.1:6443",
// "[fd00::1]:6443"), the form the EndpointSlice's addresses take on the
// nodes, or an error for anything but an IP:port.
func canonical(addr string) (string, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return "", fmt.Errorf("endpoint %q: want IP:port: %w", addr, err)
	}
	if ap.Port() == 0 {
		return "", fmt.Errorf("endpoint %q: port 0", addr)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()).String(), nil
}

// sliceAddrs reads the kubernetes EndpointSlice (from the apiserver's
// watch cache) and returns its serving addresses.
func sliceAddrs(ctx context.Context, client kubernetes.Interface) ([]string, error) {
	s, err := client.DiscoveryV1().EndpointSlices(sliceNamespace).Get(ctx, sliceName, metav1.GetOptions{ResourceVersion: "0"})
	if err != nil {
		return nil, fmt.Errorf("get EndpointSlice %s/%s: %w", sliceNamespace, sliceName, err)
	}
	addrs, err := discovery.SliceEndpoints(s)
	if err != nil && len(addrs) == 0 {
		return nil, fmt.Errorf("EndpointSlice %s/%s: %w", sliceNamespace, sliceName, err)
	}
	return addrs, nil
}

// mergeTargets is the sorted union of static and discovered addresses,
// capped at MaxAPIServers.
func mergeTargets(static, discovered []string) []string {
	out := slices.Concat(static, discovered)
	slices.Sort(out)
	out = slices.Compact(out)
	if len(out) > MaxAPIServers {
		out = out[:MaxAPIServers]
	}
	return out
}
