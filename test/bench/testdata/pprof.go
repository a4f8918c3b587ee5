// This file is added to cmd/extractedprism only in the binary that
// `make bench-profile` builds (go build -overlay): it serves Go's
// /debug/pprof on the address the harness reads profiles from. The release
// binary never has it.

package main

import (
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" //nolint:gosec // profiling build for the benchmark only
	"os"
	"runtime"
)

// pprofAddr matches epPprofAddr in test/bench.
const pprofAddr = "127.0.20.100:17449"

func init() {
	// One heap sample per 64 KiB allocated instead of 512 KiB, so that the
	// bytes per idle connection are well sampled.
	runtime.MemProfileRate = 64 << 10
	ln, err := net.Listen("tcp", pprofAddr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "pprof listener on %s: %v\n", pprofAddr, err)
		return
	}
	go func() { _ = http.Serve(ln, nil) }() //nolint:gosec // loopback, benchmark only
}
