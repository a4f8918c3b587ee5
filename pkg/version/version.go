// Package version holds the build identity, set at link time with -ldflags -X.
package version

import "runtime"

// Version and Commit are overwritten by the linker (see Makefile LDFLAGS).
var (
	Version = "dev"
	Commit  = "unknown"
)

// GoVersion is the Go toolchain that built the binary.
func GoVersion() string { return runtime.Version() }
