package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nodeReboot: the node loses power in the middle of a static pod upgrade,
// with both slots' manifests in place (the new pod started, the old one's
// manifest not yet removed), and comes back unattended: every container is
// killed with the kubelet, the kubelet starts again, both static pods come
// back and share the port, and the node turns Ready through the balancer.
// Then `extractedprism static-pod upgrade`, run again as docs/kubeadm.md
// says, finishes the upgrade, and a last one returns to the first slot.
func (c *cluster) nodeReboot(t *testing.T) {
	ep := filepath.Join(filepath.Dir(env.bin.kubectl), "extractedprism")
	manifests := env.path("manifests")
	c.waitMirrorPod(t, mirrorPod, func(p podObject) bool { return p.ready() })
	orig, err := os.ReadFile(filepath.Join(manifests, "extractedprism.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	// The interrupted upgrade: the second slot written by hand, as step 2
	// of the documented procedure does, and the first one left in place.
	next := reusePortArg.ReplaceAllString(string(orig), "${1}- --reuse-port=true\n${1}- --log-level=debug")
	next = strings.Replace(next, "\n  name: extractedprism\n", "\n  name: extractedprism-b\n", 1)
	if !strings.Contains(next, "name: extractedprism-b\n") || !strings.Contains(next, "--log-level=debug") {
		t.Fatalf("could not derive the second slot's manifest from:\n%s", orig)
	}
	if err := os.WriteFile(filepath.Join(manifests, "extractedprism-b.yaml"), []byte(next), 0o644); err != nil {
		t.Fatal(err)
	}
	c.waitMirrorPod(t, mirrorPodB, func(p podObject) bool { return p.ready() })

	// Power loss: the kubelet and every container die at once.
	c.kubelet.Kill()
	out, err := c.ctr("tasks", "ls", "-q")
	if err != nil {
		t.Fatalf("list the containers: %v\n%s", err, out)
	}
	for _, id := range strings.Fields(out) {
		if o, err := c.ctr("tasks", "kill", "--signal", "SIGKILL", id); err != nil && !strings.Contains(o, "not found") {
			t.Logf("kill container %s: %v %s", id, err, o)
		}
	}
	poll(t, "127.0.0.1:7445 closed with every container gone", time.Minute, 200*time.Millisecond, func() (bool, string) {
		conn, err := net.DialTimeout("tcp", balancerAddr, time.Second)
		if err == nil {
			_ = conn.Close()
			return false, "still accepting"
		}
		return errors.Is(err, syscall.ECONNREFUSED), err.Error()
	})

	// Boot: the kubelet starts again with the same static pod directory.
	start := time.Now()
	c.startKubelet(t)
	var answered time.Time
	// The node stays Ready for the node monitor's grace period without a
	// kubelet: what shows the node back is its lease, renewed by the new
	// kubelet through the balancer.
	ready := poll(t, "the node's lease renewed through the balancer after the restart", 5*time.Minute, 250*time.Millisecond, func() (bool, string) {
		c.checkAlive(t)
		if answered.IsZero() {
			if _, err := getStatus(adminAddr); err == nil {
				answered = time.Now()
			}
		}
		var l leaseObject
		if err := env.getObject(c.liveAPIServer(), "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/"+nodeName, &l); err != nil {
			return false, err.Error()
		}
		n, err := getNode(c.liveAPIServer())
		if err != nil {
			return false, err.Error()
		}
		r := n.ready()
		return !answered.IsZero() && l.Spec.RenewTime.After(start) && r.Status == "True",
			fmt.Sprintf("balancer answered: %v, lease renewed %s, Ready=%s %s", !answered.IsZero(), l.Spec.RenewTime.Format(time.TimeOnly), r.Status, r.Message)
	})
	// Both pods run again and share the port.
	poll(t, "both static pods listening on "+balancerAddr, 3*time.Minute, 250*time.Millisecond, func() (bool, string) {
		out, err := exec.Command("ss", "-Hltn", "sport = :7445").CombinedOutput()
		if err != nil {
			return false, fmt.Sprintf("ss: %v: %s", err, out)
		}
		n := len(strings.Split(strings.TrimSpace(string(out)), "\n"))
		return strings.TrimSpace(string(out)) != "" && n == 2, fmt.Sprintf("%d listening sockets:\n%s", n, out)
	})
	env.record("node restart with both static pod slots in place: kubelet start -> balancer answers %.1f s, -> node lease renewed through it %.1f s; both pods back on the port",
		answered.Sub(start).Seconds(), ready.Sub(start).Seconds())

	// Finishing the interrupted upgrade keeps the slot with the new manifest.
	file := env.path("reboot-finish.yaml")
	if err := os.WriteFile(file, []byte(next), 0o644); err != nil {
		t.Fatal(err)
	}
	c.runUpgrade(t, ep, file, manifests)
	if _, err := os.Stat(filepath.Join(manifests, "extractedprism.yaml")); !os.IsNotExist(err) {
		t.Fatalf("the finished upgrade left extractedprism.yaml in place (%v)", err)
	}
	// And back to the first slot and the shipped flags, for the scenarios
	// after this one.
	if err := os.WriteFile(file, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	c.runUpgrade(t, ep, file, manifests)
	c.waitMirrorPod(t, mirrorPod, func(p podObject) bool { return p.ready() })
}

// runUpgrade runs `extractedprism static-pod upgrade` and fails the test
// when it fails.
func (c *cluster) runUpgrade(t *testing.T, ep, manifest, dir string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, ep, "static-pod", "upgrade", "--manifest", manifest, "--manifest-dir", dir).CombinedOutput()
	t.Logf("extractedprism static-pod upgrade --manifest %s:\n%s", filepath.Base(manifest), out)
	if err != nil {
		t.Fatalf("extractedprism static-pod upgrade: %v", err)
	}
}
