package config

import (
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Bounds of the numeric keys.
const (
	MinReplayBufferBytes = 1 << 10 // 1 KiB
	MaxReplayBufferBytes = 1 << 20 // 1 MiB
	// MaxMaxConnections bounds proxy.max_connections: each connection
	// takes two descriptors, and Linux allows at most 1048576 per process
	// by default (fs.nr_open).
	MaxMaxConnections = 1 << 20
	MaxJitter         = 0.5
	MaxTolerance      = 1.0
	// MaxDiscoveredEndpoints bounds discovery.max_endpoints: every
	// endpoint is probed, so the cap bounds the probe load too.
	MaxDiscoveredEndpoints = 1024
)

// Validate checks every rule and returns all problems as an errors.Join
// of *FieldError (nil if the configuration is valid). The rules are
// documented in docs/configuration.md; in short: ports are 1-65535 and
// the admin server must not take the listener's address; endpoints are
// host:port, unique, not the listener itself, and at least one is needed
// unless discovery may start from its state file; durations that pace or
// bound work (probe.interval, probe.timeout, proxy.dial_timeout,
// proxy.rebalance.period, discovery.static_restore_after) are > 0, the
// others are >= 0 with 0 meaning "off"; probe.timeout <= probe.interval.
func (c Config) Validate() error {
	var l errorList

	// listen / admin
	checkHost(&l, "listen.address", c.Listen.Address, false)
	checkPort(&l, "listen.port", c.Listen.Port)
	checkHost(&l, "admin.address", c.Admin.Address, true)
	checkPort(&l, "admin.port", c.Admin.Port)
	if c.Admin.Port == c.Listen.Port && hostsOverlap(c.AdminHost(), c.Listen.Address) {
		l.addRelated([]string{"listen.port", "listen.address", "admin.address"}, "admin.port", c.Admin.Port,
			"admin address %s clashes with listen address %s; use another admin.port or admin.address",
			c.AdminAddr(), c.ListenAddr())
	}

	// endpoints
	seen := map[string]int{}
	for i, ep := range c.Endpoints {
		path := fmt.Sprintf("endpoints[%d]", i)
		norm, host, port, msg := parseEndpoint(ep)
		if msg != "" {
			l.add(path, ep, "%q: %s", ep, msg)
			continue
		}
		if first, dup := seen[norm]; dup {
			l.add(path, ep, "%q: duplicate of endpoints[%d]", ep, first)
			continue
		}
		seen[norm] = i
		if port == c.Listen.Port && isSelf(host, c.Listen.Address) {
			l.addRelated([]string{"listen.port", "listen.address"}, path, ep,
				"%q: is extractedprism's own listen address %s; traffic would loop", ep, c.ListenAddr())
		}
	}
	if len(c.Endpoints) == 0 && (!c.Discovery.Enabled || c.Discovery.StateFile == "") {
		fe := newFieldError("endpoints", nil, "at least one endpoint is required "+
			"(set endpoints, --endpoints or EP_ENDPOINTS), unless discovery.enabled is true "+
			"with a non-empty discovery.state_file to start from")
		fe.related = []string{"discovery.enabled", "discovery.state_file"}
		fe.notConfigured = true
		l.push(fe)
	}

	// probe
	checkEnum(&l, "probe.mode", c.Probe.Mode, ProbeModeHTTPS, ProbeModeTCP)
	switch {
	case !strings.HasPrefix(c.Probe.Path, "/"):
		l.add("probe.path", c.Probe.Path, "%q: must start with \"/\"", c.Probe.Path)
	case strings.IndexFunc(c.Probe.Path, unicode.IsSpace) >= 0:
		l.add("probe.path", c.Probe.Path, "%q: must not contain blanks", c.Probe.Path)
	}
	checkPositive(&l, "probe.interval", c.Probe.Interval)
	checkPositive(&l, "probe.timeout", c.Probe.Timeout)
	if c.Probe.Timeout > c.Probe.Interval && c.Probe.Interval > 0 {
		l.addRelated([]string{"probe.interval"}, "probe.timeout", c.Probe.Timeout,
			"%s exceeds probe.interval %s; a probe must end before the next one is due",
			c.Probe.Timeout, c.Probe.Interval)
	}
	checkAtLeastOne(&l, "probe.rise", c.Probe.Rise)
	checkAtLeastOne(&l, "probe.fall", c.Probe.Fall)
	if !(c.Probe.Jitter >= 0 && c.Probe.Jitter <= MaxJitter) {
		l.add("probe.jitter", c.Probe.Jitter, "%v: must be between 0 and %v", c.Probe.Jitter, MaxJitter)
	}
	if c.Probe.CAFile != "" && c.Probe.CAFile != ProbeCANone {
		checkCAFile(&l, "probe.ca_file", c.Probe.CAFile)
	}
	checkCredentials(&l, c.Probe)
	checkHost(&l, "probe.server_name", c.Probe.ServerName, true)

	// balance
	checkEnum(&l, "balance.strategy", c.Balance.Strategy, StrategyLeastConnections, StrategyRoundRobin)

	// proxy
	checkPositive(&l, "proxy.dial_timeout", c.Proxy.DialTimeout)
	checkNotNegative(&l, "proxy.keepalive", c.Proxy.Keepalive)
	checkNotNegative(&l, "proxy.tcp_user_timeout", c.Proxy.TCPUserTimeout)
	checkNotNegative(&l, "proxy.drain_timeout", c.Proxy.DrainTimeout)
	checkNotNegative(&l, "proxy.first_byte_timeout", c.Proxy.FirstByteTimeout)
	checkNotNegative(&l, "proxy.close_spread", c.Proxy.CloseSpread)
	if n := c.Proxy.ReplayBufferBytes; n < MinReplayBufferBytes || n > MaxReplayBufferBytes {
		l.add("proxy.replay_buffer_bytes", n, "%d: must be between %d (1 KiB) and %d (1 MiB)",
			n, MinReplayBufferBytes, MaxReplayBufferBytes)
	}
	if n := c.Proxy.MaxConnections; n < 0 || n > MaxMaxConnections {
		l.add("proxy.max_connections", n, "%d: must be between 0 (derived from the memory limit) and %d", n, MaxMaxConnections)
	}
	rb := c.Proxy.Rebalance
	if !(rb.Tolerance > 0 && rb.Tolerance <= MaxTolerance) {
		l.add("proxy.rebalance.tolerance", rb.Tolerance, "%v: must be above 0 and at most %v", rb.Tolerance, MaxTolerance)
	}
	checkNotNegative(&l, "proxy.rebalance.min_age", rb.MinAge)
	checkPositive(&l, "proxy.rebalance.period", rb.Period)
	if !(rb.MaxFractionPerMinute > 0 && rb.MaxFractionPerMinute <= 1) {
		l.add("proxy.rebalance.max_fraction_per_minute", rb.MaxFractionPerMinute,
			"%v: must be above 0 and at most 1", rb.MaxFractionPerMinute)
	}

	// discovery
	checkDNSLabel(&l, "discovery.namespace", c.Discovery.Namespace)
	checkDNSLabel(&l, "discovery.service", c.Discovery.Service)
	checkHost(&l, "discovery.server_name", c.Discovery.ServerName, true)
	checkEnum(&l, "discovery.static", c.Discovery.Static, StaticAlways, StaticBootstrapOnly)
	checkPositive(&l, "discovery.static_restore_after", c.Discovery.StaticRestoreAfter)
	checkNotNegative(&l, "discovery.debounce", c.Discovery.Debounce)
	if n := c.Discovery.MaxEndpoints; n < 1 || n > MaxDiscoveredEndpoints {
		l.add("discovery.max_endpoints", n, "%d: must be between 1 and %d", n, MaxDiscoveredEndpoints)
	}

	// log
	checkEnum(&l, "log.level", c.Log.Level, LogLevels...)
	checkEnum(&l, "log.format", c.Log.Format, LogFormatText, LogFormatJSON)

	return l.err()
}

func checkPort(l *errorList, path string, p int) {
	if p < 1 || p > 65535 {
		l.add(path, p, "%d: must be between 1 and 65535", p)
	}
}

func checkPositive(l *errorList, path string, d time.Duration) {
	if d <= 0 {
		l.add(path, d, "%s: must be greater than 0", d)
	}
}

func checkNotNegative(l *errorList, path string, d time.Duration) {
	if d < 0 {
		l.add(path, d, "%s: must not be negative (0 turns it off)", d)
	}
}

func checkAtLeastOne(l *errorList, path string, n int) {
	if n < 1 {
		l.add(path, n, "%d: must be at least 1", n)
	}
}

func checkEnum(l *errorList, path, v string, allowed ...string) {
	for _, a := range allowed {
		if v == a {
			return
		}
	}
	l.add(path, v, "%q: must be one of %s", v, strings.Join(allowed, ", "))
}

// checkHost accepts an IP address or a DNS name ("" only if allowEmpty).
func checkHost(l *errorList, path, h string, allowEmpty bool) {
	if h == "" {
		if !allowEmpty {
			l.add(path, h, "must not be empty (use 0.0.0.0 or :: for all addresses)")
		}
		return
	}
	if !validHost(h) {
		l.add(path, h, "%q: not an IP address or host name", h)
	}
}

// checkDNSLabel accepts a Kubernetes object name (RFC 1123 label).
func checkDNSLabel(l *errorList, path, s string) {
	ok := s != "" && len(s) <= 63 && s[0] != '-' && s[len(s)-1] != '-'
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '-' {
			ok = false
		}
	}
	if !ok {
		l.add(path, s, "%q: must be a lowercase DNS label (a-z, 0-9, '-', at most 63)", s)
	}
}

func checkCAFile(l *errorList, path, file string) {
	data, err := readSmallFile(file)
	if err != nil {
		l.add(path, file, "%q: cannot read: %v", file, err)
		return
	}
	if !x509.NewCertPool().AppendCertsFromPEM(data) {
		l.add(path, file, "%q: holds no PEM certificate", file)
	}
}

// validHost reports whether h is an IP address (IPv6 without brackets,
// zone allowed) or a DNS name.
func validHost(h string) bool {
	if _, err := netip.ParseAddr(h); err == nil {
		return true
	}
	name := strings.TrimSuffix(h, ".")
	if name == "" || len(name) > 253 {
		return false
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if (r < 'a' || r > 'z') && (r < 'A' || r > 'Z') && (r < '0' || r > '9') && r != '-' && r != '_' {
				return false
			}
		}
	}
	return true
}

// parseEndpoint checks one "host:port" endpoint. It returns the
// normalised form (for duplicate detection), the host and port, or a
// message saying what is wrong.
func parseEndpoint(ep string) (norm, host string, port int, msg string) {
	switch {
	case ep == "":
		return "", "", 0, "empty endpoint"
	case strings.IndexFunc(ep, unicode.IsSpace) >= 0:
		return "", "", 0, "must not contain blanks"
	case strings.Contains(ep, "://"):
		return "", "", 0, "must be host:port without a scheme"
	}
	h, p, err := net.SplitHostPort(ep)
	if err != nil {
		switch {
		case !strings.Contains(ep, ":"):
			return "", "", 0, "missing port"
		case strings.HasPrefix(ep, "[") && strings.HasSuffix(ep, "]"):
			return "", "", 0, "missing port"
		case !strings.Contains(ep, "["):
			if i := strings.LastIndexByte(ep, ':'); i > 0 {
				if a, err := netip.ParseAddr(ep[:i]); err == nil && a.Is6() {
					return "", "", 0, fmt.Sprintf("IPv6 address must be in brackets: \"[%s]:%s\"", ep[:i], ep[i+1:])
				}
			}
			if a, err := netip.ParseAddr(ep); err == nil && a.Is6() {
				return "", "", 0, fmt.Sprintf("IPv6 address needs brackets and a port, e.g. \"[%s]:6443\"", ep)
			}
		}
		return "", "", 0, "must be host:port (IPv6 as [fd00::1]:6443)"
	}
	if h == "" {
		return "", "", 0, "missing host"
	}
	if p == "" {
		return "", "", 0, "missing port"
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 1 || n > 65535 {
		return "", "", 0, fmt.Sprintf("invalid port %q (must be 1-65535)", p)
	}
	if strings.HasPrefix(ep, "[") {
		if a, err := netip.ParseAddr(h); err != nil || !a.Is6() {
			return "", "", 0, "brackets are for IPv6 addresses only"
		}
	}
	if !validHost(h) {
		return "", "", 0, fmt.Sprintf("%q is not an IP address or host name", h)
	}
	key := strings.ToLower(h)
	if a, err := netip.ParseAddr(h); err == nil {
		key = a.Unmap().String()
	}
	return net.JoinHostPort(key, strconv.Itoa(n)), h, n, ""
}

// hostsOverlap reports whether two bind hosts can collide on one port:
// equal, or one of them binds every address.
func hostsOverlap(a, b string) bool {
	if isWildcard(a) || isWildcard(b) {
		return true
	}
	return sameHost(a, b)
}

// isSelf reports whether an endpoint host reaches a listener bound to
// listenHost.
func isSelf(host, listenHost string) bool {
	if sameHost(host, listenHost) {
		return true
	}
	if isWildcard(listenHost) {
		if a, err := netip.ParseAddr(host); err == nil && a.IsLoopback() {
			return true
		}
		return strings.EqualFold(host, "localhost")
	}
	return false
}

func isWildcard(h string) bool {
	if h == "" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsUnspecified()
}

func sameHost(a, b string) bool {
	pa, errA := netip.ParseAddr(a)
	pb, errB := netip.ParseAddr(b)
	if errA == nil && errB == nil {
		return pa.Unmap() == pb.Unmap()
	}
	return strings.EqualFold(a, b)
}

// maxCAFileBytes bounds what is read of probe.ca_file.
const maxCAFileBytes = 16 << 20

// readSmallFile reads a regular file of at most maxCAFileBytes (a device
// or FIFO named by mistake must not hang or exhaust the daemon).
func readSmallFile(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("not a regular file (%s)", st.Mode().Type())
	}
	data, err := io.ReadAll(io.LimitReader(f, maxCAFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxCAFileBytes {
		return nil, fmt.Errorf("larger than %d MiB", maxCAFileBytes>>20)
	}
	return data, nil
}

// checkCredentials checks the probe's credential settings. The files are
// not read here: a credential that is missing or being rotated must not
// keep the node's API path from starting, so the prober reads them at
// every use, probes without them while they are unusable, and says so.
func checkCredentials(l *errorList, p Probe) {
	switch {
	case p.ClientCertFile == "" && p.ClientKeyFile == "":
	case p.ClientCertFile == "":
		l.add("probe.client_cert_file", p.ClientCertFile, "empty while probe.client_key_file is %q: give both", p.ClientKeyFile)
	case p.ClientKeyFile == "":
		l.add("probe.client_key_file", p.ClientKeyFile, "empty while probe.client_cert_file is %q: give both", p.ClientCertFile)
	}
	sr := p.SharedReadiness
	if sr.Namespace != "" {
		checkDNSLabel(l, "probe.shared_readiness.namespace", sr.Namespace)
		checkDNSLabel(l, "probe.shared_readiness.name", sr.Name)
		checkPositive(l, "probe.shared_readiness.stale_after", sr.StaleAfter)
	}
}
