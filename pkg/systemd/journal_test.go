package systemd

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestJournalAttr(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug, ReplaceAttr: JournalAttr}))
	log.Debug("d")
	log.Info("i", "k", "v")
	log.Warn("w")
	log.Error("e", slog.Group("g", "level", "x"))
	log.Log(t.Context(), slog.LevelError+4, "beyond")
	want := []string{
		"<7>level=DEBUG msg=d",
		"<6>level=INFO msg=i k=v",
		"<4>level=WARN msg=w",
		"<3>level=ERROR msg=e g.level=x",
		"<3>level=ERROR+4 msg=beyond",
	}
	if got := strings.Split(strings.TrimSpace(buf.String()), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("journal lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestIsJournal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "stream"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	for env, want := range map[string]bool{
		fmt.Sprintf("%d:%d", st.Dev, st.Ino):   true,
		fmt.Sprintf("%d:%d", st.Dev, st.Ino+1): false,
		"":                                     false,
		"garbage":                              false,
	} {
		if got := isJournal(env, f); got != want {
			t.Errorf("isJournal(%q) = %v, want %v", env, got, want)
		}
	}
}
