package cluster

import (
	"net"
	"strings"
)

// The test addresses. Every one of them is put on the test namespace's lo
// (Netns.Addrs), so nothing sent to them leaves the namespace:
// 198.51.100.0/24 is a documentation prefix, fd00::/8 unique local.
var (
	// APIServerIPv4 are the apiservers' IPv4 addresses.
	APIServerIPv4 = []string{"198.51.100.11", "198.51.100.12", "198.51.100.13", "198.51.100.14"}
	// APIServerIPv6 are the apiservers' IPv6 addresses.
	APIServerIPv6 = []string{"fd00::11", "fd00::12", "fd00::13", "fd00::14"}
	// HostIPv4 and HostIPv6 are the addresses of dual-stack hosts (AddHost),
	// one of each family a host.
	HostIPv4 = []string{"198.51.100.21", "198.51.100.22", "198.51.100.23"}
	HostIPv6 = []string{"fd00::21", "fd00::22", "fd00::23"}
)

// GatewayIPv4 and GatewayIPv6 are the test namespace's addresses as the
// hosts see it: GatewayIPv4 is on the namespace's lo (etcd listens there
// for the hosts' apiservers, Options.Hosts), GatewayIPv6 (link-local) on
// the namespace's end of every host's link.
const (
	GatewayIPv4 = "192.0.2.1"
	GatewayIPv6 = "fe80::1"
)

// The service ranges of the control plane (--service-cluster-ip-range),
// one a family, and the first address of each: the kubernetes Service's
// ClusterIP, which the serving certificate names.
const (
	ServiceCIDRv4 = "10.0.0.0/24"
	ServiceCIDRv6 = "fd00:10::/112"
	ServiceIPv4   = "10.0.0.1"
	ServiceIPv6   = "fd00:10::1"
)

// IsIPv6 reports whether ip is an IPv6 address.
func IsIPv6(ip string) bool {
	p := net.ParseIP(ip)
	return p != nil && p.To4() == nil
}

// HostPrefix is ip with the prefix length of a single host (/32 or /128).
func HostPrefix(ip string) string {
	if IsIPv6(ip) {
		return ip + "/128"
	}
	return ip + "/32"
}

// ServiceCIDR is the service range of ip's family.
func ServiceCIDR(ip string) string {
	if IsIPv6(ip) {
		return ServiceCIDRv6
	}
	return ServiceCIDRv4
}

// hostLabel turns ip into a string fit for a host or file name.
func hostLabel(ip string) string {
	return strings.NewReplacer(".", "-", ":", "-").Replace(ip)
}
