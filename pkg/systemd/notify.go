// Package systemd talks to the service manager: sd_notify readiness, reload
// and stop notifications, status lines, the watchdog, and listeners handed
// over by socket activation. Everything is a no-op outside systemd (no
// NOTIFY_SOCKET, no LISTEN_FDS), so the daemon calls it unconditionally.
package systemd

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Notifier sends sd_notify messages to the service manager. The zero value is
// not usable; build one with NewNotifier. A Notifier is safe for concurrent use.
type Notifier struct {
	logger *slog.Logger
}

// NewNotifier returns a Notifier that logs through logger. All its methods
// are no-ops that return nil when NOTIFY_SOCKET is unset.
func NewNotifier(logger *slog.Logger) *Notifier {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Notifier{logger: logger}
}

// Ready tells the service manager that startup (or a reload) has finished.
func (n *Notifier) Ready() error {
	return n.send(daemon.SdNotifyReady)
}

// Reloading tells the service manager that the configuration is being
// reloaded. It carries MONOTONIC_USEC, so the message is also accepted by
// units of Type=notify-reload. Follow it with Ready when the reload is done.
func (n *Notifier) Reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("systemd: read CLOCK_MONOTONIC: %w", err)
	}
	usec := ts.Nano() / int64(time.Microsecond)
	return n.send(fmt.Sprintf("%s\nMONOTONIC_USEC=%d", daemon.SdNotifyReloading, usec))
}

// Stopping tells the service manager that the daemon is shutting down.
func (n *Notifier) Stopping() error {
	return n.send(daemon.SdNotifyStopping)
}

// Status sets the free-form status line shown by `systemctl status`. Line
// breaks in line are replaced by spaces, as the protocol is line based.
func (n *Notifier) Status(line string) error {
	line = strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(line)
	return n.send("STATUS=" + line)
}

// RunWatchdog keeps the service manager's watchdog fed: every half of
// WatchdogSec it calls healthy and sends WATCHDOG=1 only if healthy returned
// true, so a daemon whose accept loop or prober is stuck is killed and
// restarted by systemd. It returns nil at once when the watchdog is not
// enabled for this process (no NOTIFY_SOCKET, no WATCHDOG_USEC, or
// WATCHDOG_PID names another process), nil when ctx is done, and an error when WATCHDOG_USEC is invalid.
func (n *Notifier) RunWatchdog(ctx context.Context, healthy func() bool) error {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return nil
	}
	timeout, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return fmt.Errorf("systemd: WATCHDOG_USEC %q: %w", os.Getenv("WATCHDOG_USEC"), err)
	}
	if timeout <= 0 {
		return nil
	}
	period := pingPeriod(timeout)
	n.logger.Debug("systemd watchdog enabled", "timeout", timeout, "period", period)

	ticker := time.NewTicker(period)
	defer ticker.Stop()
	wasHealthy := true
	for {
		ok := healthy()
		switch {
		case ok:
			if !wasHealthy {
				n.logger.Info("daemon healthy again, resuming systemd watchdog pings")
			}
			if err := n.send(daemon.SdNotifyWatchdog); err != nil {
				n.logger.Warn("systemd watchdog ping failed", "error", err)
			}
		case wasHealthy:
			n.logger.Error("daemon unhealthy, withholding systemd watchdog pings", "watchdog_timeout", timeout)
		}
		wasHealthy = ok
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
	}
}

// pingPeriod is how often the watchdog is fed for a given WatchdogSec: half
// of it, as sd_watchdog_enabled(3) recommends.
func pingPeriod(timeout time.Duration) time.Duration {
	return max(timeout/2, time.Millisecond)
}

// send delivers one sd_notify message, or does nothing without NOTIFY_SOCKET.
func (n *Notifier) send(state string) error {
	sent, err := daemon.SdNotify(false, state)
	if err != nil {
		return fmt.Errorf("systemd: notify %q to NOTIFY_SOCKET %q: %w",
			firstLine(state), os.Getenv("NOTIFY_SOCKET"), err)
	}
	if sent {
		n.logger.Debug("systemd notified", "state", firstLine(state))
	}
	return nil
}

// firstLine returns s up to its first line break.
func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
