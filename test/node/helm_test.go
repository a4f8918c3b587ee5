package node

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The DaemonSet's ports: the static pod holds 7445/7446 on the node (the
// kubelet needs it to reach the API at all), so the chart's pod listens
// beside it.
const (
	dsBindPort   = 7455
	dsHealthPort = 7456
	release      = "extractedprism"
	instanceSel  = "app.kubernetes.io/instance=" + release
	// dsPodSel selects the DaemonSet's pods only (the readiness
	// publisher's pods are of the release too).
	dsPodSel = "app.kubernetes.io/name=extractedprism," + instanceSel
	// publisherSel selects the readiness publisher's pods.
	publisherSel = "app.kubernetes.io/name=extractedprism-readiness-publisher," + instanceSel
	saUser       = "system:serviceaccount:kube-system:" + release
)

var (
	dsBalancerAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(dsBindPort))
	dsAdminAddr    = net.JoinHostPort("127.0.0.1", strconv.Itoa(dsHealthPort))
)

// chartDir is the chart under test.
func (c *cluster) chartDir() string { return filepath.Join(c.repo, "manifests/helm/extractedprism") }

// helmValues are the --set flags of the release: the image under test, the
// three apiservers as static endpoints, discovery on, the DaemonSet's ports.
func helmValues() []string {
	eps := make([]string, 0, len(apiserverIPs))
	for _, ip := range apiserverIPs {
		eps = append(eps, ip+":6443")
	}
	return []string{
		"--set", "image.repository=" + env.imageRepo,
		"--set", "image.tag=" + env.imageTag,
		"--set", "endpoints=" + strings.Join(eps, "\\,"),
		"--set", "enableDiscovery=true",
		"--set", fmt.Sprintf("bindPort=%d", dsBindPort),
		"--set", fmt.Sprintf("healthPort=%d", dsHealthPort),
	}
}

// helmRun runs helm (3 minutes at most) against a live apiserver.
func (c *cluster) helmRun(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	return env.helm(ctx, c.liveAPIServer(), args...)
}

// ensureRelease installs the chart when it is not installed and waits for
// its pod to be Ready.
func (c *cluster) ensureRelease(t *testing.T) podObject {
	t.Helper()
	if !c.release {
		args := append([]string{"install", release, c.chartDir(), "--namespace", "kube-system"}, helmValues()...)
		if out, err := c.helmRun(args...); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		c.release = true
	}
	return c.waitDSPod(t, "", 3*time.Minute)
}

// waitDSPod waits for exactly one Ready DaemonSet pod whose UID is not
// notUID, and returns it.
func (c *cluster) waitDSPod(t *testing.T, notUID string, timeout time.Duration) podObject {
	t.Helper()
	var pod podObject
	poll(t, "DaemonSet pod Ready", timeout, 500*time.Millisecond, func() (bool, string) {
		c.checkAlive(t)
		pods, err := listPods(c.liveAPIServer(), "kube-system", dsPodSel)
		if err != nil {
			return false, err.Error()
		}
		if len(pods) != 1 {
			return false, fmt.Sprintf("%d pods", len(pods))
		}
		pod = pods[0]
		return pod.Metadata.UID != notUID && pod.ready(), fmt.Sprintf("%s phase %s %+v", pod.Metadata.Name, pod.Status.Phase, pod.Status.ContainerStatuses)
	})
	return pod
}

// helmDaemonSet: helm install with discovery; the ServiceAccount has what
// discovery needs and nothing more; the pod turns Ready, discovers the three
// apiservers from the EndpointSlice and serves on its port.
func (c *cluster) helmDaemonSet(t *testing.T) {
	start := time.Now()
	pod := c.ensureRelease(t)
	env.record("helm install -> DaemonSet pod %s Ready: %.1f s", pod.Metadata.Name, time.Since(start).Seconds())
	checks := []struct {
		args []string
		want string
	}{
		{[]string{"get", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"list", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"watch", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		// The one slice the daemon reads, by name (resourceNames).
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"get", "endpointslices.discovery.k8s.io/kubernetes-extra", "-n", "default"}, "no"},
		{[]string{"create", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"delete", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", "kube-system"}, "no"},
		{[]string{"list", "secrets", "-n", "kube-system"}, "no"},
		{[]string{"list", "configmaps", "-n", "kube-system"}, "no"},
		{[]string{"list", "pods", "--all-namespaces"}, "no"},
		{[]string{"get", "nodes"}, "no"},
	}
	var summary []string
	for _, ch := range checks {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, _ := env.Kubectl(ctx, c.liveAPIServer(), "", append([]string{"auth", "can-i", "--as=" + saUser}, ch.args...)...)
		cancel()
		// The answer is the last line (kubectl may warn before it).
		lines := strings.Split(strings.TrimSpace(out), "\n")
		got := strings.TrimSpace(lines[len(lines)-1])
		if got != ch.want {
			t.Errorf("kubectl auth can-i --as=%s %s: %q, want %q", saUser, strings.Join(ch.args, " "), got, ch.want)
		}
		summary = append(summary, strings.Join(ch.args[:2], " ")+"="+got)
	}
	env.record("ServiceAccount %s can-i: %s", saUser, strings.Join(summary, ", "))
	var doc statusDoc
	poll(t, "DaemonSet pod discovers the three apiservers", 2*time.Minute, 500*time.Millisecond, func() (bool, string) {
		var err error
		doc, err = getStatus(dsAdminAddr)
		if err != nil {
			return false, err.Error()
		}
		found := 0
		for _, ip := range apiserverIPs {
			for _, d := range doc.Discovery.Discovered {
				if d == ip+":6443" {
					found++
				}
			}
		}
		return doc.Discovery.State == "synced" && found == len(apiserverIPs) && allUp(doc),
			fmt.Sprintf("discovery %s %v; %s", doc.Discovery.State, doc.Discovery.Discovered, doc.describe())
	})
	// The readiness publisher (in-cluster credentials, through the service
	// VIP) leads and publishes; the pod takes its readiness of each
	// apiserver from the shared verdicts.
	poll(t, "DaemonSet pod on the shared readiness verdicts", 3*time.Minute, time.Second, func() (bool, string) {
		pods, err := listPods(c.liveAPIServer(), "kube-system", publisherSel)
		if err != nil {
			return false, err.Error()
		}
		var phases []string
		for _, p := range pods {
			phases = append(phases, fmt.Sprintf("%s %s ready=%t restarts=%d", p.Metadata.Name, p.Status.Phase, p.ready(), p.restarts()))
		}
		doc, err = getStatus(dsAdminAddr)
		if err != nil {
			return false, err.Error()
		}
		shared := 0
		for _, u := range doc.Upstreams {
			if u.ReadinessShared {
				shared++
			}
		}
		return shared == len(apiserverIPs) && allUp(doc),
			fmt.Sprintf("%d of %d upstreams on shared readiness (%s); publisher pods %v", shared, len(doc.Upstreams), doc.describe(), phases)
	})
	env.record("helm install -> DaemonSet pod on the publisher's shared readiness for all %d apiservers: %.1f s", len(apiserverIPs), time.Since(start).Seconds())
	// It serves: an API request through the DaemonSet's port.
	req, err := http.NewRequest(http.MethodGet, "https://"+dsBalancerAddr+"/readyz", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+env.adminToken)
	resp, err := env.HTTPSClient().Do(req)
	if err != nil {
		t.Fatalf("GET /readyz through %s: %v", dsBalancerAddr, err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /readyz through %s: HTTP %d", dsBalancerAddr, resp.StatusCode)
	}
	env.record("DaemonSet pod: discovery %s %v; GET /readyz through %s: HTTP %d", doc.Discovery.State, doc.Discovery.Discovered, dsBalancerAddr, resp.StatusCode)
}

// renderedDaemonSet renders the chart's DaemonSet with the release's values
// (helm template) and converts it to JSON (kubectl, client side).
func (c *cluster) renderedDaemonSet(t *testing.T, extra ...string) map[string]any {
	t.Helper()
	args := append([]string{"template", release, c.chartDir(), "--namespace", "kube-system", "--show-only", "templates/daemonset.yaml"}, helmValues()...)
	out, err := c.helmRun(append(args, extra...)...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	js := env.MustKubectl(t, c.liveAPIServer(), out, "create", "--dry-run=client", "-o", "json", "-f", "-")
	var ds map[string]any
	if err := json.Unmarshal([]byte(js), &ds); err != nil {
		t.Fatal(err)
	}
	return ds
}

// dig walks a decoded JSON document.
func dig(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, _ := v.(map[string]any)
			v = m[k]
		case int:
			s, _ := v.([]any)
			if k >= len(s) {
				return nil
			}
			v = s[k]
		}
	}
	return v
}

// subset reports whether every key of want is in got with the same value
// (the API server adds defaults such as scheme and successThreshold).
func subset(want, got any) bool {
	wm, ok := want.(map[string]any)
	if !ok {
		return reflect.DeepEqual(want, got)
	}
	gm, ok := got.(map[string]any)
	if !ok {
		return false
	}
	for k, wv := range wm {
		if !subset(wv, gm[k]) {
			return false
		}
	}
	return true
}

// probesAndSecurityContext: the DaemonSet pod's process runs as the
// UID/GID the chart renders, with a read-only root file system, no
// capabilities, no new privileges and a seccomp filter (read from the
// kernel, /proc/PID/status and mountinfo); the probes the kubelet runs are
// the chart's, and the kubelet's probe counters show them succeeding.
func (c *cluster) probesAndSecurityContext(t *testing.T) {
	pod := c.ensureRelease(t)
	rendered := c.renderedDaemonSet(t)
	rc := dig(rendered, "spec", "template", "spec", "containers", 0)
	var running podObject
	if err := env.getObject(c.liveAPIServer(), "/api/v1/namespaces/kube-system/pods/"+pod.Metadata.Name, &running); err != nil {
		t.Fatal(err)
	}
	pc := any(running.Spec.Containers[0])
	for _, probe := range []string{"livenessProbe", "readinessProbe"} {
		want, got := dig(rc, probe), dig(pc, probe)
		if want == nil || !subset(want, got) {
			t.Errorf("%s: pod runs %v, chart renders %v", probe, got, want)
		}
	}
	sc := dig(rc, "securityContext")
	uid, _ := dig(sc, "runAsUser").(float64)
	gid, _ := dig(sc, "runAsGroup").(float64)
	if uid == 0 || gid == 0 {
		t.Fatalf("chart renders securityContext %v without runAsUser/runAsGroup", sc)
	}
	pid, err := findProcess(fmt.Sprintf("--bind-port=%d", dsBindPort))
	if err != nil {
		t.Fatal(err)
	}
	st, err := procStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	wantIDs := fmt.Sprintf("%d\t%d\t%d\t%d", int(uid), int(uid), int(uid), int(uid))
	wantGIDs := fmt.Sprintf("%d\t%d\t%d\t%d", int(gid), int(gid), int(gid), int(gid))
	for k, want := range map[string]string{
		"Uid": wantIDs, "Gid": wantGIDs, "CapInh": "0000000000000000", "CapPrm": "0000000000000000",
		"CapEff": "0000000000000000", "CapBnd": "0000000000000000", "CapAmb": "0000000000000000",
		"NoNewPrivs": "1", "Seccomp": "2",
	} {
		if st[k] != want {
			t.Errorf("pid %d %s: %q, want %q", pid, k, st[k], want)
		}
	}
	rootOpts, err := rootMountOptions(pid)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(","+rootOpts+",", ",ro,") {
		t.Errorf("pid %d root file system mounted %q, want ro", pid, rootOpts)
	}
	env.record("DaemonSet pod process %d: Uid %s Gid %s CapEff %s CapBnd %s NoNewPrivs %s Seccomp %s, / mounted %s",
		pid, strings.Fields(st["Uid"])[0], strings.Fields(st["Gid"])[0], st["CapEff"], st["CapBnd"], st["NoNewPrivs"], st["Seccomp"], rootOpts)
	// The kubelet's own probe counters for this pod.
	var first map[string]float64
	poll(t, "kubelet probe results for the pod", 90*time.Second, 2*time.Second, func() (bool, string) {
		counts, err := c.probeCounts(pod.Metadata.Name)
		if err != nil {
			return false, err.Error()
		}
		if first == nil {
			first = counts
			return false, "first sample"
		}
		ok := counts["Liveness/successful"] > first["Liveness/successful"] &&
			counts["Readiness/successful"] > first["Readiness/successful"]
		if ok {
			env.record("kubelet probe results for %s: %v", pod.Metadata.Name, counts)
			for k, v := range counts {
				if !strings.HasSuffix(k, "/successful") && v > 0 {
					t.Errorf("kubelet counted %v %s probes", v, k)
				}
			}
		}
		return ok, fmt.Sprintf("%v -> %v", first, counts)
	})
	env.record("probes the kubelet runs = chart's: liveness %v, readiness %v", dig(rc, "livenessProbe", "httpGet"), dig(rc, "readinessProbe", "httpGet"))
}

var probeMetric = regexp.MustCompile(`^prober_probe_total\{([^}]*)\} ([0-9.e+]+)$`)

// probeCounts reads the kubelet's prober_probe_total for pod (/metrics/probes
// through the API server's node proxy) as "Type/result" -> count.
func (c *cluster) probeCounts(pod string) (map[string]float64, error) {
	code, body, err := env.api(c.liveAPIServer(), http.MethodGet, "/api/v1/nodes/"+nodeName+"/proxy/metrics/probes", nil)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("kubelet metrics: HTTP %d", code)
	}
	out := map[string]float64{}
	for line := range strings.SplitSeq(string(body), "\n") {
		m := probeMetric.FindStringSubmatch(line)
		if m == nil || !strings.Contains(m[1], `pod="`+pod+`"`) {
			continue
		}
		labels := map[string]string{}
		for kv := range strings.SplitSeq(m[1], ",") {
			k, v, _ := strings.Cut(kv, "=")
			labels[k] = strings.Trim(v, `"`)
		}
		n, _ := strconv.ParseFloat(m[2], 64)
		out[labels["probe_type"]+"/"+labels["result"]] += n
	}
	return out, nil
}

// findProcess returns the PID of the one extractedprism process whose
// command line has arg.
func findProcess(arg string) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	var found []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(args) > 0 && filepath.Base(args[0]) == "extractedprism" && containsArg(args, arg) {
			found = append(found, pid)
		}
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("%d extractedprism processes with %s: %v", len(found), arg, found)
	}
	return found[0], nil
}

func containsArg(args []string, arg string) bool {
	for _, a := range args {
		if a == arg {
			return true
		}
	}
	return false
}

// procStatus reads /proc/PID/status as key -> value.
func procStatus(pid int) (map[string]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out, nil
}

// rootMountOptions returns the mount options of the process's "/".
func rootMountOptions(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return "", err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == "/" {
			return f[5], nil
		}
	}
	return "", fmt.Errorf("pid %d: no / in mountinfo", pid)
}

// configReload: a change of the chart's config value reaches the running
// pod through the ConfigMap without a restart; a key the chart does not
// know is refused by helm; a value the daemon refuses is kept out while the
// pod stays Ready, never a crash loop.
func (c *cluster) configReload(t *testing.T) {
	pod := c.ensureRelease(t)
	before, err := getStatus(dsAdminAddr)
	if err != nil {
		t.Fatal(err)
	}
	restarts := pod.restarts()
	upgrade := func(set ...string) (string, error) {
		args := []string{"upgrade", release, c.chartDir(), "--namespace", "kube-system", "--reuse-values"}
		for _, s := range set {
			args = append(args, "--set", s)
		}
		return c.helmRun(args...)
	}
	// 1. A good change.
	changed := time.Now()
	if out, err := upgrade("config.probe.rise=3"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var doc statusDoc
	applied := poll(t, "reload of config.probe.rise=3", 3*time.Minute, time.Second, func() (bool, string) {
		doc, err = getStatus(dsAdminAddr)
		if err != nil {
			return false, err.Error()
		}
		return doc.Config.LastReload.After(before.Config.LastReload) && doc.Config.LastReloadOK,
			fmt.Sprintf("last reload %s ok=%t %s", doc.Config.LastReload, doc.Config.LastReloadOK, doc.Config.LastReloadError)
	})
	logs := env.MustKubectl(t, c.liveAPIServer(), "", "logs", "-n", "kube-system", pod.Metadata.Name)
	if !strings.Contains(logs, "configuration reloaded") {
		t.Errorf("pod log has no \"configuration reloaded\":\n%s", logs)
	}
	c.checkSamePod(t, pod, restarts)
	env.record("config change via the chart's ConfigMap applied after %.1f s without restart (pod %s, restarts %d)",
		applied.Sub(changed).Seconds(), pod.Metadata.Name, restarts)

	// 2. A key the chart does not know: helm refuses.
	out, err := upgrade("config.probe_typo=1")
	if err == nil {
		t.Errorf("helm upgrade with config.probe_typo succeeded:\n%s", out)
	} else if !strings.Contains(out, "probe_typo") {
		t.Errorf("helm refused config.probe_typo without naming it:\n%s", out)
	}
	env.record("helm refuses config.probe_typo: %s", firstLine(out, "probe_typo"))

	// 3. A value only the daemon can judge: kept out, the pod stays up.
	last := doc.Config.LastReload
	if out, err := upgrade("config.probe.rise=0"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	poll(t, "config.probe.rise=0 refused by the daemon", 3*time.Minute, time.Second, func() (bool, string) {
		doc, err = getStatus(dsAdminAddr)
		if err != nil {
			return false, err.Error()
		}
		return doc.Config.LastReload.After(last) && !doc.Config.LastReloadOK,
			fmt.Sprintf("last reload %s ok=%t %s", doc.Config.LastReload, doc.Config.LastReloadOK, doc.Config.LastReloadError)
	})
	if !strings.Contains(doc.Config.LastReloadError, "probe.rise") {
		t.Errorf("reload error does not name probe.rise: %q", doc.Config.LastReloadError)
	}
	// Two liveness periods with the refused file in place.
	deadline := time.Now().Add(25 * time.Second)
	for time.Now().Before(deadline) {
		c.checkSamePod(t, pod, restarts)
		time.Sleep(2 * time.Second)
	}
	env.record("config.probe.rise=0: daemon keeps it out (%q), pod Ready, restarts %d", doc.Config.LastReloadError, restarts)
	// Back to a good configuration.
	if out, err := upgrade("config.probe.rise=2"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	last = doc.Config.LastReload
	poll(t, "reload of config.probe.rise=2", 3*time.Minute, time.Second, func() (bool, string) {
		doc, err = getStatus(dsAdminAddr)
		if err != nil {
			return false, err.Error()
		}
		return doc.Config.LastReload.After(last) && doc.Config.LastReloadOK, doc.Config.LastReloadError
	})
	c.checkSamePod(t, pod, restarts)
}

// checkSamePod fails unless the release's only pod is still pod, Ready and
// with the same restart count.
func (c *cluster) checkSamePod(t *testing.T, pod podObject, restarts int) {
	t.Helper()
	pods, err := listPods(c.liveAPIServer(), "kube-system", dsPodSel)
	if err != nil {
		t.Fatal(err)
	}
	if len(pods) != 1 || pods[0].Metadata.UID != pod.Metadata.UID || !pods[0].ready() || pods[0].restarts() != restarts {
		var got []string
		for _, p := range pods {
			got = append(got, fmt.Sprintf("%s ready=%t restarts=%d", p.Metadata.Name, p.ready(), p.restarts()))
		}
		t.Fatalf("want pod %s Ready with %d restarts, have %v", pod.Metadata.Name, restarts, got)
	}
}

// firstLine returns the first line of s containing sub.
func firstLine(s, sub string) string {
	for line := range strings.SplitSeq(s, "\n") {
		if strings.Contains(line, sub) {
			return strings.TrimSpace(line)
		}
	}
	return strings.TrimSpace(s)
}

// uninstall: helm uninstall leaves nothing of the chart in the cluster
// (every kind it creates, namespaced and cluster-scoped, by label and by
// name) nor on the node's ports.
func (c *cluster) uninstall(t *testing.T) {
	c.ensureRelease(t)
	leftovers := []string{
		"/api/v1/namespaces/kube-system/configmaps/" + release + "-readiness",
		"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/" + release + "-readiness-publisher",
	}
	poll(t, "the readiness publisher wrote its ConfigMap and Lease", 3*time.Minute, time.Second, func() (bool, string) {
		for _, p := range leftovers {
			if ok, err := exists(c.liveAPIServer(), p); err != nil || !ok {
				return false, fmt.Sprintf("%s: exists %t, err %v", p, ok, err)
			}
		}
		return true, ""
	})
	if out, err := c.helmRun("uninstall", release, "--namespace", "kube-system"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	c.release = false
	start := time.Now()
	kinds := "daemonsets,deployments,replicasets,controllerrevisions,pods,configmaps,serviceaccounts,roles,rolebindings,services,secrets"
	poll(t, "nothing of the release left", 3*time.Minute, time.Second, func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		ns, err := env.Kubectl(ctx, c.liveAPIServer(), "", "get", kinds, "--all-namespaces", "-l", instanceSel, "-o", "name")
		if err != nil {
			return false, err.Error()
		}
		cl, err := env.Kubectl(ctx, c.liveAPIServer(), "", "get", "clusterroles,clusterrolebindings", "-l", instanceSel, "-o", "name")
		if err != nil {
			return false, err.Error()
		}
		helmSecrets, err := env.Kubectl(ctx, c.liveAPIServer(), "", "get", "secrets", "-n", "kube-system", "-l", "owner=helm,name="+release, "-o", "name")
		if err != nil {
			return false, err.Error()
		}
		left := strings.TrimSpace(ns + cl + helmSecrets)
		return left == "", left
	})
	for _, p := range []string{
		"/apis/apps/v1/namespaces/kube-system/daemonsets/" + release,
		"/api/v1/namespaces/kube-system/configmaps/" + release,
		"/api/v1/namespaces/kube-system/serviceaccounts/" + release,
		"/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles/" + release,
		"/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings/" + release,
	} {
		if ok, err := exists(c.liveAPIServer(), p); err != nil || ok {
			t.Errorf("%s still there (err %v)", p, err)
		}
	}
	// What the chart's README says helm uninstall leaves: the shared
	// readiness ConfigMap and the publisher's Lease, which the publisher
	// wrote itself; its commands remove them.
	for _, p := range leftovers {
		if ok, err := exists(c.liveAPIServer(), p); err != nil || !ok {
			t.Errorf("%s: not left after uninstall (err %v), as the chart's README says it is", p, err)
		}
	}
	for _, args := range [][]string{
		{"-n", "kube-system", "delete", "configmap", release + "-readiness"},
		{"-n", "kube-system", "delete", "lease", release + "-readiness-publisher"},
	} {
		env.MustKubectl(t, c.liveAPIServer(), "", args...)
	}
	for _, p := range leftovers {
		if ok, err := exists(c.liveAPIServer(), p); err != nil || ok {
			t.Errorf("%s still there after the README's kubectl delete (err %v)", p, err)
		}
	}
	for _, addr := range []string{dsBalancerAddr, dsAdminAddr} {
		conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			_ = conn.Close()
			t.Errorf("%s still accepts connections after uninstall", addr)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %v, want connection refused", addr, err)
		}
	}
	if p, err := getPod(c.liveAPIServer(), "kube-system", mirrorPod); err != nil || !p.ready() {
		t.Errorf("static pod not Ready after uninstall (err %v)", err)
	}
	env.record("helm uninstall: no DaemonSet, Deployment, ReplicaSet, ControllerRevision, Pod, ConfigMap, ServiceAccount, Role, RoleBinding, Service, release Secret, ClusterRole(Binding) left after %.1f s; the readiness ConfigMap and Lease left, as documented, until deleted; ports %d/%d closed",
		time.Since(start).Seconds(), dsBindPort, dsHealthPort)
}

// tlsDialer opens a TLS connection through addr to an apiserver.
func tlsDial(addr string) error {
	d := &net.Dialer{Timeout: 2 * time.Second}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	tc := tls.Client(conn, &tls.Config{RootCAs: env.caPool, ServerName: "kubernetes", MinVersion: tls.VersionTLS12})
	return tc.Handshake()
}
