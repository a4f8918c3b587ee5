package config

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// writeFile writes content to dir/name and returns the path.
func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// parsedFlags returns a flag set with RegisterFlags, parsed from args.
func parsedFlags(t *testing.T, args ...string) *pflag.FlagSet {
	t.Helper()
	fs := pflag.NewFlagSet("extractedprism", pflag.ContinueOnError)
	fs.SetOutput(&bytes.Buffer{})
	RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse %v: %v", args, err)
	}
	return fs
}

func TestLoadPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "config.yaml", `
endpoints: ["10.0.0.1:6443"]
listen:
  port: 8001
admin:
  port: 9001
probe:
  interval: 10s
  timeout: 5s
log:
  level: debug
`)
	env := []string{"EP_BIND_PORT=8002", "EP_HEALTH_INTERVAL=20s", "EP_ENDPOINTS=10.0.0.2:6443, 10.0.0.3:6443", "PATH=/usr/bin"}
	flags := parsedFlags(t, "--bind-port=8003", "--endpoints", "10.0.0.4:6443")

	tests := []struct {
		name    string
		path    string
		env     []string
		fs      *pflag.FlagSet
		port    int
		admin   int
		eps     []string
		every   time.Duration
		level   string
		timeout time.Duration
	}{
		{"defaults only need an endpoint", "", []string{"EP_ENDPOINTS=10.0.0.9:6443"}, nil, 7445, 7446, []string{"10.0.0.9:6443"}, 2 * time.Second, "info", 2 * time.Second},
		{"file over defaults", file, nil, nil, 8001, 9001, []string{"10.0.0.1:6443"}, 10 * time.Second, "debug", 5 * time.Second},
		{"env over file", file, env, nil, 8002, 9001, []string{"10.0.0.2:6443", "10.0.0.3:6443"}, 20 * time.Second, "debug", 5 * time.Second},
		{"flags over env", file, env, flags, 8003, 9001, []string{"10.0.0.4:6443"}, 20 * time.Second, "debug", 5 * time.Second},
		{"unset flags do not override", file, nil, parsedFlags(t), 8001, 9001, []string{"10.0.0.1:6443"}, 10 * time.Second, "debug", 5 * time.Second},
		{"a flag set to its default still overrides", file, env, parsedFlags(t, "--bind-port=7445", "--log-level=info"), 7445, 9001, []string{"10.0.0.2:6443", "10.0.0.3:6443"}, 20 * time.Second, "info", 5 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(tt.path, tt.fs, tt.env)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if c.Listen.Port != tt.port || c.Admin.Port != tt.admin || c.Probe.Interval != tt.every ||
				c.Log.Level != tt.level || c.Probe.Timeout != tt.timeout || !reflect.DeepEqual(c.Endpoints, tt.eps) {
				t.Fatalf("got port %d admin %d interval %s timeout %s level %s endpoints %v",
					c.Listen.Port, c.Admin.Port, c.Probe.Interval, c.Probe.Timeout, c.Log.Level, c.Endpoints)
			}
		})
	}
}

func TestLoadEveryFlagAndEnv(t *testing.T) {
	args := []string{
		"--endpoints=a:1,b:2",
		"--bind-address=127.0.0.2",
		"--bind-port=1001",
		"--health-bind-address=127.0.0.3",
		"--health-port=1002",
		"--health-interval=3s",
		"--health-timeout=1s",
		"--probe-mode=tcp",
		"--enable-discovery",
		"--kubeconfig=/etc/kubernetes/kubelet.conf",
		"--state-file=/tmp/state.json",
		"--dial-timeout=500ms",
		"--drain-timeout=0s",
		"--max-connections=5000",
		"--log-level=warn",
		"--log-format=json",
	}
	want := Defaults()
	want.Endpoints = []string{"a:1", "b:2"}
	want.Listen.Address = "127.0.0.2"
	want.Listen.Port = 1001
	want.Admin.Address = "127.0.0.3"
	want.Admin.Port = 1002
	want.Probe.Interval = 3 * time.Second
	want.Probe.Timeout = time.Second
	want.Probe.Mode = "tcp"
	want.Discovery.Enabled = true
	want.Discovery.Kubeconfig = "/etc/kubernetes/kubelet.conf"
	want.Discovery.StateFile = "/tmp/state.json"
	want.Proxy.DialTimeout = 500 * time.Millisecond
	want.Proxy.DrainTimeout = 0
	want.Proxy.MaxConnections = 5000
	want.Log.Level = "warn"
	want.Log.Format = "json"

	t.Run("flags", func(t *testing.T) {
		c, err := Load("", parsedFlags(t, args...), nil)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(c, want) {
			t.Fatalf("got  %+v\nwant %+v", c, want)
		}
	})
	t.Run("env", func(t *testing.T) {
		var env []string
		for _, a := range args {
			name, val, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			if !ok {
				val = "true"
			}
			env = append(env, EnvName(name)+"="+val)
		}
		c, err := Load("", nil, env)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(c, want) {
			t.Fatalf("got  %+v\nwant %+v", c, want)
		}
	})
}

func TestLoadEnvIgnoresUnknownAndEmpty(t *testing.T) {
	c, err := Load("", nil, []string{"EP_ENDPOINTS=a:1", "EP_UNKNOWN=1", "EP_BIND_ADDRESS=", "XEP_BIND_PORT=1", "EP_bind_port=5"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen.Address != "127.0.0.1" || c.Listen.Port != 7445 {
		t.Fatalf("listen = %s", c.ListenAddr())
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		env  []string
		args []string
		want []string // every line expected, in order
	}{
		{
			name: "unknown key with suggestion and position",
			yaml: "endpoints: [a:1]\nproxy:\n  dial_timout: 1s\n",
			want: []string{"FILE:3:3: proxy.dial_timout: unknown key (did you mean proxy.dial_timeout?)"},
		},
		{
			name: "unknown key in wrong section",
			yaml: "endpoints: [a:1]\nproxy:\n  interval: 1s\n",
			want: []string{"FILE:3:3: proxy.interval: unknown key (did you mean probe.interval?)"},
		},
		{
			name: "unknown top-level key without suggestion",
			yaml: "endpoints: [a:1]\nfrobnicate: true\n",
			want: []string{"FILE:2:1: frobnicate: unknown key"},
		},
		{
			name: "seed flag name used as key",
			yaml: "endpoints: [a:1]\nlisten:\n  bind_port: 1\n",
			want: []string{"FILE:3:3: listen.bind_port: unknown key (did you mean listen.port?)"},
		},
		{
			name: "invalid duration",
			yaml: "endpoints: [a:1]\nprobe:\n  interval: 2 seconds\n",
			want: []string{`FILE:3:13: probe.interval: invalid duration "2 seconds" (use Go syntax, e.g. "500ms", "2s", "5m")`},
		},
		{
			name: "duration without unit",
			yaml: "endpoints: [a:1]\nprobe:\n  timeout: 2\n",
			want: []string{`FILE:3:12: probe.timeout: invalid duration "2" (a number needs a unit, e.g. "2s")`},
		},
		{
			name: "invalid integer",
			yaml: "endpoints: [a:1]\nlisten:\n  port: http\n",
			want: []string{`FILE:3:9: listen.port: invalid integer "http"`},
		},
		{
			name: "float for integer",
			yaml: "endpoints: [a:1]\nlisten:\n  port: 7445.5\n",
			want: []string{`FILE:3:9: listen.port: invalid integer "7445.5" (no fractions)`},
		},
		{
			name: "invalid bool",
			yaml: "endpoints: [a:1]\nproxy:\n  replay: maybe\n",
			want: []string{`FILE:3:11: proxy.replay: invalid boolean "maybe" (use true or false)`},
		},
		{
			name: "invalid float",
			yaml: "endpoints: [a:1]\nprobe:\n  jitter: .nan\n",
			want: []string{`FILE:3:11: probe.jitter: invalid number ".nan"`},
		},
		{
			name: "mapping for scalar",
			yaml: "endpoints: [a:1]\nlog:\n  level:\n    x: 1\n",
			want: []string{`FILE:4:5: log.level: expected a string, got a mapping`},
		},
		{
			name: "scalar for section",
			yaml: "endpoints: [a:1]\nprobe: fast\n",
			want: []string{`FILE:2:8: probe: expected a mapping of keys, got "fast"`},
		},
		{
			name: "null duration",
			yaml: "endpoints: [a:1]\nprobe:\n  interval:\n",
			want: []string{`FILE:3:12: probe.interval: missing value (expected a duration)`},
		},
		{
			name: "duplicate key",
			yaml: "endpoints: [a:1]\nlog:\n  level: info\n  level: debug\n",
			want: []string{`FILE:4:3: log.level: duplicate key (first set on line 3)`},
		},
		{
			name: "top level not a mapping",
			yaml: "- a\n- b\n",
			want: []string{`FILE:1:1: the top level must be a mapping of keys, got a list`},
		},
		{
			name: "endpoint list item of wrong type",
			yaml: "endpoints:\n  - a:1\n  - [b]\n",
			want: []string{`FILE:3:5: endpoints[1]: expected a string, got a list`},
		},
		{
			name: "validation errors carry file positions",
			yaml: "endpoints:\n  - 10.0.0.1:6443\n  - 10.0.0.1\nlisten:\n  port: 70000\n",
			want: []string{
				`FILE:5:9: listen.port: 70000: must be between 1 and 65535`,
				`FILE:3:5: endpoints[1]: "10.0.0.1": missing port`,
			},
		},
		{
			name: "all problems, type and validation, file and env",
			yaml: "endpoints: [a:1]\nproxy:\n  dial_timout: 1s\nprobe:\n  interval: 2 seconds\n  timeout: 5s\n  mode: udp\n",
			env:  []string{"EP_HEALTH_PORT=abc", "EP_LOG_FORMAT=xml"},
			want: []string{
				"FILE:3:3: proxy.dial_timout: unknown key (did you mean proxy.dial_timeout?)",
				`FILE:5:13: probe.interval: invalid duration "2 seconds"`,
				`admin.port: invalid integer "abc" (from EP_HEALTH_PORT)`,
				// probe.timeout > interval is not reported: interval was unreadable.
				`FILE:7:9: probe.mode: "udp": must be one of https, tcp`,
				`log.format: "xml": must be one of text, json (from EP_LOG_FORMAT)`,
			},
		},
		{
			name: "flag value names the flag",
			yaml: "endpoints: [a:1]\n",
			args: []string{"--bind-port=0", "--endpoints=10.0.0.1"},
			want: []string{
				`listen.port: 0: must be between 1 and 65535 (from --bind-port)`,
				`endpoints[0]: "10.0.0.1": missing port (from --endpoints)`,
			},
		},
		{
			name: "no endpoint anywhere",
			yaml: "log:\n  level: info\n",
			want: []string{`endpoints: at least one endpoint is required (set endpoints, --endpoints or EP_ENDPOINTS), unless discovery.enabled is true with a non-empty discovery.state_file to start from`},
		},
		{
			name: "second document",
			yaml: "endpoints: [a:1]\n---\nlog: {}\n",
			want: []string{`FILE:2:1: a second YAML document ("---"); the config file holds one document`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := writeFile(t, t.TempDir(), "config.yaml", tt.yaml)
			var fs *pflag.FlagSet
			if tt.args != nil {
				fs = parsedFlags(t, tt.args...)
			}
			_, err := Load(file, fs, tt.env)
			if err == nil {
				t.Fatal("Load succeeded")
			}
			got := strings.Split(err.Error(), "\n")
			if len(got) != len(tt.want) {
				t.Fatalf("got %d problems:\n%v\nwant %d", len(got), err, len(tt.want))
			}
			for i, w := range tt.want {
				w = strings.ReplaceAll(w, "FILE", file)
				if !strings.HasPrefix(got[i], w) {
					t.Errorf("problem %d:\n  got  %s\n  want %s", i, got[i], w)
				}
			}
			if n := len(FieldErrors(err)); n != len(tt.want) {
				t.Errorf("FieldErrors returned %d, want %d", n, len(tt.want))
			}
		})
	}
}

func TestLoadYAMLSyntaxErrorKeepsLine(t *testing.T) {
	file := writeFile(t, t.TempDir(), "config.yaml", "endpoints: [a:1]\nprobe:\n  mode: https\n bad: indent\n")
	_, err := Load(file, nil, nil)
	if err == nil || !strings.Contains(err.Error(), file+": yaml: line 3: did not find expected key") {
		t.Fatalf("err = %v, want the file name and yaml.v3's line", err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"), nil, nil)
	if err == nil || !os.IsNotExist(errorsUnwrapAll(err)) {
		t.Fatalf("err = %v, want not-exist", err)
	}
}

func errorsUnwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error }) //nolint:errorlint // test helper
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

func TestLoadEmptyFileIsDefaults(t *testing.T) {
	for _, content := range []string{"", "\n", "# only a comment\n", "---\n", "{}\n"} {
		file := writeFile(t, t.TempDir(), "config.yaml", content)
		c, err := Load(file, nil, []string{"EP_ENDPOINTS=10.0.0.1:6443"})
		if err != nil {
			t.Fatalf("%q: %v", content, err)
		}
		want := Defaults()
		want.Endpoints = []string{"10.0.0.1:6443"}
		if !reflect.DeepEqual(c, want) {
			t.Fatalf("%q: got %+v", content, c)
		}
	}
}

func TestLoadYAMLForms(t *testing.T) {
	file := writeFile(t, t.TempDir(), "config.yaml", `endpoints: "10.0.0.1:6443, [fd00::2]:6443,"
admin:
  address:
probe:
  timeout: &t 1500ms
  interval: *t
  ca_file: ~
discovery: {}
proxy:
  replay_buffer_bytes: 65_536
`)
	c, err := Load(file, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c.Endpoints, []string{"10.0.0.1:6443", "[fd00::2]:6443"}) {
		t.Errorf("endpoints = %q", c.Endpoints)
	}
	if c.Probe.Interval != 1500*time.Millisecond || c.Probe.Timeout != 1500*time.Millisecond {
		t.Errorf("probe interval %s timeout %s", c.Probe.Interval, c.Probe.Timeout)
	}
	if c.Proxy.ReplayBufferBytes != 65536 {
		t.Errorf("replay_buffer_bytes = %d", c.Proxy.ReplayBufferBytes)
	}
}

func TestLoadEnvOverridesFileAndForgetsItsPosition(t *testing.T) {
	file := writeFile(t, t.TempDir(), "config.yaml", "endpoints: [a:1]\nlisten:\n  port: 70000\n")
	_, err := Load(file, nil, []string{"EP_BIND_PORT=0"})
	want := "listen.port: 0: must be between 1 and 65535 (from EP_BIND_PORT)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v, want %s", err, want)
	}
}

func TestRegisterFlagsHelp(t *testing.T) {
	fs := pflag.NewFlagSet("extractedprism", pflag.ContinueOnError)
	RegisterFlags(fs)
	help := fs.FlagUsages()
	for _, want := range []string{
		"--config string", "[env EP_CONFIG]",
		"--endpoints strings", "[env EP_ENDPOINTS]",
		"--bind-address string", `(default "127.0.0.1")`,
		"--bind-port int", "(default 7445)",
		"--health-bind-address string", "(default: 127.0.0.1, whatever --bind-address is)",
		"--health-port int", "(default 7446)",
		"--health-interval duration", "(default 2s)",
		"--health-timeout duration",
		"--enable-discovery", "[env EP_ENABLE_DISCOVERY]",
		"--kubeconfig string",
		"--log-level string", `(default "info")`,
		"--log-format string", `(default "text")`,
		"--drain-timeout duration", "(default 30s)",
		"--dial-timeout duration", "(default 1s)",
		"--max-connections int", "[env EP_MAX_CONNECTIONS]",
		"--probe-mode string", `(default "https")`,
		"--state-file string", `(default "/var/lib/extractedprism/endpoints.json")`,
	} {
		if !strings.Contains(help, want) {
			t.Errorf("help lacks %q:\n%s", want, help)
		}
	}
}

func TestConfigPath(t *testing.T) {
	if got := ConfigPath(nil, nil); got != "" {
		t.Errorf("no flag, no env: %q", got)
	}
	if got := ConfigPath(parsedFlags(t), []string{"EP_CONFIG=/env.yaml"}); got != "/env.yaml" {
		t.Errorf("env: %q", got)
	}
	if got := ConfigPath(parsedFlags(t, "--config", "/flag.yaml"), []string{"EP_CONFIG=/env.yaml"}); got != "/flag.yaml" {
		t.Errorf("flag over env: %q", got)
	}
}

func TestKeysAndSuggest(t *testing.T) {
	keys := Keys()
	if len(keys) < 40 || keys[0] != "listen.address" {
		t.Fatalf("Keys() = %v", keys)
	}
	for in, want := range map[string]string{
		"proxy.dial_timout":         "proxy.dial_timeout",
		"probe.intervall":           "probe.interval",
		"discovery.statefile":       "discovery.state_file",
		"proxy.rebalance.enable":    "proxy.rebalance.enabled",
		"endpoint":                  "endpoints",
		"totally.unrelated.setting": "",
		"bindPort":                  "listen.port",
		"health_bind_address":       "admin.address",
		"listen.bind-port":          "listen.port",
		"enableDiscovery":           "discovery.enabled",
		"healthInterval":            "probe.interval",
	} {
		if got := suggest(in); got != want {
			t.Errorf("suggest(%q) = %q, want %q", in, got, want)
		}
	}
}
