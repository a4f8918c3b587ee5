package discovery

import (
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestScreenDropsAddressesNoAPIServerHas(t *testing.T) {
	nodeIPs := func() []netip.Addr { return []netip.Addr{netip.MustParseAddr("192.0.2.7")} }
	tests := []struct {
		listen string
		addr   string
		want   DropReason
	}{
		{"127.0.0.1:7445", "10.0.0.1:6443", ""},
		{"127.0.0.1:7445", "[fd00::1]:6443", ""},
		{"127.0.0.1:7445", "127.0.0.1:6443", DropLoopback},
		{"127.0.0.1:7445", "127.9.9.9:6443", DropLoopback},
		{"127.0.0.1:7445", "[::1]:6443", DropLoopback},
		{"127.0.0.1:7445", "127.0.0.1:7445", DropSelf},
		{"127.0.0.1:7445", "0.0.0.0:6443", DropUnspecified},
		{"127.0.0.1:7445", "[::]:6443", DropUnspecified},
		{"127.0.0.1:7445", "169.254.169.254:80", DropLinkLocal},
		{"127.0.0.1:7445", "[fe80::1]:6443", DropLinkLocal},
		{"127.0.0.1:7445", "224.0.0.1:6443", DropMulticast},
		{"127.0.0.1:7445", "[ff02::1]:6443", DropMulticast},
		{"127.0.0.1:7445", "255.255.255.255:6443", DropMulticast},
		{"127.0.0.1:7445", "cp1.example:6443", DropHostname},
		// A listener on every address: the node's own addresses on its
		// port are itself, other ports and other hosts are not.
		{"0.0.0.0:7445", "192.0.2.7:7445", DropSelf},
		{"0.0.0.0:7445", "192.0.2.7:6443", ""},
		{"0.0.0.0:7445", "192.0.2.8:7445", ""},
		{"10.0.0.5:7445", "10.0.0.5:7445", DropSelf},
		{"10.0.0.5:7445", "10.0.0.5:6443", ""},
	}
	for _, tt := range tests {
		sc := newScreener(32, newSelf(tt.listen, nodeIPs), nil, time.Now, nil)
		if got := sc.reasonOf(tt.addr); got != tt.want {
			t.Errorf("listen %s: %s dropped as %q, want %q", tt.listen, tt.addr, got, tt.want)
		}
	}
}

// manyAddresses returns n distinct addresses in 10.200.0.0/16.
func manyAddresses(n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = fmt.Sprintf("10.200.%d.%d", i/250, i%250+1)
	}
	return out
}

func TestHostileSliceChangesNothingButALogAndACounter(t *testing.T) {
	state := filepath.Join(t.TempDir(), "endpoints.json")
	good := slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443,
		ready("10.0.0.2"), ready("127.0.0.1"), ready("169.254.1.1"), ready("0.0.0.0"), ready("224.0.0.5"))
	c := fake.NewClientset(good)
	m, r, logs := newManager(t, Options{
		Static:       []string{"10.0.0.1:6443"},
		Enabled:      true,
		StateFile:    state,
		LocalAddress: "127.0.0.1:7445",
		MaxEndpoints: 4,
	}, c)
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:6443/discovered")
	waitFor(t, "the state file", func() bool {
		eps, err := loadStateFile(state)
		return err == nil && slices.Equal(eps, []string{"10.0.0.2:6443"})
	})
	for _, reason := range []DropReason{DropLoopback, DropLinkLocal, DropUnspecified, DropMulticast} {
		if n := r.dropped(reason); n != 1 {
			t.Errorf("dropped %s = %d, want 1", reason, n)
		}
	}
	if out := logs.String(); !strings.Contains(out, "ignoring addresses no API server can have") ||
		!strings.Contains(out, "127.0.0.1:6443") || !strings.Contains(out, "reason=loopback") {
		t.Errorf("log does not say what was dropped:\n%s", out)
	}

	// The slice's own port is the balancer's listen port: looped traffic.
	self := slice("kubernetes", discoveryv1.AddressTypeIPv4, 7445, ready("127.0.0.1"), ready("10.0.0.2"))
	if _, err := c.DiscoveryV1().EndpointSlices("default").Update(t.Context(), self, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the self address to be dropped", func() bool { return r.dropped(DropSelf) == 1 })
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:7445/discovered")

	// 3,000 addresses: the four lowest addresses are used, the
	// rest counted once and named in one line.
	huge := slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443, ready(manyAddresses(3000)...))
	if _, err := c.DiscoveryV1().EndpointSlices("default").Update(t.Context(), huge, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitLast(t, r, "10.0.0.1:6443/static 10.200.0.1:6443/discovered 10.200.0.2:6443/discovered 10.200.0.3:6443/discovered 10.200.0.4:6443/discovered")
	waitFor(t, "the over-cap count", func() bool { return r.dropped(DropOverCap) == 2996 })
	if out := logs.String(); !strings.Contains(out, "too many API server endpoints; keeping those in use, then the lowest addresses") ||
		!strings.Contains(out, "max_endpoints=4") || !strings.Contains(out, "offered=3000") {
		t.Errorf("log does not say the list was capped:\n%s", out)
	}
	if lines := strings.Count(logs.String(), "too many API server endpoints"); lines != 1 {
		t.Errorf("%d log lines about the cap, want 1", lines)
	}
	waitFor(t, "the capped state file", func() bool {
		eps, err := loadStateFile(state)
		return err == nil && len(eps) == 4
	})
}

func TestHostileStateFileIsScreened(t *testing.T) {
	state := filepath.Join(t.TempDir(), "endpoints.json")
	written := []string{"127.0.0.1:6443", "127.0.0.1:7445", "[fe80::1]:6443", "localhost:6443", "10.0.0.9:6443"}
	if err := saveStateFile(state, written, time.Now()); err != nil {
		t.Fatal(err)
	}
	m, r, logs := newManager(t, Options{
		Static: []string{"10.0.0.1:6443"}, Enabled: true, StateFile: state, LocalAddress: "127.0.0.1:7445",
	}, fake.NewClientset())
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.9:6443/state-file")
	for reason, n := range map[DropReason]int{DropLoopback: 1, DropSelf: 1, DropLinkLocal: 1, DropHostname: 1} {
		if got := r.dropped(reason); got != n {
			t.Errorf("dropped %s = %d, want %d", reason, got, n)
		}
	}
	if !strings.Contains(logs.String(), "origin=\"state file\"") {
		t.Errorf("log does not name the state file:\n%s", logs.String())
	}
}

func TestStaticSelfIsRefused(t *testing.T) {
	m, err := New(Options{Static: []string{"127.0.0.1:7445", "127.0.0.1:6443"}, LocalAddress: "127.0.0.1:7445",
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	// A loopback stand-in is an operator's choice; the listener itself never.
	if got := m.staticList(); !slices.Equal(got, []string{"127.0.0.1:6443"}) {
		t.Fatalf("static list %v, want the loopback stand-in alone", got)
	}
	m.SetStatic([]string{"127.0.0.1:7445", "10.0.0.1:6443"})
	if got := m.staticList(); !slices.Equal(got, []string{"10.0.0.1:6443"}) {
		t.Fatalf("static list after SetStatic %v", got)
	}
}

// TestCapKeepsTheEndpointsInUse: a flood of new addresses, even lower
// ones, cannot displace the apiservers in use.
func TestCapKeepsTheEndpointsInUse(t *testing.T) {
	sc := newScreener(2, newSelf("127.0.0.1:7445", nil), nil, time.Now, nil)
	if got := sc.screen([]string{"192.0.2.11:6443", "192.0.2.12:6443"}, "EndpointSlice"); len(got) != 2 {
		t.Fatalf("kept %v", got)
	}
	flood := []string{"192.0.2.11:6443", "192.0.2.12:6443"}
	for _, a := range manyAddresses(3000) {
		flood = append(flood, a+":6443")
	}
	if got := sc.screen(flood, "EndpointSlice"); !slices.Equal(got, []string{"192.0.2.11:6443", "192.0.2.12:6443"}) {
		t.Fatalf("after a flood of lower addresses kept %v, want the two in use", got)
	}
	// One of them leaves: its place goes to the lowest newcomer.
	if got := sc.screen(flood[1:], "EndpointSlice"); !slices.Equal(got, []string{"10.200.0.1:6443", "192.0.2.12:6443"}) {
		t.Fatalf("after one left kept %v", got)
	}
}
