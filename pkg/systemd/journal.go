package systemd

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// StderrIsJournal reports whether stderr is connected to the systemd
// journal: JOURNAL_STREAM names the device and inode of stderr, as systemd
// sets it for services whose output goes to the journal (systemd.exec(5)).
func StderrIsJournal() bool {
	return isJournal(os.Getenv("JOURNAL_STREAM"), os.Stderr)
}

func isJournal(env string, f *os.File) bool {
	dev, ino, ok := strings.Cut(env, ":")
	if !ok {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return dev == strconv.FormatUint(st.Dev, 10) && ino == strconv.FormatUint(st.Ino, 10)
}

// JournalAttr is a slog.HandlerOptions.ReplaceAttr for a slog.TextHandler
// writing to the journal. It drops the time (the journal stamps every line)
// and turns the level into a syslog priority prefix at the start of the line
// ("<4>level=WARN msg=..."), which journald strips and records as the line's
// priority, so `journalctl -p warning` and `systemctl status` see warnings
// and errors as such. The level must be the first attribute written, as it
// is for slog.TextHandler once the time is dropped.
func JournalAttr(groups []string, a slog.Attr) slog.Attr {
	if len(groups) > 0 {
		return a
	}
	switch a.Key {
	case slog.TimeKey:
		return slog.Attr{}
	case slog.LevelKey:
		lvl, ok := a.Value.Any().(slog.Level)
		if !ok {
			return a
		}
		return slog.String(fmt.Sprintf("<%d>%s", syslogPriority(lvl), slog.LevelKey), lvl.String())
	}
	return a
}

// syslogPriority maps a slog level to a syslog priority: error 3, warning 4,
// info 6, debug 7.
func syslogPriority(l slog.Level) int {
	switch {
	case l >= slog.LevelError:
		return 3
	case l >= slog.LevelWarn:
		return 4
	case l >= slog.LevelInfo:
		return 6
	}
	return 7
}
