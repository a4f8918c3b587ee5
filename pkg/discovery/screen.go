package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/extractedprism/extractedprism/pkg/ratelog"
)

// DropReason says why a discovered or state-file address was not used.
type DropReason string

// Reasons for dropping an address. No kube-apiserver can be reached at
// any of them from another node, and an apiserver refuses to advertise
// most of them, so an EndpointSlice or state file that holds one was
// written by something else: using it could loop traffic back into this
// process or send the node's API traffic to whatever listens there.
const (
	// DropLoopback is an address in 127.0.0.0/8 or ::1.
	DropLoopback DropReason = "loopback"
	// DropUnspecified is 0.0.0.0 or ::.
	DropUnspecified DropReason = "unspecified"
	// DropLinkLocal is an address in 169.254.0.0/16 or fe80::/10.
	DropLinkLocal DropReason = "link_local"
	// DropMulticast is a multicast or the limited broadcast address.
	DropMulticast DropReason = "multicast"
	// DropSelf is the balancer's own listen address.
	DropSelf DropReason = "self"
	// DropHostname is a state-file entry whose host is not an IP address
	// (the daemon only ever writes IP addresses).
	DropHostname DropReason = "hostname"
	// DropOverCap is an address beyond Options.MaxEndpoints.
	DropOverCap DropReason = "over_cap"
)

// DropReasons lists every DropReason, for metrics that export all of them.
var DropReasons = []DropReason{DropLoopback, DropUnspecified, DropLinkLocal, DropMulticast, DropSelf, DropHostname, DropOverCap}

// DefaultMaxEndpoints is the cap on discovered and state-file endpoints
// when Options.MaxEndpoints is 0.
const DefaultMaxEndpoints = 32

// dropLogWindow is the shortest time between two log lines about dropped
// addresses of one reason.
const dropLogWindow = time.Minute

// maxLoggedAddresses bounds the addresses named in one log line.
const maxLoggedAddresses = 8

// maxRemembered bounds the dropped addresses remembered (so that each is
// counted once); beyond it the memory starts afresh.
const maxRemembered = 4096

// self describes the balancer's own listen address, which no endpoint may
// be: traffic sent there would come straight back.
type self struct {
	host netip.Addr // invalid when the listen host is not an IP address
	name string     // the listen host as written
	port string
	// local returns the node's own addresses, for a listener bound to
	// every address (0.0.0.0 or ::).
	local func() []netip.Addr
}

func newSelf(listen string, local func() []netip.Addr) self {
	host, port, err := net.SplitHostPort(listen)
	if err != nil || port == "" {
		return self{}
	}
	s := self{name: host, port: port, local: local}
	if ip, err := netip.ParseAddr(host); err == nil {
		s.host = ip.Unmap().WithZone("")
	}
	return s
}

// is reports whether host:port is this balancer's listener.
func (s self) is(ip netip.Addr, host, port string) bool {
	if s.port == "" || port != s.port {
		return false
	}
	if !s.host.IsValid() {
		return host == s.name
	}
	if ip == s.host {
		return true
	}
	if s.host.IsUnspecified() && s.local != nil {
		return slices.Contains(s.local(), ip)
	}
	return false
}

// interfaceAddrs returns the addresses of the node's interfaces.
func interfaceAddrs() []netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap().WithZone(""))
		}
	}
	return out
}

// screener drops the addresses of discovered and state-file lists that no
// apiserver can have, caps their number, and reports what it dropped: a
// log line per reason (rate-limited) and a Dropped event per newly
// dropped address. It is safe for concurrent use.
type screener struct {
	max   int
	self  self
	log   *ratelog.Limiter
	event func(Event)

	mu sync.Mutex
	// seen holds the addresses dropped so far, by origin, so that an
	// address dropped again at every watch event counts once.
	seen map[string]DropReason
	// inUse holds, by origin, the addresses the last screen kept: under
	// the cap they go first, so a flood of new addresses cannot displace
	// the apiservers in use.
	inUse map[string]map[string]bool
}

func newScreener(maxEndpoints int, s self, logger *slog.Logger, now func() time.Time, event func(Event)) *screener {
	return &screener{max: maxEndpoints, self: s, log: ratelog.New(logger, dropLogWindow, now), event: event,
		seen: map[string]DropReason{}, inUse: map[string]map[string]bool{}}
}

// reasonOf returns why addr (normalized host:port) must be dropped, or ""
// when it may be used.
func (sc *screener) reasonOf(addr string) DropReason {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return DropHostname
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		if sc.self.is(netip.Addr{}, host, port) {
			return DropSelf
		}
		return DropHostname
	}
	ip = ip.Unmap().WithZone("")
	switch {
	case sc.self.is(ip, host, port):
		return DropSelf
	case ip.IsLoopback():
		return DropLoopback
	case ip.IsUnspecified():
		return DropUnspecified
	case ip.IsLinkLocalUnicast():
		return DropLinkLocal
	case ip.IsMulticast() || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return DropMulticast
	}
	return ""
}

// screen returns the usable addresses of in, sorted and de-duplicated,
// and reports the rest. At most max are kept: first those kept last time
// (the apiservers in use), then the lowest in numeric address order, so
// that nodes that start from the same list keep the same ones. origin
// names the list in logs ("EndpointSlice", "state file").
func (sc *screener) screen(in []string, origin string) []string {
	in = dedupSorted(in)
	sc.mu.Lock()
	inUse := sc.inUse[origin]
	sc.mu.Unlock()
	slices.SortStableFunc(in, func(a, b string) int {
		if ua, ub := inUse[a], inUse[b]; ua != ub {
			if ua {
				return -1
			}
			return 1
		}
		return compareAddrPort(a, b)
	})
	kept := make([]string, 0, min(len(in), sc.max))
	dropped := map[DropReason][]string{}
	for _, a := range in {
		if r := sc.reasonOf(a); r != "" {
			dropped[r] = append(dropped[r], a)
			continue
		}
		if len(kept) == sc.max {
			dropped[DropOverCap] = append(dropped[DropOverCap], a)
			continue
		}
		kept = append(kept, a)
	}
	sc.report(dropped, origin, len(in))
	slices.Sort(kept)
	if len(kept) > 0 {
		now := make(map[string]bool, len(kept))
		for _, a := range kept {
			now[a] = true
		}
		sc.mu.Lock()
		sc.inUse[origin] = now
		sc.mu.Unlock()
	}
	return kept
}

// compareAddrPort orders IP host:port addresses numerically (IPv4 before
// IPv6), and anything else after them as text.
func compareAddrPort(a, b string) int {
	pa, ea := netip.ParseAddrPort(a)
	pb, eb := netip.ParseAddrPort(b)
	switch {
	case ea == nil && eb == nil:
		return pa.Compare(pb)
	case ea == nil:
		return -1
	case eb == nil:
		return 1
	}
	return strings.Compare(a, b)
}

// report logs and counts the addresses newly dropped.
func (sc *screener) report(dropped map[DropReason][]string, origin string, total int) {
	sc.mu.Lock()
	if len(sc.seen) > maxRemembered {
		sc.seen = map[string]DropReason{}
	}
	fresh := map[DropReason][]string{}
	for r, addrs := range dropped {
		for _, a := range addrs {
			key := origin + " " + a
			if sc.seen[key] == r {
				continue
			}
			sc.seen[key] = r
			fresh[r] = append(fresh[r], a)
		}
	}
	sc.mu.Unlock()
	for _, r := range DropReasons {
		addrs := fresh[r]
		if len(addrs) == 0 {
			continue
		}
		if sc.event != nil {
			sc.event(Event{Kind: EventDropped, Reason: r, Count: len(addrs)})
		}
		shown := addrs[:min(len(addrs), maxLoggedAddresses)]
		args := []any{"origin", origin, "reason", string(r), "dropped", len(addrs), "addresses", shown}
		msg := "ignoring addresses no API server can have"
		if r == DropOverCap {
			msg = "too many API server endpoints; keeping those in use, then the lowest addresses"
			args = append(args, "max_endpoints", sc.max, "offered", total)
		}
		if len(addrs) > len(shown) {
			args = append(args, "more", fmt.Sprintf("%d not shown", len(addrs)-len(shown)))
		}
		sc.log.Log(context.Background(), slog.LevelWarn, "dropped "+origin+" "+string(r), msg, args...)
	}
}
