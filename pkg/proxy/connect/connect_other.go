//go:build !linux

package connect

import (
	"errors"
	"net/netip"
)

// Supported reports whether Start can be used here.
const Supported = false

// Start is not built here: the proxy dials with Go's dialer.
func Start(netip.AddrPort, func(int)) (int, error) { return -1, errors.ErrUnsupported }
