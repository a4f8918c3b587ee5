//go:build linux

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// configFile is the content of one config file version.
type configFile struct {
	port, adminPort   int
	endpoints         []string
	interval, timeout time.Duration
	drain             time.Duration
}

func (c configFile) yaml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "listen:\n  address: 127.0.0.1\n  port: %d\n", c.port)
	fmt.Fprintf(&b, "admin:\n  port: %d\n", c.adminPort)
	b.WriteString("endpoints:\n")
	for _, e := range c.endpoints {
		fmt.Fprintf(&b, "  - %s\n", e)
	}
	fmt.Fprintf(&b, "probe:\n  interval: %s\n  timeout: %s\n", c.interval, c.timeout)
	if c.drain > 0 {
		fmt.Fprintf(&b, "proxy:\n  drain_timeout: %s\n", c.drain)
	}
	b.WriteString("discovery:\n  state_file: \"\"\n")
	return b.String()
}

// writeAtomic replaces path by renaming a new file over it, as editors
// and config management tools do.
func writeAtomic(t testing.TB, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	writeFile(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// configMapDir imitates a Kubernetes ConfigMap volume: dir/..<ts>/config.yaml,
// dir/..data -> ..<ts>, dir/config.yaml -> ..data/config.yaml. An update
// writes a new ..<ts> directory and swaps ..data atomically.
type configMapDir struct {
	dir  string
	gen  int
	prev string
}

// update publishes content as a new ConfigMap generation.
func (m *configMapDir) update(t testing.TB, content string) {
	t.Helper()
	m.gen++
	ts := fmt.Sprintf("..2026_11_26_08_00_%02d.%d", m.gen, m.gen)
	if err := os.Mkdir(filepath.Join(m.dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(m.dir, ts, "config.yaml"), content)
	tmp := filepath.Join(m.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(m.dir, "config.yaml")
	if target, err := os.Readlink(link); err != nil || target != "..data/config.yaml" {
		// First generation: replace the plain file by the symlink.
		if err := os.Symlink("..data/config.yaml", link+".tmp"); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(link+".tmp", link); err != nil {
			t.Fatal(err)
		}
	}
	if m.prev != "" {
		if err := os.RemoveAll(filepath.Join(m.dir, m.prev)); err != nil {
			t.Fatal(err)
		}
	}
	m.prev = ts
}

// waitReloaded waits until /status reports a reload attempt after since
// and returns its result.
func (d *daemonProc) waitReloaded(t testing.TB, since time.Time, what string) (ok bool, errText string) {
	t.Helper()
	waitFor(t, waitTimeout, "the daemon to reload "+what, func() (bool, string) {
		doc, err := d.tryStatus()
		if err != nil {
			return false, err.Error()
		}
		ok, errText = doc.Config.LastReloadOK, doc.Config.LastReloadError
		return doc.Config.LastReload.After(since), fmt.Sprintf("last reload %s ok=%v %s",
			doc.Config.LastReload.Format(time.StampMilli), ok, errText)
	})
	return ok, errText
}

// TestReloadUnderLoad: while clients keep opening connections through the
// proxy, the config file is rewritten 50 times (endpoint lists among three
// stand-ins, probe intervals, in-place writes, renames, one invalid file,
// ConfigMap-style ..data swaps). No client request may fail; the invalid
// file is reported in /status and the next good one clears it; the final
// upstream set is the final file's.
func TestReloadUnderLoad(t *testing.T) {
	const writes = 50
	const badAt = 25
	const configMapFrom = 48
	ss := startStandins(t, 3)
	all := addrsOf(ss)
	subsets := [][]int{{0, 1, 2}, {0, 1}, {1, 2}, {0, 2}, {2}, {0}, {1}}
	intervals := []time.Duration{400 * time.Millisecond, 700 * time.Millisecond, time.Second}
	version := func(i int) configFile {
		c := configFile{interval: intervals[i%len(intervals)]}
		c.timeout = c.interval
		for _, k := range subsets[i%len(subsets)] {
			c.endpoints = append(c.endpoints, all[k])
		}
		return c
	}

	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	port, adminPort := freePort(t), freePort(t)
	first := version(0)
	first.port, first.adminPort = port, adminPort
	writeFile(t, path, first.yaml())
	d := startDaemonArgs(t, loopback(port), loopback(adminPort), "--config", path, "--log-level", "info")
	d.waitReady(t)
	d.waitAllUp(t, all)

	l := startLoad(t, d.listen, 3)
	l.waitRequests(t, 30)
	cm := &configMapDir{dir: dir}
	var final configFile
	var inPlace, renamed, swaps, reloads int
	start := time.Now()
	for i := 1; i <= writes; i++ {
		c := version(i)
		c.port, c.adminPort = port, adminPort
		writeAt := time.Now()
		switch {
		case i == badAt:
			writeAtomic(t, path, c.yaml()+"probe_typo: true\n")
			ok, errText := d.waitReloaded(t, writeAt, "the invalid file")
			if ok || !strings.Contains(errText, "probe_typo") {
				t.Errorf("after the invalid file /status config shows ok=%v error %q, want the failure naming probe_typo", ok, errText)
			}
			if code, body, err := d.get("/readyz"); err != nil || code != 200 {
				t.Errorf("/readyz after an invalid config file: %d %q %v, want 200 (the running config stays)", code, body, err)
			}
			continue
		case i >= configMapFrom:
			cm.update(t, c.yaml())
			swaps++
		case i%3 == 0:
			writeFile(t, path, c.yaml())
			inPlace++
		default:
			writeAtomic(t, path, c.yaml())
			renamed++
		}
		ok, errText := d.waitReloaded(t, writeAt, fmt.Sprintf("write %d", i))
		reloads++
		if !ok {
			t.Errorf("write %d (%v every %s) was not applied cleanly: %s", i, c.endpoints, c.interval, errText)
		}
		final = c
	}
	rewriting := time.Since(start)

	want := slices.Clone(final.endpoints)
	slices.Sort(want)
	waitFor(t, waitTimeout, "the upstream set of the final file", func() (bool, string) {
		doc, err := d.tryStatus()
		if err != nil {
			return false, err.Error()
		}
		var got []string
		for _, u := range doc.Upstreams {
			got = append(got, u.Address)
		}
		slices.Sort(got)
		return slices.Equal(got, want), fmt.Sprintf("upstreams %v, want %v", got, want)
	})
	l.waitRequests(t, 30)
	l.stop()
	rs := l.snapshot()
	reportFailures(t, rs)
	doc := d.status(t)
	if !doc.Config.LastReloadOK || doc.Config.LastReloadError != "" {
		t.Errorf("final /status config: ok=%v error %q, want ok", doc.Config.LastReloadOK, doc.Config.LastReloadError)
	}
	perServer := map[string]int{}
	for _, r := range rs {
		perServer[r.server]++
	}
	t.Logf("reload under load: %d file writes (%d in place, %d renamed, 1 invalid, %d ConfigMap ..data swaps) in %s, %d reloads applied; %d client requests, %d failed; per server %v",
		writes, inPlace, renamed, swaps, rewriting.Round(time.Millisecond), reloads, len(rs), len(failures(rs)), perServer)
}

// TestReloadMovesListener: changing listen.port in the file while a long
// stream is open binds the new port, stops the old one (connects refused)
// and leaves the stream flowing.
func TestReloadMovesListener(t *testing.T) {
	ss := startStandins(t, 2)
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	c := configFile{port: freePort(t), adminPort: freePort(t), endpoints: addrsOf(ss),
		interval: probeInterval, timeout: probeTimeout, drain: 30 * time.Second}
	writeFile(t, path, c.yaml())
	oldAddr := loopback(c.port)
	d := startDaemonArgs(t, oldAddr, loopback(c.adminPort), "--config", path)
	d.waitReady(t)
	s := openStream(t, oldAddr, 100*time.Millisecond)
	s.waitLines(t, 3, waitTimeout)

	c.port = freePort(t)
	newAddr := loopback(c.port)
	writeAt := time.Now()
	writeAtomic(t, path, c.yaml())
	if ok, errText := d.waitReloaded(t, writeAt, "the new listen port"); !ok {
		t.Fatalf("reload to listen port %d failed: %s", c.port, errText)
	}
	reloaded := time.Since(writeAt)
	if doc := d.status(t); doc.Listen != newAddr {
		t.Errorf("/status listen = %q after the reload, want %q", doc.Listen, newAddr)
	}
	var name string
	waitFor(t, waitTimeout, "the new port to serve", func() (bool, string) {
		n, err := getRoot(newAddr)
		name = n
		return err == nil, fmt.Sprint(err)
	})
	serving := time.Since(writeAt)
	waitFor(t, waitTimeout, "the old port to refuse connects", func() (bool, string) {
		_, err := getRoot(oldAddr)
		return err != nil && isRefused(err), fmt.Sprint(err)
	})
	refused := time.Since(writeAt)
	s.waitLines(t, 10, waitTimeout)
	if s.ended() {
		at, err := s.end()
		t.Fatalf("the stream opened on the old port ended at %s (%v)", at.Format(time.StampMilli), err)
	}
	lines, _ := s.count()
	t.Logf("listen move: reload applied %s after the write, new port served (by %s) after %s, old port refused after %s; stream on the old port still flowing (%d lines)",
		describe(reloaded), name, describe(serving), describe(refused), lines)
}

// TestReloadKeepsConnections: a reload that removes upstreams from the
// endpoint list drops no connection: streams riding on the removed
// upstreams keep flowing, while new connections go only to the remaining
// one.
func TestReloadKeepsConnections(t *testing.T) {
	ss := startStandins(t, 3)
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	c := configFile{port: freePort(t), adminPort: freePort(t), endpoints: addrsOf(ss),
		interval: probeInterval, timeout: probeTimeout}
	writeFile(t, path, c.yaml())
	d := startDaemonArgs(t, loopback(c.port), loopback(c.adminPort), "--config", path)
	d.waitReady(t)
	d.waitAllUp(t, addrsOf(ss))

	// Least-connections puts three concurrent streams on three upstreams.
	streams := map[string]*stream{}
	for i := 0; i < 9 && len(streams) < 3; i++ {
		s := openStream(t, d.listen, 100*time.Millisecond)
		if streams[s.server] == nil {
			streams[s.server] = s
		}
	}
	if len(streams) != 3 {
		t.Fatalf("streams landed on %d upstreams, want 3", len(streams))
	}

	keep := ss[0]
	c.endpoints = []string{keep.addr}
	writeAt := time.Now()
	writeAtomic(t, path, c.yaml())
	if ok, errText := d.waitReloaded(t, writeAt, "the shorter endpoint list"); !ok {
		t.Fatalf("reload failed: %s", errText)
	}
	waitFor(t, waitTimeout, "the removed upstreams to leave /status", func() (bool, string) {
		doc, err := d.tryStatus()
		if err != nil {
			return false, err.Error()
		}
		return len(doc.Upstreams) == 1 && doc.Upstreams[0].Address == keep.addr, fmt.Sprintf("%+v", doc.Upstreams)
	})
	for name, s := range streams {
		s.waitLines(t, 10, waitTimeout)
		if s.ended() {
			t.Errorf("the stream on %s ended after the reload", name)
		}
	}
	for range 20 {
		name, err := getRoot(d.listen)
		if err != nil {
			t.Fatalf("request after the reload: %v", err)
		}
		if name != keep.name {
			t.Fatalf("a new connection went to %s, removed from the endpoint list", name)
		}
	}
	t.Logf("reload removing 2 of 3 upstreams: all 3 streams kept flowing, new connections only to %s", keep.name)
}
