package node

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// connectCounts are the results of the clients' connects.
type connectCounts struct {
	total, ok, refused, reset, other int
	// slow counts connects (TCP and TLS handshake) that took over 1 s;
	// maxLatency is the slowest successful one.
	slow       int
	maxLatency time.Duration
	// firstFail and lastFail bound the failed connects in time.
	firstFail, lastFail time.Time
	errs                []string
}

// connectLoad opens TLS connections through addr until stopped.
type connectLoad struct {
	stopCh chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	c      connectCounts
}

func startConnectLoad(addr string, workers int) *connectLoad {
	l := &connectLoad{stopCh: make(chan struct{})}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stopCh:
					return
				default:
				}
				began := time.Now()
				err := tlsDial(addr)
				took := time.Since(began)
				l.mu.Lock()
				l.c.total++
				if took > time.Second {
					l.c.slow++
				}
				if err == nil {
					l.c.maxLatency = max(l.c.maxLatency, took)
				} else {
					if l.c.firstFail.IsZero() {
						l.c.firstFail = began
					}
					l.c.lastFail = began
				}
				switch {
				case err == nil:
					l.c.ok++
				case errors.Is(err, syscall.ECONNREFUSED):
					l.c.refused++
				case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF):
					l.c.reset++
				default:
					l.c.other++
				}
				if err != nil && len(l.c.errs) < 10 {
					l.c.errs = append(l.c.errs, time.Now().Format(time.TimeOnly)+" "+err.Error())
				}
				l.mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *connectLoad) stop() connectCounts {
	close(l.stopCh)
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.c
}

// surgeUpgrade: with maxSurge 1 / maxUnavailable 0, a helm upgrade that
// changes the pod template starts the new pod beside the old one, while
// clients on the node keep opening connections through the DaemonSet's
// port; refused or reset connects are counted (target 0).
func (c *cluster) surgeUpgrade(t *testing.T) {
	c.ensureRelease(t)
	// Pods of a release without a surge bind without SO_REUSEPORT, so a
	// surged pod could not bind next to them: first roll them with
	// reusePort on (old pod stopped first), as the chart's README says.
	first := c.waitDSPod(t, "", 2*time.Minute)
	args := []string{"upgrade", release, c.chartDir(), "--namespace", "kube-system", "--reuse-values",
		"--set", "reusePort=true"}
	if out, err := c.helmRun(args...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	c.waitDSPod(t, first.Metadata.UID, 3*time.Minute)
	args = []string{"upgrade", release, c.chartDir(), "--namespace", "kube-system", "--reuse-values",
		"--set", "updateStrategy.maxSurge=1", "--set", "updateStrategy.maxUnavailable=0"}
	if out, err := c.helmRun(args...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// The strategy alone does not roll the pods (reusePort is already on).
	old := c.waitDSPod(t, "", 2*time.Minute)
	migrate, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	load := startConnectLoad(dsBalancerAddr, 2)
	time.Sleep(3 * time.Second) // a baseline with one pod
	start := time.Now()
	args = []string{"upgrade", release, c.chartDir(), "--namespace", "kube-system", "--reuse-values",
		"--set-string", "podAnnotations.node-e2e/rollout=" + start.Format("150405")}
	if out, err := c.helmRun(args...); err != nil {
		load.stop()
		t.Fatalf("%v\n%s", err, out)
	}
	var overlapStart, overlapEnd time.Time
	var newPod podObject
	maxRunning := 0
	poll(t, "rollout to a new pod", 4*time.Minute, 250*time.Millisecond, func() (bool, string) {
		pods, err := listPods(c.liveAPIServer(), "kube-system", dsPodSel)
		if err != nil {
			return false, err.Error()
		}
		running, oldThere := 0, false
		var desc []string
		for _, p := range pods {
			if p.Status.Phase == "Running" {
				running++
			}
			if p.Metadata.UID == old.Metadata.UID {
				oldThere = true
			} else {
				newPod = p
			}
			desc = append(desc, fmt.Sprintf("%s(%s ready=%t)", p.Metadata.Name, p.Status.Phase, p.ready()))
		}
		maxRunning = max(maxRunning, running)
		if running >= 2 && overlapStart.IsZero() {
			overlapStart = time.Now()
		}
		if running < 2 && !overlapStart.IsZero() && overlapEnd.IsZero() {
			overlapEnd = time.Now()
		}
		return !oldThere && len(pods) == 1 && newPod.ready(), strings.Join(desc, " ")
	})
	done := time.Now()
	time.Sleep(3 * time.Second) // and a tail with the new pod alone
	counts := load.stop()
	env.record("surge upgrade (maxSurge 1, maxUnavailable 0, tcp_migrate_req %s): %d connects, %d ok, %d refused, %d reset, %d other; old and new pod both Running for %.1f s; rollout %.1f s",
		strings.TrimSpace(string(migrate)), counts.total, counts.ok, counts.refused, counts.reset, counts.other,
		overlapEnd.Sub(overlapStart).Seconds(), done.Sub(start).Seconds())
	for _, e := range counts.errs {
		t.Logf("connect: %s", e)
	}
	if maxRunning < 2 || overlapStart.IsZero() {
		t.Errorf("the new pod never ran beside the old one (at most %d Running)", maxRunning)
	}
	if counts.ok < 50 {
		t.Errorf("only %d successful connects during the upgrade", counts.ok)
	}
	if counts.refused+counts.reset+counts.other > 0 {
		t.Errorf("%d refused, %d reset, %d other failed connects during the surge upgrade, want 0: %v",
			counts.refused, counts.reset, counts.other, counts.errs)
	}
}
