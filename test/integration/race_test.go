//go:build linux && race

package integration

// raceEnabled builds the child binaries with -race too, so a data race in
// the daemon shows up in the scenarios that exercise it.
const raceEnabled = true
