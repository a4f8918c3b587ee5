package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// realConfigs are the example file and the configurations in testdata.
func realConfigs(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, exampleFile)
	out := map[string][]byte{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[f] = data
	}
	return out
}

func TestRealConfigsLoad(t *testing.T) {
	for name := range realConfigs(t) {
		t.Run(filepath.Base(name), func(t *testing.T) {
			var env []string
			if name == exampleFile {
				env = []string{"EP_ENDPOINTS=10.0.0.1:6443"}
			}
			c, err := Load(name, nil, env)
			if err != nil {
				t.Fatalf("Load:\n%v", err)
			}
			t.Log(c.Summary())
		})
	}
}

// FuzzLoad feeds arbitrary file content (and EP_* environment) to the
// loader: it must return a valid config or an error, never panic, and an
// error must say something.
func FuzzLoad(f *testing.F) {
	for _, data := range realConfigs(f) {
		f.Add(data, "")
	}
	f.Add([]byte("endpoints: [a:1]\nproxy:\n  dial_timout: 1s\n"), "EP_BIND_PORT=abc")
	f.Add([]byte("a: &x [*x]\n"), "")
	f.Add([]byte("endpoints: !!binary aGVsbG8=\n"), "EP_ENDPOINTS=[::1]:1,,x")
	f.Add([]byte("probe: {interval: 1s, timeout: 2s, jitter: .inf}\n"), "EP_HEALTH_INTERVAL=-1s")
	f.Fuzz(func(t *testing.T, data []byte, env string) {
		environ := strings.Split(env, "\n")
		c, err := load("fuzz.yaml", data, nil, environ)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			for _, fe := range FieldErrors(err) {
				if fe.Msg == "" {
					t.Fatalf("field error without a message: %#v", fe)
				}
			}
			return
		}
		if verr := c.Validate(); verr != nil {
			t.Fatalf("Load returned a config that does not validate: %v", verr)
		}
		_ = c.Summary()
		_ = c.ListenAddr()
		_ = c.AdminAddr()
	})
}
