package config

import (
	"context"
	"log/slog"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spf13/pflag"
)

// DefaultDebounce is the quiet period after the last file event before
// the config file is reloaded.
const DefaultDebounce = 200 * time.Millisecond

// WatchOptions configures a Watcher. Path, Flags and Environ are passed
// to Load on every reload, exactly as at start.
type WatchOptions struct {
	// Path is the config file ("" = no file: only Trigger reloads).
	Path string
	// Flags are the parsed command-line flags (may be nil).
	Flags *pflag.FlagSet
	// Environ is the process environment (os.Environ()).
	Environ []string
	// Initial is the configuration in effect when Run starts.
	Initial Config
	// Logger receives reload results (nil = discard). A failed reload is
	// logged at error level only when OnError is nil (else at debug level:
	// OnError's owner reports it).
	Logger *slog.Logger
	// Debounce is the quiet period after file events (0 = DefaultDebounce).
	Debounce time.Duration
	// Trigger reloads at once on every value received (the daemon feeds
	// SIGHUP into it). May be nil.
	Trigger <-chan struct{}
	// OnChange receives a new valid configuration that differs from the
	// last good one.
	OnChange func(Config)
	// OnError receives a failed reload; the last good configuration stays.
	OnError func(error)
	// OnLoad, if set, is called after every successful reload, changed or
	// not (after OnChange when changed). Use it to clear a failure state
	// such as a "last reload successful" metric.
	OnLoad func(c Config, changed bool)
}

// Watcher reloads the configuration when its file changes or when
// Trigger fires, and reports new configurations and failures.
//
// It watches the file's parent directory, so that editors that write a
// new file and rename it over the old one, and Kubernetes ConfigMap
// volumes (a "..data" symlink swapped to a new timestamped directory),
// are seen. Each reload is Load, validate, then a comparison with the
// last good configuration (reflect.DeepEqual): unchanged means nothing
// is reported, changed means OnChange, failure means OnError and the last
// good configuration stays.
type Watcher struct {
	o    WatchOptions
	log  *slog.Logger
	last Config
}

// NewWatcher returns a Watcher; nothing happens until Run.
func NewWatcher(o WatchOptions) *Watcher {
	if o.Debounce <= 0 {
		o.Debounce = DefaultDebounce
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Watcher{o: o, log: log, last: o.Initial}
}

// Run watches until ctx is done, then stops everything it started and
// returns nil. If the file cannot be watched (no inotify instance left,
// directory missing) it logs a warning and keeps serving Trigger.
// Callbacks run on Run's goroutine, one at a time.
func (w *Watcher) Run(ctx context.Context) error {
	var (
		events <-chan fsnotify.Event
		errs   <-chan error
		files  *fileWatch
	)
	if w.o.Path != "" {
		abs, err := filepath.Abs(w.o.Path)
		if err != nil {
			abs = w.o.Path
		}
		fw, err := fsnotify.NewWatcher()
		switch {
		case err != nil:
			w.log.Warn("config file changes are not watched; reload with SIGHUP", "file", w.o.Path, "error", err)
		default:
			defer func() { _ = fw.Close() }()
			files = &fileWatch{fw: fw, log: w.log, path: abs, dir: filepath.Dir(abs), base: filepath.Base(abs)}
			if err := fw.Add(files.dir); err != nil {
				w.log.Warn("config file changes are not watched; reload with SIGHUP", "dir", files.dir, "error", err)
				files = nil
			} else {
				events, errs = fw.Events, fw.Errors
				files.follow()
			}
		}
	}

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var due <-chan time.Time
	trigger := w.o.Trigger

	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			if files.relevant(ev) {
				w.log.Debug("config file event", "event", ev.String())
				timer.Reset(w.o.Debounce)
				due = timer.C
			}
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			w.log.Warn("config file watch error", "error", err)
		case <-due:
			due = nil
			w.reload("file change")
			files.follow()
		case _, ok := <-trigger:
			if !ok {
				trigger = nil
				continue
			}
			w.reload("reload request")
			files.follow()
		}
	}
}

// fileWatch decides which directory events concern the config file. It
// watches the file's own directory and, when the file is a symlink to a
// file elsewhere, that file's directory too.
type fileWatch struct {
	fw        *fsnotify.Watcher
	log       *slog.Logger
	path      string // absolute config path
	dir, base string // its directory and name
	target    string // resolved symlink target outside dir ("" = none)
}

// relevant reports whether an event may have changed the config file: an
// event on the file itself, on ConfigMap internals in its directory
// ("..data", "..2026_01_02_..."), or on the symlink's target.
func (f *fileWatch) relevant(ev fsnotify.Event) bool {
	if f == nil || ev.Op == fsnotify.Chmod {
		return false
	}
	if filepath.Dir(ev.Name) == f.dir {
		name := filepath.Base(ev.Name)
		return name == f.base || strings.HasPrefix(name, "..")
	}
	return f.target != "" && ev.Name == f.target
}

// follow resolves the config path's symlinks and watches the target's
// directory when it lies outside the config file's own directory
// (ConfigMap targets lie inside it and need no extra watch).
func (f *fileWatch) follow() {
	if f == nil {
		return
	}
	target := ""
	if t, err := filepath.EvalSymlinks(f.path); err == nil {
		realDir, err := filepath.EvalSymlinks(f.dir)
		if err != nil {
			realDir = f.dir
		}
		td := filepath.Dir(t)
		inside := td == f.dir || td == realDir ||
			strings.HasPrefix(td, f.dir+string(filepath.Separator)) ||
			strings.HasPrefix(td, realDir+string(filepath.Separator))
		if !inside {
			target = t
		}
	} else if f.target != "" {
		return // dangling for now: keep watching where it pointed
	}
	if target == f.target {
		return
	}
	if f.target != "" {
		_ = f.fw.Remove(filepath.Dir(f.target))
	}
	f.target = target
	if target != "" {
		if err := f.fw.Add(filepath.Dir(target)); err != nil {
			f.log.Warn("changes of the config file's symlink target are not watched; reload with SIGHUP",
				"target", target, "error", err)
		}
	}
}

// reload loads, validates and compares, then reports.
func (w *Watcher) reload(reason string) {
	c, err := Load(w.o.Path, w.o.Flags, w.o.Environ)
	if err != nil {
		// With OnError set the caller reports the failure; avoid a second error line.
		level := slog.LevelError
		if w.o.OnError != nil {
			level = slog.LevelDebug
		}
		w.log.Log(context.Background(), level, "config reload failed; keeping the last good config",
			"reason", reason, "file", w.o.Path, "error", err)
		if w.o.OnError != nil {
			w.o.OnError(err)
		}
		return
	}
	changed := !reflect.DeepEqual(c, w.last)
	if changed {
		w.last = c
		w.log.Info("config reloaded", "reason", reason, "file", w.o.Path, "summary", c.Summary())
		if w.o.OnChange != nil {
			w.o.OnChange(c)
		}
	} else {
		w.log.Debug("config unchanged", "reason", reason, "file", w.o.Path)
	}
	if w.o.OnLoad != nil {
		w.o.OnLoad(c, changed)
	}
}
