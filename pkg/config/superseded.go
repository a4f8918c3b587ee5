package config

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// supersededSpec is a flag of the seed system that extractedprism accepts
// so that a seed user's command line, static pod or values file keeps
// working, but that has no effect: what it tuned is done another way.
type supersededSpec struct {
	Name    string
	Default time.Duration // the seed system's default, shown in --help
	// Instead says what does the flag's job in extractedprism.
	Instead string
}

// supersededSpecs are the seed system v0.3.0 liveness flags. The seed runs
// a heartbeat every --liveness-interval and fails /healthz when the last
// one is older than --liveness-threshold. extractedprism needs neither.
var supersededSpecs = []supersededSpec{
	{
		Name:    "liveness-interval",
		Default: 5 * time.Second,
		Instead: "there is no heartbeat to pace: /healthz reports the accept loop's state when it is asked",
	},
	{
		Name:    "liveness-threshold",
		Default: 15 * time.Second,
		Instead: "/healthz fails as soon as the accept loop has stopped, without a threshold; " +
			"under systemd the watchdog (WatchdogSec=) restarts a daemon whose accept loop or prober stops making progress",
	},
}

// registerSuperseded adds the superseded flags to fs.
func registerSuperseded(fs *pflag.FlagSet) {
	for _, s := range supersededSpecs {
		fs.Duration(s.Name, s.Default, "accepted for compatibility with the seed system; no effect [env "+EnvName(s.Name)+"]")
	}
}

// Superseded is a seed-system flag or variable that was set but has no
// effect in extractedprism.
type Superseded struct {
	// Source is "--liveness-threshold" or "EP_LIVENESS_THRESHOLD".
	Source string
	// Value is the value given.
	Value time.Duration
	// Instead says what does its job in extractedprism.
	Instead string
}

// SupersededSettings returns the superseded seed flags set on fs and the
// superseded EP_ variables set in environ (a flag wins over its
// variable), so that the caller can say once that they have no effect.
// Load has already refused values that are not positive durations.
func SupersededSettings(fs *pflag.FlagSet, environ []string) []Superseded {
	var out []Superseded
	for _, s := range supersededSpecs {
		if fs != nil {
			if f := fs.Lookup(s.Name); f != nil && f.Changed {
				d, _ := fs.GetDuration(s.Name)
				out = append(out, Superseded{Source: "--" + s.Name, Value: d, Instead: s.Instead})
				continue
			}
		}
		if raw, ok := lookupEnv(environ, EnvName(s.Name)); ok && raw != "" {
			d, _ := time.ParseDuration(raw)
			out = append(out, Superseded{Source: EnvName(s.Name), Value: d, Instead: s.Instead})
		}
	}
	return out
}

// checkSuperseded refuses superseded flags and variables whose value is
// not a positive duration, as the seed system would have.
func checkSuperseded(l *errorList, fs *pflag.FlagSet, environ []string) {
	for _, s := range supersededSpecs {
		if fs != nil {
			if f := fs.Lookup(s.Name); f != nil && f.Changed {
				if d, _ := fs.GetDuration(s.Name); d <= 0 {
					fe := newFieldError(s.Name, d, "%s: must be above 0", d)
					fe.Source = "--" + s.Name
					l.push(fe)
				}
				continue
			}
		}
		raw, ok := lookupEnv(environ, EnvName(s.Name))
		if !ok || raw == "" {
			continue
		}
		d, err := time.ParseDuration(raw)
		switch {
		case err != nil:
			fe := newFieldError(s.Name, raw, "%q: not a duration (like 15s)", raw)
			fe.Source = EnvName(s.Name)
			l.push(fe)
		case d <= 0:
			fe := newFieldError(s.Name, raw, "%q: must be above 0", raw)
			fe.Source = EnvName(s.Name)
			l.push(fe)
		}
	}
}

// lookupEnv returns the value of name in environ (last one wins, as in
// the environment provider).
func lookupEnv(environ []string, name string) (string, bool) {
	val, found := "", false
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, name+"="); ok {
			val, found = v, true
		}
	}
	return val, found
}

// String renders the notice for a log line or a test.
func (s Superseded) String() string {
	return fmt.Sprintf("%s=%s has no effect: %s", s.Source, s.Value, s.Instead)
}
