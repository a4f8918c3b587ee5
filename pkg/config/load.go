package config

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/knadh/koanf/providers/confmap"
	"github.com/knadh/koanf/providers/env/v2"
	"github.com/knadh/koanf/providers/posflag"
	"github.com/knadh/koanf/v2"
	"github.com/spf13/pflag"
)

// EnvPrefix starts every environment variable read by Load.
const EnvPrefix = "EP_"

// ConfigFlag is the name of the flag that names the config file.
const ConfigFlag = "config"

// flagSpec ties a command-line flag (and its EP_ variable) to a key.
type flagSpec struct {
	Name  string
	Key   string
	Usage string
}

// flagSpecs are the seed-compatible flags, in help order.
var flagSpecs = []flagSpec{
	{"endpoints", "endpoints", "API server endpoints, comma-separated host:port (IPv6 as [fd00::1]:6443)"},
	{"bind-address", "listen.address", "address of the local API server endpoint"},
	{"bind-port", "listen.port", "port of the local API server endpoint"},
	{"reuse-port", "listen.reuse_port", "set SO_REUSEPORT on both ports, so a surged instance can bind next to this one (any process of the same UID can then bind them too)"},
	{"health-bind-address", "admin.address", "address of the admin server (/healthz, /readyz, /status, /metrics) (default: 127.0.0.1, whatever --bind-address is)"},
	{"health-port", "admin.port", "port of the admin server"},
	{"health-interval", "probe.interval", "time between health probes of one upstream"},
	{"health-timeout", "probe.timeout", "deadline of one health probe"},
	{"probe-mode", "probe.mode", "health probe kind: https (GET probe.path, healthy on 200) or tcp (connect only)"},
	{"probe-ca-file", "probe.ca_file", "PEM CA bundle to verify the apiserver (\"\" = the service-account CA if present; \"none\" = do not verify)"},
	{"probe-bearer-token-file", "probe.bearer_token_file", "token file for readiness checks, re-read when it changes (sent only to a verified apiserver)"},
	{"probe-client-cert-file", "probe.client_cert_file", "PEM client certificate for probes, re-read when it changes"},
	{"probe-client-key-file", "probe.client_key_file", "PEM key of --probe-client-cert-file"},
	{"enable-discovery", "discovery.enabled", "discover API servers from the kubernetes service's EndpointSlices"},
	{"kubeconfig", "discovery.kubeconfig", "kubeconfig for discovery (default: in-cluster service account)"},
	{"state-file", "discovery.state_file", "last-known-good list of discovered endpoints (\"\" = none)"},
	{"dial-timeout", "proxy.dial_timeout", "deadline of one upstream connect before the next upstream is tried"},
	{"drain-timeout", "proxy.drain_timeout", "time established connections get to finish at shutdown"},
	{"max-connections", "proxy.max_connections", "most client connections proxied at once; one more is reset at once (0 = derived from the memory and descriptor limits)"},
	{"log-level", "log.level", "log level: debug, info, warn or error (dpanic, panic and fatal are read as error)"},
	{"log-format", "log.format", "log format: text or json"},
}

// EnvName returns the environment variable read for a flag name:
// "bind-port" -> "EP_BIND_PORT".
func EnvName(flag string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// flagForKey maps keys to flag names, flagByName flag names to specs.
var (
	flagForKey = map[string]string{}
	flagByName = map[string]flagSpec{}
	flagByEnv  = map[string]flagSpec{}
	// flagByLoose maps loose(flag name) to the flag name, for suggestions.
	flagByLoose = map[string]string{}
)

func init() {
	for _, s := range flagSpecs {
		if _, ok := schema.byPath[s.Key]; !ok {
			panic("config: flag " + s.Name + " maps to unknown key " + s.Key)
		}
		flagForKey[s.Key] = s.Name
		flagByName[s.Name] = s
		flagByEnv[EnvName(s.Name)] = s
		flagByLoose[loose(s.Name)] = s.Name
	}
}

// RegisterFlags adds --config and the seed-compatible flags to fs. Their
// defaults are Defaults(); Load applies only the flags that were set.
func RegisterFlags(fs *pflag.FlagSet) {
	d := Defaults()
	fs.String(ConfigFlag, "", "YAML config file (see configs/extractedprism.yaml) [env "+EnvName(ConfigFlag)+"]")
	for _, s := range flagSpecs {
		usage := s.Usage + " [env " + EnvName(s.Name) + "]"
		switch v := d.value(s.Key).(type) {
		case string:
			fs.String(s.Name, v, usage)
		case int:
			fs.Int(s.Name, v, usage)
		case bool:
			fs.Bool(s.Name, v, usage)
		case []string:
			fs.StringSlice(s.Name, v, usage)
		case time.Duration:
			fs.Duration(s.Name, v, usage)
		default:
			panic(fmt.Sprintf("config: no flag type for %s (%T)", s.Key, v))
		}
	}
	registerSuperseded(fs)
}

// ConfigPath returns the config file named by --config (if set on fs),
// else by EP_CONFIG in environ, else "".
func ConfigPath(fs *pflag.FlagSet, environ []string) string {
	if fs != nil {
		if f := fs.Lookup(ConfigFlag); f != nil && f.Changed {
			return f.Value.String()
		}
	}
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, EnvName(ConfigFlag)+"="); ok && v != "" {
			return v
		}
	}
	return ""
}

// origin says which layer set a key last, for error locations.
type origin struct {
	source string   // "EP_BIND_PORT" or "--bind-port"; "" for the file
	pos    position // in the file
}

// Load builds the configuration: Defaults(), overridden by the YAML file
// at path ("" = no file), by EP_* variables in environ, and by the flags
// of fs that were set on the command line (fs may be nil). It returns the
// validated configuration, or an error joining every problem found (see
// FieldErrors); a YAML syntax error or an unreadable file is returned
// alone.
func Load(path string, fs *pflag.FlagSet, environ []string) (Config, error) {
	var data []byte
	if path != "" {
		var err error
		if data, err = os.ReadFile(path); err != nil {
			return Config{}, fmt.Errorf("read config file: %w", err)
		}
	}
	return load(path, data, fs, environ)
}

// load is Load with the file's content already read (path "" = no file).
func load(path string, data []byte, fs *pflag.FlagSet, environ []string) (Config, error) {
	k := koanf.New(".")
	if err := k.Load(confmap.Provider(defaultsMap(), "."), nil); err != nil {
		return Config{}, fmt.Errorf("load defaults: %w", err)
	}
	var errs errorList
	origins := map[string]origin{}
	failed := map[string]bool{} // keys whose value could not be read

	if path != "" {
		layer, err := parseYAML(path, data)
		if layer == nil {
			return Config{}, err
		}
		for _, fe := range FieldErrors(err) {
			errs.errs = append(errs.errs, fe)
			failed[fe.Path] = true
		}
		for p, pos := range layer.pos {
			origins[p] = origin{pos: pos}
		}
		if err := k.Load(confmap.Provider(layer.values, "."), nil); err != nil {
			return Config{}, fmt.Errorf("load %s: %w", path, err)
		}
	}

	envProvider := env.Provider(".", env.Opt{
		Prefix:      EnvPrefix,
		EnvironFunc: func() []string { return environ },
		TransformFunc: func(name, raw string) (string, any) {
			spec, ok := flagByEnv[name]
			if !ok || raw == "" {
				return "", nil // unknown EP_ variables and empty values are ignored
			}
			v, err := parseScalar(schema.byPath[spec.Key].Kind, raw, "")
			if err != nil {
				fe := newFieldError(spec.Key, raw, "%s", err.Error())
				fe.Source = name
				errs.push(fe)
				failed[spec.Key] = true
				return "", nil
			}
			forget(origins, spec.Key)
			origins[spec.Key] = origin{source: name}
			return spec.Key, v
		},
	})
	if err := k.Load(envProvider, nil); err != nil {
		return Config{}, fmt.Errorf("load environment: %w", err)
	}

	if fs != nil {
		flagProvider := posflag.ProviderWithFlag(fs, ".", nil, func(f *pflag.Flag) (string, any) {
			spec, ok := flagByName[f.Name]
			if !ok || !f.Changed {
				return "", nil
			}
			v := posflag.FlagVal(fs, f)
			if list, ok := v.([]string); ok {
				v = splitList(strings.Join(list, ","))
			}
			forget(origins, spec.Key)
			origins[spec.Key] = origin{source: "--" + f.Name}
			return spec.Key, v
		})
		if err := k.Load(flagProvider, nil); err != nil {
			return Config{}, fmt.Errorf("load flags: %w", err)
		}
	}

	checkSuperseded(&errs, fs, environ)

	var c Config
	if err := k.UnmarshalWithConf("", &c, koanf.UnmarshalConf{Tag: "koanf"}); err != nil {
		return Config{}, fmt.Errorf("decode config: %w", err)
	}
	if c.Endpoints == nil {
		c.Endpoints = []string{}
	}

	for _, fe := range FieldErrors(c.Validate()) {
		base := fe.Path
		if i := strings.IndexByte(base, '['); i >= 0 {
			base = base[:i]
		}
		if failed[fe.Path] || failed[base] || anyFailed(failed, fe.related) {
			continue // already reported as unreadable
		}
		o, ok := origins[fe.Path]
		if !ok {
			o, ok = origins[base]
		}
		if ok {
			if o.source != "" {
				fe.Source = o.source
			} else if path != "" {
				fe.File, fe.Line, fe.Column = path, o.pos.Line, o.pos.Column
			}
		}
		errs.errs = append(errs.errs, fe)
	}
	if err := errs.err(); err != nil {
		return Config{}, err
	}
	c.Log.Level = canonicalLogLevel(c.Log.Level)
	return c, nil
}

// forget drops the file positions of key and its list items once a
// later layer overrides it.
func forget(origins map[string]origin, key string) {
	for p := range origins {
		if p == key || strings.HasPrefix(p, key+"[") {
			delete(origins, p)
		}
	}
}

// defaultsMap flattens Defaults() into dotted keys.
func defaultsMap() map[string]any {
	d := Defaults()
	m := make(map[string]any, len(schema.fields))
	for _, f := range schema.fields {
		m[f.Path] = d.value(f.Path)
	}
	return m
}

func anyFailed(failed map[string]bool, keys []string) bool {
	for _, k := range keys {
		if failed[k] {
			return true
		}
	}
	return false
}
