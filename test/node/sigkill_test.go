package node

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// workloadPod runs the tools image's ticker on the node.
const workloadPod = `apiVersion: v1
kind: Pod
metadata:
  name: ticker
  namespace: default
spec:
  terminationGracePeriodSeconds: 2
  tolerations:
  - operator: Exists
  containers:
  - name: ticker
    image: ` + toolsImage + `
    imagePullPolicy: IfNotPresent
    command: ["/pause", "tick"]
`

// killDuration is how long the apiserver stays dead.
const killDuration = 60 * time.Second

// apiserverSigkill kills the apiserver serving the kubelet's requests for
// 60 s and restarts it. The node stays Ready, kubectl logs
// and exec of a pod on the node keep working through the node's balancer,
// and the kubelet loses no more than one in-flight request.
func (c *cluster) apiserverSigkill(t *testing.T) {
	c.ensureWorkload(t)
	// The victim is the apiserver serving the kubelet's requests (its
	// lease renewals come every 10 s), from the apiservers' audit logs.
	var victim *apiserver
	var served []string
	poll(t, "an apiserver serving the kubelet", time.Minute, time.Second, func() (bool, string) {
		now := time.Now()
		most := 0
		served = served[:0]
		for _, a := range c.apiservers {
			n := kubeletRequests(a.IP, now.Add(-15*time.Second), now)
			served = append(served, fmt.Sprintf("%s: %d", a.IP, n))
			if n > most {
				victim, most = a, n
			}
		}
		return most > 0, strings.Join(served, ", ")
	})
	var observer string
	for _, a := range c.apiservers {
		if a != victim {
			observer = a.Addr()
			break
		}
	}
	before, err := getNode(observer)
	if err != nil {
		t.Fatal(err)
	}
	m := startNodeMonitor(observer)
	ops := startClientOps(t)
	// A baseline with everything up.
	time.Sleep(5 * time.Second)
	killedAt := time.Now()
	victim.P.Signal(syscall.SIGKILL)
	if err := victim.P.Wait(30 * time.Second); err == nil {
		t.Fatalf("%s exited cleanly on SIGKILL", victim.P.Name)
	}
	env.record("SIGKILL %s for %s; kubelet requests per apiserver in the 15 s before: %s", victim.Addr(), killDuration, strings.Join(served, ", "))
	deadline := time.After(killDuration)
	tick := time.NewTicker(time.Second)
	for waiting := true; waiting; {
		select {
		case <-deadline:
			waiting = false
		case <-tick.C:
			c.checkAlive(t)
		}
	}
	tick.Stop()
	c.restartAPIServer(t, victim)
	back := c.waitAPIServer(t, victim, 3*time.Minute)
	poll(t, "balancer sees the restarted apiserver up", 2*time.Minute, 250*time.Millisecond, func() (bool, string) {
		d, err := getStatus(adminAddr)
		if err != nil {
			return false, err.Error()
		}
		return allUp(d), d.describe()
	})
	// Keep watching for as long as a node status and a lease renewal take.
	time.Sleep(20 * time.Second)
	end := time.Now()
	opsRes := ops.stop()
	mon := m.stop()

	afterNode, err := getNode(observer)
	if err != nil {
		t.Fatal(err)
	}
	failed, watches := kubeletAPIErrors(c.kubelet.Log, killedAt.Add(-time.Second), end)
	var after []string
	for _, a := range c.apiservers {
		after = append(after, fmt.Sprintf("%s: %d", a.IP, kubeletRequests(a.IP, killedAt, back)))
	}
	env.record("apiserver SIGKILL: kubelet requests per apiserver while %s was down: %s", victim.IP, strings.Join(after, ", "))
	env.record("apiserver SIGKILL: node Ready in %d of %d checks (1/s), max lease renew gap %.1f s, Ready since %s (unchanged: %t)",
		mon.ready, mon.checks, mon.maxLeaseGap.Seconds(), afterNode.ready().LastTransitionTime.Format(time.RFC3339),
		afterNode.ready().LastTransitionTime.Equal(before.ready().LastTransitionTime))
	env.record("apiserver SIGKILL: kubectl logs/exec through the node's balancer: %d of %d ok; kubectl logs -f: %d lines, started again %d times",
		opsRes.ok, opsRes.total, opsRes.followLines, opsRes.followRestarts)
	env.record("apiserver SIGKILL: kubelet failed API requests: %d; watches the kubelet re-opened: %d; apiserver back after %.1f s",
		len(failed), watches, back.Sub(killedAt).Seconds())
	for _, l := range failed {
		t.Logf("kubelet: %s", l)
	}
	for _, e := range opsRes.errors {
		t.Logf("client op: %s", e)
	}
	if mon.notReady > 0 || mon.checks < int(killDuration/time.Second)/2 {
		t.Errorf("node not Ready in %d of %d checks: %v", mon.notReady, mon.checks, mon.notes)
	}
	if !afterNode.ready().LastTransitionTime.Equal(before.ready().LastTransitionTime) || afterNode.ready().Status != "True" {
		t.Errorf("node Ready condition changed: before %+v, after %+v", before.ready(), afterNode.ready())
	}
	if mon.maxLeaseGap > 25*time.Second {
		t.Errorf("node lease not renewed for %.1f s (renewal every 10 s)", mon.maxLeaseGap.Seconds())
	}
	if opsRes.total < 15 || opsRes.total-opsRes.ok > 1 {
		t.Errorf("kubectl logs/exec through the balancer: %d of %d failed (at most the one in flight may): %v",
			opsRes.total-opsRes.ok, opsRes.total, opsRes.errors)
	}
	// A stream through the killed apiserver ends with it; kubectl logs -f
	// started again goes through another one.
	if opsRes.followRestarts > 1 || opsRes.followLines < int(killDuration/time.Second) {
		t.Errorf("kubectl logs -f through the balancer: %d lines, %d restarts", opsRes.followLines, opsRes.followRestarts)
	}
	if len(failed) > 1 {
		t.Errorf("kubelet logged %d failed API requests, at most one in-flight request may fail", len(failed))
	}
}

// ensureWorkload creates the ticker pod once and waits for it to run.
func (c *cluster) ensureWorkload(t *testing.T) {
	t.Helper()
	env.MustKubectl(t, c.liveAPIServer(), workloadPod, "apply", "-f", "-")
	poll(t, "ticker pod Running", 3*time.Minute, 500*time.Millisecond, func() (bool, string) {
		c.checkAlive(t)
		p, err := getPod(c.liveAPIServer(), "default", "ticker")
		if err != nil {
			return false, err.Error()
		}
		return p.ready(), fmt.Sprintf("phase %s %+v", p.Status.Phase, p.Status.ContainerStatuses)
	})
}

// nodeMonitor checks the node's Ready condition and lease once a second.
type nodeMonitor struct {
	stopCh chan struct{}
	done   chan nodeMonitorResult
}

type nodeMonitorResult struct {
	checks, ready, notReady int
	maxLeaseGap             time.Duration
	notes                   []string
}

func startNodeMonitor(server string) *nodeMonitor {
	m := &nodeMonitor{stopCh: make(chan struct{}), done: make(chan nodeMonitorResult, 1)}
	go func() {
		var r nodeMonitorResult
		var lastRenew time.Time
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-m.stopCh:
				m.done <- r
				return
			case <-tick.C:
			}
			n, err := getNode(server)
			if err != nil {
				r.notes = append(r.notes, "observer: "+err.Error())
				continue
			}
			r.checks++
			if rc := n.ready(); rc.Status == "True" {
				r.ready++
			} else {
				r.notReady++
				r.notes = append(r.notes, fmt.Sprintf("%s Ready=%s %s", time.Now().Format(time.TimeOnly), rc.Status, rc.Message))
			}
			var l leaseObject
			if err := env.getObject(server, "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/"+nodeName, &l); err == nil {
				if lastRenew.IsZero() {
					lastRenew = l.Spec.RenewTime
				}
				if gap := time.Since(lastRenew); gap > r.maxLeaseGap {
					r.maxLeaseGap = gap
				}
				if l.Spec.RenewTime.After(lastRenew) {
					lastRenew = l.Spec.RenewTime
				}
			}
		}
	}()
	return m
}

func (m *nodeMonitor) stop() nodeMonitorResult {
	close(m.stopCh)
	return <-m.done
}

// clientOps runs kubectl logs and exec of the ticker pod through the
// node's balancer every 2 s, and keeps a kubectl logs -f stream open.
type clientOps struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	res    clientOpsResult
}

type clientOpsResult struct {
	total, ok                   int
	followLines, followRestarts int
	errors                      []string
}

func startClientOps(t *testing.T) *clientOps {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	o := &clientOps{cancel: cancel}
	o.wg.Add(2)
	go func() {
		defer o.wg.Done()
		tick := time.NewTicker(2 * time.Second)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			args := []string{"logs", "-n", "default", "ticker", "--tail=1"}
			want := "tick "
			if i%2 == 1 {
				args = []string{"exec", "-n", "default", "ticker", "--", "/pause", "echo", "exec-ok"}
				want = "exec-ok"
			}
			octx, ocancel := context.WithTimeout(ctx, 30*time.Second)
			out, err := env.Kubectl(octx, balancerAddr, "", args...)
			ocancel()
			if ctx.Err() != nil {
				return
			}
			o.mu.Lock()
			o.res.total++
			switch {
			case err != nil:
				o.res.errors = append(o.res.errors, fmt.Sprintf("%s %s: %v", time.Now().Format(time.TimeOnly), args[0], err))
			case !strings.Contains(out, want):
				o.res.errors = append(o.res.errors, fmt.Sprintf("%s %s: output %q lacks %q", time.Now().Format(time.TimeOnly), args[0], out, want))
			default:
				o.res.ok++
			}
			o.mu.Unlock()
		}
	}()
	go func() {
		defer o.wg.Done()
		kc, err := env.AdminKubeconfig(balancerAddr)
		if err != nil {
			return
		}
		for first := true; ctx.Err() == nil; first = false {
			if !first {
				o.mu.Lock()
				o.res.followRestarts++
				o.mu.Unlock()
			}
			cmd := exec.CommandContext(ctx, env.bin.kubectl, "--kubeconfig="+kc, "logs", "-f", "-n", "default", "ticker", "--tail=0")
			cmd.Env = append(os.Environ(), "HOME="+env.Dir)
			out, err := cmd.StdoutPipe()
			if err != nil {
				return
			}
			if err := cmd.Start(); err != nil {
				return
			}
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				o.mu.Lock()
				o.res.followLines++
				o.mu.Unlock()
			}
			_ = cmd.Wait()
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	return o
}

func (o *clientOps) stop() clientOpsResult {
	o.cancel()
	o.wg.Wait()
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.res
}

// apiErrorMarkers are what a failed request to the API looks like in the
// kubelet's log, besides the balancer's address in the failed URL (the
// kubelet's exec and port-forward streams to containerd are not API
// requests and do not count).
var apiErrorMarkers = []string{
	balancerAddr, "http2: client connection lost", "the server is currently unable",
	"Timeout: request did not complete", "the server was unable to return a response",
	"GOAWAY", "an error on the server",
}

// kubeletAPIErrors returns the warning and error lines of the kubelet's log
// between from and to that report a failed API request, and the number of
// watches that ended with an error (the reflector opens them again; no
// request failed).
func kubeletAPIErrors(path string, from, to time.Time) (failed []string, watches int) {
	f, err := os.Open(path)
	if err != nil {
		return []string{err.Error()}, 0
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		// klog: Lmmdd hh:mm:ss.uuuuuu PID file:line] message
		if len(line) < 21 || !strings.ContainsRune("IWE", rune(line[0])) {
			continue
		}
		ts, err := time.ParseInLocation("0102 15:04:05.000000", line[1:21], time.Local)
		if err != nil {
			continue
		}
		ts = ts.AddDate(from.Year(), 0, 0)
		if ts.Before(from) || ts.After(to) {
			continue
		}
		if strings.Contains(line, "Unexpected EOF during watch stream") ||
			(strings.Contains(line, "watch of") && strings.Contains(line, "ended with")) {
			watches++
			continue
		}
		if (line[0] == 'E' || line[0] == 'W') && containsAny(line, apiErrorMarkers) {
			failed = append(failed, line)
		}
	}
	return failed, watches
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// auditEvent is the part of an apiserver audit event the test reads.
type auditEvent struct {
	Stage          string    `json:"stage"`
	StageTimestamp time.Time `json:"stageTimestamp"`
	User           struct {
		Username string `json:"username"`
	} `json:"user"`
}

// kubeletRequests counts the kubelet's completed requests that apiserver ip
// served between from and to, from its audit log.
func kubeletRequests(ip string, from, to time.Time) int {
	f, err := os.Open(auditLog(ip))
	if err != nil {
		return 0
	}
	defer func() { _ = f.Close() }()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var ev auditEvent
		if json.Unmarshal(sc.Bytes(), &ev) != nil {
			continue
		}
		if ev.User.Username == "system:node:"+nodeName && ev.Stage == "ResponseComplete" &&
			!ev.StageTimestamp.Before(from) && !ev.StageTimestamp.After(to) {
			n++
		}
	}
	return n
}
