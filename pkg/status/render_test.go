package status

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"go.uber.org/goleak"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var now = time.Date(2026, 3, 4, 12, 0, 0, 0, time.UTC)

func ts(ago time.Duration) time.Time { return now.Add(-ago) }

// cases are the documents the golden files show.
var cases = map[string]Document{
	"healthy": {
		Ready: true, Reason: "2 healthy upstreams", Alive: true, Version: "v1.4.0",
		Listen: "127.0.0.1:7445", ActiveConnections: 14, MaxConnections: 10240, RefusedConnections: 3,
		Upstreams: []Upstream{
			{
				Address: "10.0.0.1:6443", Source: "static", State: "up", Since: ts(3*time.Minute + 12*time.Second),
				LastProbe: ts(1 * time.Second), LastProbeOK: true, LastProbeLatencySeconds: 0.00421,
				ActiveConnections: 9, TotalConnections: 120, Failures: 0,
			},
			{
				Address: "10.0.0.2:6443", Source: "discovered", State: "up", Since: ts(26 * time.Hour),
				LastProbe: ts(2 * time.Second), LastProbeOK: true, LastProbeLatencySeconds: 0.000612,
				ActiveConnections: 5, TotalConnections: 98, Failures: 2,
			},
			{
				Address: "[fd00::3]:6443", Source: "state-file", State: "down", Since: ts(45 * time.Second),
				Reason:    "probe failed 2 times",
				LastProbe: ts(1500 * time.Millisecond), LastProbeOK: false, LastProbeLatencySeconds: 2.0004,
				LastError:         "GET https://[fd00::3]:6443/readyz: context deadline exceeded",
				ActiveConnections: 0, TotalConnections: 31, Failures: 17,
			},
		},
		Discovery: Discovery{
			Enabled: true, State: "synced", LastSync: ts(12 * time.Second),
			Discovered: []string{"10.0.0.1:6443", "10.0.0.2:6443", "[fd00::3]:6443"},
		},
		Config: Config{File: "/etc/extractedprism/config.yaml", LastReload: ts(5*time.Minute + 3*time.Second), LastReloadOK: true},
	},
	"not-ready": {
		Ready: false, Reason: "no healthy upstream", Alive: true, Version: "v1.4.0",
		Listen: "127.0.0.1:7445",
		Upstreams: []Upstream{
			{
				Address: "10.0.0.1:6443", Source: "static", State: "down", Since: ts(2*time.Hour + 5*time.Minute),
				LastProbe: ts(time.Second), LastProbeLatencySeconds: 0.0003,
				LastError: "dial tcp 10.0.0.1:6443: connect: connection refused", TotalConnections: 4, Failures: 3120,
			},
			{
				Address: "10.0.0.2:6443", Source: "static", State: "down", Since: ts(2*time.Hour + 5*time.Minute),
				Reason:    "readyz returned 500",
				LastProbe: ts(time.Second), LastProbeLatencySeconds: 0.0153, Failures: 3118,
			},
		},
		Discovery: Discovery{
			Enabled: true, State: "error", LastSync: ts(2 * time.Hour),
			LastError: "watch endpointslices: Get \"https://127.0.0.1:7445/apis/discovery.k8s.io/v1/endpointslices\": EOF",
		},
		Config: Config{
			File: "/etc/extractedprism/config.yaml", LastReload: ts(10 * time.Second), LastReloadOK: false,
			LastReloadError: "listen.port: 70000 is not a valid port\nprobe.interval: \"-1s\" must be positive",
		},
	},
	"starting": {
		Ready: false, Reason: "waiting for the first probe round", Alive: true, Version: "dev",
		Discovery: Discovery{Enabled: true, State: "starting"},
	},
	"unprobed": {
		Ready: false, Reason: "waiting for the first probe round", Alive: false, Version: "dev",
		Listen: "[::1]:7445", ActiveConnections: 1,
		Upstreams: []Upstream{
			{Address: "apiserver.example:6443", Source: "static", State: "unknown", Since: ts(400 * time.Millisecond)},
		},
		Discovery: Discovery{State: "disabled"},
		Config:    Config{},
	},
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (run go test ./pkg/status -update to create it): %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file (go test ./pkg/status -update rewrites it)\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}

func TestRenderTableGolden(t *testing.T) {
	for name, d := range cases {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			if err := RenderTable(&b, d, now); err != nil {
				t.Fatal(err)
			}
			golden(t, name+".table.golden", b.Bytes())
		})
	}
}

func TestRenderJSONGolden(t *testing.T) {
	for name, d := range cases {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			if err := RenderJSON(&b, d); err != nil {
				t.Fatal(err)
			}
			golden(t, name+".json.golden", b.Bytes())

			// What the command prints decodes back to what the daemon served.
			var back Document
			if err := json.Unmarshal(b.Bytes(), &back); err != nil {
				t.Fatalf("output is not JSON: %v", err)
			}
			if d.Upstreams == nil {
				d.Upstreams = []Upstream{}
			}
			if !reflect.DeepEqual(back, d) {
				t.Errorf("round trip changed the document:\n%+v\nwant:\n%+v", back, d)
			}
		})
	}
}

func TestAge(t *testing.T) {
	for _, c := range []struct {
		ago  time.Duration
		want string
	}{
		{0, "0s"},
		{-5 * time.Second, "0s"}, // clock skew: never negative
		{999 * time.Millisecond, "0s"},
		{59 * time.Second, "59s"},
		{3*time.Minute + 12*time.Second, "3m12s"},
		{time.Hour + 59*time.Minute + 59*time.Second, "1h59m"},
		{49 * time.Hour, "2d1h"},
	} {
		if got := age(now, now.Add(-c.ago)); got != c.want {
			t.Errorf("age(%v) = %q, want %q", c.ago, got, c.want)
		}
	}
	if got := age(now, time.Time{}); got != "-" {
		t.Errorf("age(zero) = %q, want -", got)
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestWriteErrorsAreReturned(t *testing.T) {
	d := cases["healthy"]
	if err := RenderTable(failWriter{}, d, now); err == nil {
		t.Error("RenderTable ignored a write error")
	}
	if err := RenderJSON(failWriter{}, d); err == nil {
		t.Error("RenderJSON ignored a write error")
	}
}
