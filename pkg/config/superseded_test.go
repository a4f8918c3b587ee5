package config

import (
	"strings"
	"testing"
	"time"
)

// The seed system's liveness flags and variables are accepted, reported
// as superseded, and change nothing else.
func TestSeedLivenessFlagsAccepted(t *testing.T) {
	base := []string{"--endpoints=10.0.0.1:6443"}
	fs := parsedFlags(t, append(base, "--liveness-interval=5s", "--liveness-threshold", "15s")...)
	c, err := Load("", fs, nil)
	if err != nil {
		t.Fatalf("seed liveness flags refused: %v", err)
	}
	want, err := Load("", parsedFlags(t, base...), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Summary() != want.Summary() || c.Probe != want.Probe {
		t.Errorf("the liveness flags changed the configuration: %s / %+v", c.Summary(), c.Probe)
	}
	got := SupersededSettings(fs, nil)
	if len(got) != 2 || got[0].Source != "--liveness-interval" || got[0].Value != 5*time.Second ||
		got[1].Source != "--liveness-threshold" || got[1].Value != 15*time.Second {
		t.Fatalf("SupersededSettings = %v, want both flags with their values", got)
	}
	if !strings.Contains(got[1].String(), "watchdog") || !strings.Contains(got[1].String(), "/healthz") {
		t.Errorf("the threshold notice does not say what replaces it: %s", got[1])
	}

	env := []string{"EP_ENDPOINTS=10.0.0.1:6443", "EP_LIVENESS_INTERVAL=2s", "EP_LIVENESS_THRESHOLD=30s"}
	if _, err := Load("", parsedFlags(t), env); err != nil {
		t.Fatalf("seed liveness variables refused: %v", err)
	}
	got = SupersededSettings(parsedFlags(t, "--liveness-threshold=20s"), env)
	if len(got) != 2 || got[0].Source != "EP_LIVENESS_INTERVAL" || got[0].Value != 2*time.Second ||
		got[1].Source != "--liveness-threshold" || got[1].Value != 20*time.Second {
		t.Errorf("SupersededSettings = %v, want EP_LIVENESS_INTERVAL=2s and the flag over its variable", got)
	}
	if got := SupersededSettings(parsedFlags(t, base...), nil); len(got) != 0 {
		t.Errorf("SupersededSettings without the flags = %v, want none", got)
	}
}

func TestSeedLivenessBadValues(t *testing.T) {
	for _, tt := range []struct {
		args []string
		env  []string
		want string
	}{
		{nil, []string{"EP_LIVENESS_THRESHOLD=soon"}, `liveness-threshold: "soon": not a duration (like 15s) (from EP_LIVENESS_THRESHOLD)`},
		{nil, []string{"EP_LIVENESS_INTERVAL=-1s"}, `liveness-interval: "-1s": must be above 0 (from EP_LIVENESS_INTERVAL)`},
		{[]string{"--liveness-interval=0s"}, nil, `liveness-interval: 0s: must be above 0 (from --liveness-interval)`},
	} {
		_, err := Load("", parsedFlags(t, append([]string{"--endpoints=10.0.0.1:6443"}, tt.args...)...), tt.env)
		if err == nil || err.Error() != tt.want {
			t.Errorf("args %v env %v: error %v, want %q", tt.args, tt.env, err, tt.want)
		}
	}
}

// The seed system's levels above error are accepted and read as error.
func TestSeedLogLevels(t *testing.T) {
	for _, lvl := range []string{"dpanic", "panic", "fatal"} {
		c, err := Load("", parsedFlags(t, "--endpoints=10.0.0.1:6443", "--log-level="+lvl), nil)
		if err != nil {
			t.Errorf("--log-level=%s refused: %v", lvl, err)
			continue
		}
		if c.Log.Level != "error" {
			t.Errorf("--log-level=%s read as %q, want error", lvl, c.Log.Level)
		}
	}
	_, err := Load("", parsedFlags(t, "--endpoints=10.0.0.1:6443", "--log-level=trace"), nil)
	if err == nil || !strings.Contains(err.Error(), `log.level: "trace": must be one of debug, info, warn, error, dpanic, panic, fatal`) {
		t.Errorf("--log-level=trace: %v, want the accepted levels named", err)
	}
}

func TestNotConfigured(t *testing.T) {
	_, err := Load("", parsedFlags(t), nil)
	if !NotConfigured(err) {
		t.Errorf("no endpoints: NotConfigured(%v) = false, want true", err)
	}
	_, err = Load("", parsedFlags(t, "--endpoints=10.0.0.1"), nil)
	if err == nil || NotConfigured(err) {
		t.Errorf("a bad endpoint: NotConfigured(%v) = true, want false (it is configured, wrongly)", err)
	}
	_, err = Load("", parsedFlags(t, "--bind-port=0"), nil)
	if !NotConfigured(err) {
		t.Errorf("no endpoints and a bad port: NotConfigured(%v) = false, want true", err)
	}
}
