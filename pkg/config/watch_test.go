package config

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder collects what a Watcher reports.
type recorder struct {
	mu      sync.Mutex
	changes []Config
	errs    []error
	loads   int
}

func (r *recorder) snapshot() (changes []Config, errs []error, loads int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Config(nil), r.changes...), append([]error(nil), r.errs...), r.loads
}

// syncBuffer is a log sink safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor polls cond until it holds or a generous deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // poll interval, not synchronisation
	}
}

// configYAML is a valid config whose listen port identifies the version.
func configYAML(port int) string {
	return fmt.Sprintf("endpoints: [\"10.0.0.1:6443\"]\nlisten:\n  port: %d\n", port)
}

type watchRig struct {
	t       *testing.T
	rec     *recorder
	trigger chan struct{}
	logs    *syncBuffer
	stop    func()
}

// startWatcher loads path as the initial config and runs a Watcher on it
// until the test ends. It returns once the watcher is serving (a Trigger
// round-trip has completed), so file events after that are seen.
func startWatcher(t *testing.T, path string) *watchRig {
	t.Helper()
	initial, err := Load(path, nil, nil)
	if err != nil {
		t.Fatalf("initial Load: %v", err)
	}
	rig := &watchRig{t: t, rec: &recorder{}, trigger: make(chan struct{}), logs: &syncBuffer{}}
	w := NewWatcher(WatchOptions{
		Path:    path,
		Initial: initial,
		Logger:  slog.New(slog.NewTextHandler(rig.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Trigger: rig.trigger,
		OnChange: func(c Config) {
			rig.rec.mu.Lock()
			defer rig.rec.mu.Unlock()
			rig.rec.changes = append(rig.rec.changes, c)
		},
		OnError: func(err error) {
			rig.rec.mu.Lock()
			defer rig.rec.mu.Unlock()
			rig.rec.errs = append(rig.rec.errs, err)
		},
		OnLoad: func(Config, bool) {
			rig.rec.mu.Lock()
			defer rig.rec.mu.Unlock()
			rig.rec.loads++
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	rig.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v, want nil", err)
				}
			case <-time.After(20 * time.Second):
				t.Errorf("Run did not return after cancel")
			}
		})
	}
	t.Cleanup(rig.stop)
	// The trigger is served by the same loop that reads file events, after
	// the directory watch is in place.
	rig.reloadNow()
	return rig
}

// reloadNow sends a trigger and waits until the watcher has handled it.
func (r *watchRig) reloadNow() {
	r.t.Helper()
	_, errs0, loads0 := r.rec.snapshot()
	select {
	case r.trigger <- struct{}{}:
	case <-time.After(20 * time.Second):
		r.t.Fatal("watcher does not take triggers")
	}
	waitFor(r.t, "the triggered reload", func() bool {
		_, errs, loads := r.rec.snapshot()
		return loads > loads0 || len(errs) > len(errs0)
	})
}

// waitPort waits for an OnChange whose listen port is port.
func (r *watchRig) waitPort(port int) {
	r.t.Helper()
	waitFor(r.t, fmt.Sprintf("OnChange with listen.port %d", port), func() bool {
		changes, _, _ := r.rec.snapshot()
		return len(changes) > 0 && changes[len(changes)-1].Listen.Port == port
	})
}

// hasError reports whether an OnError contained text.
func (r *watchRig) hasError(text string) bool {
	_, errs, _ := r.rec.snapshot()
	for _, err := range errs {
		if strings.Contains(err.Error(), text) {
			return true
		}
	}
	return false
}

func (r *watchRig) assertNoErrors() {
	r.t.Helper()
	if _, errs, _ := r.rec.snapshot(); len(errs) > 0 {
		r.t.Fatalf("unexpected OnError: %v\nlogs:\n%s", errs, r.logs)
	}
}

func TestWatchInPlaceWrite(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "config.yaml", configYAML(8001))
	rig := startWatcher(t, path)
	if err := os.WriteFile(path, []byte(configYAML(8002)), 0o600); err != nil {
		t.Fatal(err)
	}
	rig.waitPort(8002)
	rig.assertNoErrors()
}

func TestWatchRenameAndReplace(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "config.yaml", configYAML(8001))
	rig := startWatcher(t, path)
	for _, port := range []int{8002, 8003} { // twice: the watch survives the replaced inode
		tmp := writeFile(t, dir, ".config.yaml.swp", configYAML(port))
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		rig.waitPort(port)
	}
	rig.assertNoErrors()
}

// configMapDir lays out a Kubernetes ConfigMap volume: a timestamped data
// directory, "..data" pointing at it, and config.yaml -> ..data/config.yaml.
type configMapDir struct {
	t    *testing.T
	dir  string
	cur  string
	seqn int
}

func newConfigMapDir(t *testing.T, content string) *configMapDir {
	m := &configMapDir{t: t, dir: t.TempDir()}
	m.cur = m.writeData(content)
	if err := os.Symlink(m.cur, filepath.Join(m.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("..data", "config.yaml"), filepath.Join(m.dir, "config.yaml")); err != nil {
		t.Fatal(err)
	}
	return m
}

func (m *configMapDir) writeData(content string) string {
	m.seqn++
	name := fmt.Sprintf("..2026_01_02_03_04_05.%09d", m.seqn)
	if err := os.Mkdir(filepath.Join(m.dir, name), 0o755); err != nil {
		m.t.Fatal(err)
	}
	writeFile(m.t, filepath.Join(m.dir, name), "config.yaml", content)
	return name
}

// swap does what the kubelet's atomic writer does on a ConfigMap update.
func (m *configMapDir) swap(content string) {
	next := m.writeData(content)
	tmp := filepath.Join(m.dir, "..data_tmp")
	if err := os.Symlink(next, tmp); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "..data")); err != nil {
		m.t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(m.dir, m.cur)); err != nil {
		m.t.Fatal(err)
	}
	m.cur = next
}

func TestWatchConfigMapSymlinkSwap(t *testing.T) {
	m := newConfigMapDir(t, configYAML(8001))
	rig := startWatcher(t, filepath.Join(m.dir, "config.yaml"))
	m.swap(configYAML(8002))
	rig.waitPort(8002)
	m.swap(configYAML(8003))
	rig.waitPort(8003)
	rig.assertNoErrors()
}

func TestWatchTrigger(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "config.yaml", configYAML(8001))
	initial, err := Load(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The file changes while nobody watches; only the trigger can see it.
	if err := os.WriteFile(path, []byte(configYAML(8002)), 0o600); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	trigger := make(chan struct{})
	w := NewWatcher(WatchOptions{
		Path: path, Initial: initial, Trigger: trigger,
		OnChange: func(c Config) { rec.mu.Lock(); rec.changes = append(rec.changes, c); rec.mu.Unlock() },
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	trigger <- struct{}{}
	waitFor(t, "OnChange after the trigger", func() bool {
		changes, _, _ := rec.snapshot()
		return len(changes) == 1 && changes[0].Listen.Port == 8002
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
}

func TestWatchBadFileKeepsLastGood(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "config.yaml", configYAML(8001))
	rig := startWatcher(t, path)

	if err := os.WriteFile(path, []byte(configYAML(8002)+"probe:\n  interval: soon\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	want := path + `:5:13: probe.interval: invalid duration "soon"`
	waitFor(t, "OnError: "+want, func() bool { return rig.hasError(want) })
	if changes, _, _ := rig.rec.snapshot(); len(changes) != 0 {
		t.Fatalf("OnChange called with a bad file: %+v", changes)
	}
	if !strings.Contains(rig.logs.String(), "config reload failed; keeping the last good config") {
		t.Errorf("failure not logged:\n%s", rig.logs)
	}

	// Back to the original content: a successful load, but nothing changed.
	_, _, loads0 := rig.rec.snapshot()
	if err := os.WriteFile(path, []byte(configYAML(8001)), 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the successful reload", func() bool { _, _, loads := rig.rec.snapshot(); return loads > loads0 })
	if changes, _, _ := rig.rec.snapshot(); len(changes) != 0 {
		t.Fatalf("OnChange after restoring the last good content: %+v", changes)
	}

	// A real change after the failure is applied.
	if err := os.WriteFile(path, []byte(configYAML(8003)), 0o600); err != nil {
		t.Fatal(err)
	}
	rig.waitPort(8003)

	// A removed file is an error too, and keeps the last good config.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "OnError for the removed file", func() bool { return rig.hasError("no such file or directory") })
	if changes, _, _ := rig.rec.snapshot(); len(changes) != 1 {
		t.Fatalf("changes = %d, want 1", len(changes))
	}
}

func TestWatchUnchangedFileIsNoChange(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "config.yaml", configYAML(8001))
	rig := startWatcher(t, path)
	_, _, loads0 := rig.rec.snapshot()
	// Same values, different text: still no change.
	if err := os.WriteFile(path, []byte("# comment\n"+configYAML(8001)), 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reload", func() bool { _, _, loads := rig.rec.snapshot(); return loads > loads0 })
	rig.reloadNow()
	if changes, _, _ := rig.rec.snapshot(); len(changes) != 0 {
		t.Fatalf("OnChange for an unchanged config: %+v", changes)
	}
	rig.assertNoErrors()
	if !strings.Contains(rig.logs.String(), "config unchanged") {
		t.Errorf("no 'config unchanged' log:\n%s", rig.logs)
	}
}

func TestWatchMissingDirectoryStillServesTrigger(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent", "config.yaml")
	rec := &recorder{}
	trigger := make(chan struct{})
	logs := &syncBuffer{}
	w := NewWatcher(WatchOptions{
		Path: path, Initial: valid(), Trigger: trigger,
		Logger:  slog.New(slog.NewTextHandler(logs, nil)),
		OnError: func(err error) { rec.mu.Lock(); rec.errs = append(rec.errs, err); rec.mu.Unlock() },
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	trigger <- struct{}{}
	waitFor(t, "OnError", func() bool { _, errs, _ := rec.snapshot(); return len(errs) == 1 })
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if !strings.Contains(logs.String(), "config file changes are not watched; reload with SIGHUP") {
		t.Errorf("no warning logged:\n%s", logs)
	}
}

func TestWatchSymlinkToAnotherDirectory(t *testing.T) {
	real := t.TempDir()
	target := writeFile(t, real, "extractedprism.yaml", configYAML(8001))
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	rig := startWatcher(t, path)
	if err := os.WriteFile(target, []byte(configYAML(8002)), 0o600); err != nil {
		t.Fatal(err)
	}
	rig.waitPort(8002)

	// Re-point the symlink to a file in a third directory.
	other := writeFile(t, t.TempDir(), "other.yaml", configYAML(8003))
	tmp := filepath.Join(dir, ".config.yaml.tmp")
	if err := os.Symlink(other, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	rig.waitPort(8003)
	rig.reloadNow() // the loop has finished following the new target
	if err := os.WriteFile(other, []byte(configYAML(8004)), 0o600); err != nil {
		t.Fatal(err)
	}
	rig.waitPort(8004)
	rig.assertNoErrors()
}
