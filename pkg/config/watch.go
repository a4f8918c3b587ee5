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
	// Logger receives reload results (nil = discard).
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
		base   string
	)
	if w.o.Path != "" {
		abs, err := filepath.Abs(w.o.Path)
		if err != nil {
			abs = w.o.Path
		}
		dir := filepath.Dir(abs)
		base = filepath.Base(abs)
		fw, err := fsnotify.NewWatcher()
		switch {
		case err != nil:
			w.log.Warn("config file changes are not watched; reload with SIGHUP", "file", w.o.Path, "error", err)
		default:
			defer func() { _ = fw.Close() }()
			if err := fw.Add(dir); err != nil {
				w.log.Warn("config file changes are not watched; reload with SIGHUP", "dir", dir, "error", err)
			} else {
				events, errs = fw.Events, fw.Errors
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
			if relevant(ev, base) {
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
		case _, ok := <-trigger:
			if !ok {
				trigger = nil
				continue
			}
			w.reload("reload request")
		}
	}
}

// relevant reports whether a directory event may have changed the config
// file: an event on the file itself, or on ConfigMap internals ("..data",
// "..2026_01_02_...").
func relevant(ev fsnotify.Event, base string) bool {
	if ev.Op == fsnotify.Chmod {
		return false
	}
	name := filepath.Base(ev.Name)
	return name == base || strings.HasPrefix(name, "..")
}

// reload loads, validates and compares, then reports.
func (w *Watcher) reload(reason string) {
	c, err := Load(w.o.Path, w.o.Flags, w.o.Environ)
	if err != nil {
		w.log.Error("config reload failed; keeping the last good config", "reason", reason, "file", w.o.Path, "error", err)
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
