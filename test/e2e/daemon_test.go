package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// daemonArgs are the flags of every extractedprism run: one static endpoint
// (the first apiserver), discovery with the restricted credentials through
// our own listener (via_local is the default), and a state file.
func daemonArgs(kubeconfig, state string) []string {
	return []string{
		"--endpoints=" + apiserverIPs[0] + ":6443",
		"--enable-discovery",
		"--kubeconfig=" + kubeconfig,
		"--state-file=" + state,
		"--bind-address=127.0.0.1", "--bind-port=7445",
		"--health-bind-address=127.0.0.1", "--health-port=7446",
		"--drain-timeout=5s",
		"--log-level=debug",
	}
}

// hasDiscovered reports whether addr is in /status's discovered list and an
// upstream with source "discovered".
func hasDiscovered(doc status.Document, addr string) bool {
	u, ok := upstream(doc, addr)
	return ok && u.Source == "discovered" && slices.Contains(doc.Discovery.Discovered, addr)
}

// waitState polls the state file until its endpoints equal want.
func waitState(t *testing.T, path string, want []string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var got []string
	var err error
	for time.Now().Before(deadline) {
		var b []byte
		if b, err = os.ReadFile(path); err == nil {
			var doc struct {
				Endpoints []string `json:"endpoints"`
			}
			if err = json.Unmarshal(b, &doc); err == nil {
				got = doc.Endpoints
				if slices.Equal(got, want) {
					return
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("state file %s holds %v (error %v), want %v", path, got, err, want)
}

// TestDaemonFollowsRealAPIServers runs bin/extractedprism with discovery
// against real apiservers and real kubectl, through the scenarios of a
// control plane that grows, loses members, restarts, and is down at boot.
func TestDaemonFollowsRealAPIServers(t *testing.T) {
	a, b, sp := startTwoInSlice(t)

	kc, err := env.TokenKubeconfig("discovery", "https://"+a.Addr(), env.discToken)
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(env.Dir, "state", "endpoints.json")
	d := env.startDaemon(t, daemonArgs(kc, state)...)
	var load *loadLoop
	var watch *watchLoop
	step := func(name string, f func()) {
		t.Logf("== %s", name)
		start := time.Now()
		f()
		t.Logf("== %s: done in %s", name, time.Since(start).Round(time.Millisecond))
	}

	step("one static endpoint discovers all", func() {
		doc, at := d.waitStatus(t, "B discovered", 2*time.Minute, func(doc status.Document) bool {
			return doc.Discovery.State == "synced" && hasDiscovered(doc, b.Addr())
		})
		env.Record("daemon start (1 static endpoint) -> other apiserver discovered: %s", at.Sub(d.start).Round(time.Millisecond))
		if u, _ := upstream(doc, a.Addr()); u.Source != "static" {
			t.Fatalf("static endpoint reported as %q: %s", u.Source, describe(doc))
		}
		if doc.Discovery.LastSync.IsZero() || !doc.Discovery.Enabled {
			t.Fatalf("discovery status %+v", doc.Discovery)
		}
		_, at = d.waitStatus(t, "ready", time.Minute, func(doc status.Document) bool { return doc.Ready })
		env.Record("daemon start -> ready: %s", at.Sub(d.start).Round(time.Millisecond))
		waitState(t, state, []string{a.Addr(), b.Addr()})
		out := env.MustKubectl(t, proxyAddr, "", "get", "namespaces", "-o", "name")
		if !strings.Contains(out, "namespace/default") {
			t.Fatalf("kubectl get namespaces through extractedprism: %q", out)
		}
		env.MustKubectl(t, proxyAddr, "", "create", "configmap", "e2e-first", "-n", "default", "--from-literal=k=v")
		watch = env.startWatch(t)
		watch.waitSeen(t, "configmap/e2e-first", time.Minute)
		load = env.startLoad(t)
	})

	c := env.RunAPIServer(t, apiserverIPs[2])
	step("a third apiserver is discovered", func() {
		ready := env.WaitReady(t, c)
		inSlice := sp.WaitFor(t, "C listed", ready.Add(-time.Minute), 2*time.Minute, func(s []string) bool { return slices.Contains(s, c.Addr()) })
		_, at := d.waitStatus(t, "C discovered", 2*time.Minute, func(doc status.Document) bool { return hasDiscovered(doc, c.Addr()) })
		env.Record("third apiserver: ready -> in EndpointSlice %s; EndpointSlice -> /status %s",
			inSlice.Sub(ready).Round(time.Millisecond), at.Sub(inSlice).Round(time.Millisecond))
		_, up := d.waitStatus(t, "C up", time.Minute, func(doc status.Document) bool {
			u, ok := upstream(doc, c.Addr())
			return ok && u.State == "up"
		})
		env.Record("third apiserver: /status discovered -> probed up: %s", up.Sub(at).Round(time.Millisecond))
		waitState(t, state, []string{a.Addr(), b.Addr(), c.Addr()})
	})

	step("a SIGKILLed apiserver leaves when its lease expires, kubectl keeps working", func() {
		// Let some commands reach C first.
		time0 := time.Now()
		killed := time.Now()
		c.P.Signal(syscall.SIGKILL)
		_ = c.P.Wait(time.Minute)
		gone := sp.WaitFor(t, "C gone", killed, 2*time.Minute, func(s []string) bool { return !slices.Contains(s, c.Addr()) })
		_, at := d.waitStatus(t, "C removed", 2*time.Minute, func(doc status.Document) bool {
			_, ok := upstream(doc, c.Addr())
			return !ok
		})
		env.Record("SIGKILL of an apiserver: kill -> left EndpointSlice %s (lease expiry); EndpointSlice -> /status %s",
			gone.Sub(killed).Round(time.Millisecond), at.Sub(gone).Round(time.Millisecond))
		waitState(t, state, []string{a.Addr(), b.Addr()})
		total, failed := load.between(time0, time.Now())
		env.Record("SIGKILL of an apiserver: %d kubectl commands through extractedprism, %d failed", total, len(failed))
		if len(failed) > 0 {
			t.Errorf("kubectl failed through extractedprism while an apiserver was dead:\n%s", strings.Join(failed, "\n"))
		}
		if total < 3 {
			t.Errorf("only %d kubectl commands ran during the scenario", total)
		}
	})

	step("SIGTERM of an apiserver during a watch: the watch comes back through a healthy one", func() {
		// The test cannot see which apiserver carries the kubectl watch, so
		// it terminates A and, if the watch was not on A, then B.
		hit := false
		for i, x := range []*apiserver{a, b} {
			name := fmt.Sprintf("e2e-after-term-%d", i)
			time0 := time.Now()
			x.P.Signal(syscall.SIGTERM)
			gone := sp.WaitFor(t, x.IP+" gone", time0, time.Minute, func(s []string) bool { return !slices.Contains(s, x.Addr()) })
			_, at := d.waitStatus(t, x.IP+" no longer discovered", time.Minute, func(doc status.Document) bool {
				return !slices.Contains(doc.Discovery.Discovered, x.Addr())
			})
			env.Record("SIGTERM of %s: term -> left EndpointSlice %s; EndpointSlice -> /status %s",
				x.IP, gone.Sub(time0).Round(time.Millisecond), at.Sub(gone).Round(time.Millisecond))
			_, out := d.waitStatus(t, x.IP+" down or removed", time.Minute, func(doc status.Document) bool {
				u, ok := upstream(doc, x.Addr())
				return !ok || u.State == "down"
			})
			env.Record("SIGTERM of %s: term -> no longer used for new connections %s", x.IP, out.Sub(time0).Round(time.Millisecond))
			// A terminating apiserver keeps serving the watches it has until
			// it exits (its HTTP server waits up to a minute for them), unless
			// extractedprism closes them first.
			if err := x.P.Wait(2 * time.Minute); err != nil {
				t.Logf("%s exit: %v", x.P.Name, err)
			}
			env.Record("SIGTERM of %s: term -> process exit %s", x.IP, time.Since(time0).Round(time.Millisecond))
			ended := watch.ended(time0, time.Now())
			env.MustKubectl(t, proxyAddr, "", "create", "configmap", name, "-n", "default", "--from-literal=k=v")
			seen := watch.waitSeen(t, "configmap/"+name, time.Minute)
			if len(ended) > 0 {
				hit = true
				next := watch.sessionAfter(ended[0].end)
				if next.IsZero() || next.After(seen) {
					t.Fatalf("no new watch session before the change was seen")
				}
				env.Record("SIGTERM of %s: the kubectl watch riding on it ended %s after the signal; the next watch through extractedprism answered %s later",
					x.IP, ended[0].end.Sub(time0).Round(time.Millisecond), next.Sub(ended[0].end).Round(time.Millisecond))
			}
			total, failed := load.between(time0, time.Now())
			env.Record("SIGTERM of %s: %d kubectl commands through extractedprism, %d failed", x.IP, total, len(failed))
			if len(failed) > 0 {
				t.Errorf("kubectl failed through extractedprism after SIGTERM of %s:\n%s", x.IP, strings.Join(failed, "\n"))
			}

			// Bring it back on the same address.
			*x = *env.RunAPIServer(t, x.IP)
			ready := env.WaitReady(t, x)
			_, at = d.waitStatus(t, x.IP+" back", 2*time.Minute, func(doc status.Document) bool {
				u, ok := upstream(doc, x.Addr())
				return ok && u.State == "up" && slices.Contains(doc.Discovery.Discovered, x.Addr())
			})
			env.Record("restart of %s: ready -> discovered and probed up: %s", x.IP, at.Sub(ready).Round(time.Millisecond))
			if hit {
				break
			}
		}
		if !hit {
			t.Fatal("neither SIGTERM ended the kubectl watch: it never rode on a terminated apiserver")
		}
	})
	load.stop()
	watch.stop()

	step("all apiservers stop, extractedprism restarts, apiservers come back on discovered addresses", func() {
		// Stop A (the static endpoint) first: discovery then only knows B.
		// A is killed once it has left the EndpointSlice, rather than
		// waiting the minute a terminating apiserver gives its watches.
		a.P.Signal(syscall.SIGTERM)
		d.waitStatus(t, "A no longer discovered", time.Minute, func(doc status.Document) bool {
			return slices.Equal(doc.Discovery.Discovered, []string{b.Addr()})
		})
		a.P.Kill()
		// The last apiserver never removes itself from the EndpointSlice
		// ("refusing to erase all endpoints"): it simply goes away.
		b.P.Kill()
		waitState(t, state, []string{b.Addr()})
		if err := d.p.Stop(time.Minute); err != nil {
			t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v\n%s", err, d.p.Tail(20))
		}

		d = env.startDaemon(t, daemonArgs(kc, state)...)
		doc, _ := d.waitStatus(t, "the state file's endpoint", time.Minute, func(doc status.Document) bool {
			u, ok := upstream(doc, b.Addr())
			return ok && u.Source == "state-file"
		})
		if doc.Ready {
			t.Fatalf("ready with every apiserver down: %s", describe(doc))
		}
		*b = *env.RunAPIServer(t, b.IP)
		ready := env.WaitReady(t, b)
		var worked time.Time
		for {
			ctx, cancel := contextWithTimeout(20 * time.Second)
			_, err := env.Kubectl(ctx, proxyAddr, "", "get", "configmaps", "-n", "default", "-o", "name")
			cancel()
			if err == nil {
				worked = time.Now()
				break
			}
			if time.Since(ready) > 2*time.Minute {
				t.Fatalf("kubectl through extractedprism still fails 2 minutes after the state file's apiserver came back: %v", err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		_, at := d.waitStatus(t, "B discovered", 2*time.Minute, func(doc status.Document) bool {
			return doc.Discovery.State == "synced" && hasDiscovered(doc, b.Addr())
		})
		env.Record("restart on the state file (static apiserver down): apiserver on a discovered address ready -> kubectl works %s, -> discovery synced %s",
			worked.Sub(ready).Round(time.Millisecond), at.Sub(ready).Round(time.Millisecond))
	})

	step("API unreachable at start: static first, discovery later", func() {
		if err := d.p.Stop(time.Minute); err != nil {
			t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v", err)
		}
		b.P.Kill()
		if err := os.Remove(state); err != nil {
			t.Fatal(err)
		}
		d = env.startDaemon(t, daemonArgs(kc, state)...)
		// Let discovery fail for a while, so that it is in its backoff.
		doc, _ := d.waitStatus(t, "discovery failing for 8s", time.Minute, func(doc status.Document) bool {
			return doc.Discovery.State == "error" && doc.Discovery.LastError != "" && time.Since(d.start) > 8*time.Second
		})
		if len(doc.Upstreams) != 1 || doc.Upstreams[0].Address != a.Addr() || doc.Upstreams[0].Source != "static" {
			t.Fatalf("upstreams with the API down: %s", describe(doc))
		}
		aa := env.RunAPIServer(t, a.IP)
		bb := env.RunAPIServer(t, b.IP)
		*a, *b = *aa, *bb
		started := time.Now()
		// Poll the apiservers and /status together: when did the API come
		// back, and when did extractedprism see the other apiserver?
		var back, at time.Time
		for at.IsZero() {
			if time.Since(started) > 3*time.Minute {
				t.Fatalf("B not discovered within 3 minutes of the apiservers' start")
			}
			if back.IsZero() && (env.Answers(a) || env.Answers(b)) {
				back = time.Now()
			}
			if doc, err := d.status(); err == nil && doc.Discovery.State == "synced" && hasDiscovered(doc, b.Addr()) {
				at = time.Now()
			}
			time.Sleep(50 * time.Millisecond)
		}
		if back.IsZero() {
			back = at
		}
		env.WaitReady(t, a, b)
		env.Record("API down at start: extractedprism ran %s without an API; first HTTP answer of an apiserver -> other apiserver discovered %s",
			started.Sub(d.start).Round(time.Millisecond), at.Sub(back).Round(time.Millisecond))
		env.MustKubectl(t, proxyAddr, "", "get", "configmaps", "-n", "default", "-o", "name")
		if err := d.p.Stop(time.Minute); err != nil {
			t.Fatalf("extractedprism did not exit 0 on SIGTERM: %v", err)
		}
	})
}
