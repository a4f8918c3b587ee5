// Package systemd_test checks the daemon binary against the service
// manager's protocols. Without build tags it runs the real binary with a
// notify socket and an inherited listener made by the test (sd_notify,
// watchdog, socket activation). With the systemdtest tag (make systemd-test)
// it installs the .deb into a Debian system booted with a real systemd.
package systemd_test

import (
	"errors"
	"flag"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	flag.Parse()
	goleak.VerifyTestMain(m)
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

var errTimeout = errors.New("timed out")

// waitFor polls cond every 100ms until it returns true or d passes.
func waitFor(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%w after %v", errTimeout, d)
		}
		time.Sleep(100 * time.Millisecond) // polling interval, not synchronisation
	}
	return nil
}
