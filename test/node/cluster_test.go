package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	harness "github.com/extractedprism/extractedprism/test/cluster"
)

// Ports of the static pod's balancer (the kubeadm manifest's defaults).
const (
	balancerAddr = "127.0.0.1:7445"
	adminAddr    = "127.0.0.1:7446"
)

// toolsImage is the test's own image: the sandbox (pause) image and the
// workload image of the node.
const toolsImage = "localhost/node-e2e/tools:1"

// cluster is the control plane and the node of one run.
type cluster struct {
	etcd       *proc
	apiservers []*apiserver
	containerd *proc
	kubelet    *proc
	cm, sched  *proc
	sock       string
	repo       string
	release    bool // the Helm release is installed
}

// startCluster brings up etcd, the apiservers, containerd with the images
// and the node directories; the kubelet is started by bootNode.
func startCluster(t *testing.T) *cluster {
	t.Helper()
	repo := os.Getenv("EP_NODE_REPO")
	if repo == "" {
		repo = "../.."
	}
	abs, err := filepath.Abs(repo)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{repo: abs, sock: env.path("containerd.sock")}
	if err := setupHostMounts(); err != nil {
		t.Fatalf("host mounts: %v", err)
	}
	// New connections queued on a closing SO_REUSEPORT listener move to
	// another listener of the group (the DaemonSet's surge upgrade).
	// EP_NODE_TCP_MIGRATE_REQ=0 shows what a kernel without it does.
	migrate := "1"
	if v := os.Getenv("EP_NODE_TCP_MIGRATE_REQ"); v != "" {
		migrate = v
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte(migrate), 0o644); err != nil {
		env.record("tcp_migrate_req not available in the test namespace: %v", err)
	}
	if err := os.WriteFile(env.path("audit-policy.yaml"), []byte(auditPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	c.startEtcd(t)
	for _, ip := range apiserverIPs {
		c.apiservers = append(c.apiservers, c.startAPIServer(t, ip))
	}
	for _, a := range c.apiservers {
		c.waitAPIServer(t, a, 3*time.Minute)
	}
	c.startServiceVIP(t)
	c.startContainerd(t)
	c.importImages(t)
	return c
}

// hostFiles maps the host paths the manifests reference to the work
// directory's stand-ins.
func hostDir(p string) string {
	return env.path("host", strings.ReplaceAll(strings.Trim(p, "/"), "/", "-"))
}

// kernelTunables are the settings the kubelet checks (and would otherwise
// write on the host) with the values it wants.
var kernelTunables = map[string]string{
	"/proc/sys/vm/overcommit_memory":      "1",
	"/proc/sys/vm/panic_on_oom":           "0",
	"/proc/sys/kernel/panic":              "10",
	"/proc/sys/kernel/panic_on_oops":      "1",
	"/proc/sys/kernel/keys/root_maxkeys":  "1000000",
	"/proc/sys/kernel/keys/root_maxbytes": "25000000",
}

// setupHostMounts bind-mounts the work directory's stand-ins over the host
// paths, in the test's own mount namespace.
func setupHostMounts() error {
	// Keep every mount made here out of the host's namespace.
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("make / a slave mount: %w", err)
	}
	for _, p := range hostMountpoints {
		d := hostDir(p)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := syscall.Mount(d, p, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", d, p, err)
		}
	}
	if err := remountCgroups(); err != nil {
		return err
	}
	// Pod network namespaces are files in /run/netns: keep them here too.
	if err := os.MkdirAll("/run/netns", 0o755); err != nil {
		return err
	}
	if err := syscall.Mount("tmpfs", "/run/netns", "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("tmpfs on /run/netns: %w", err)
	}
	for p, v := range kernelTunables {
		f := env.path("host", "sysctl-"+strings.ReplaceAll(strings.TrimPrefix(p, "/proc/sys/"), "/", "-"))
		if err := os.WriteFile(f, []byte(v+"\n"), 0o644); err != nil {
			return err
		}
		if err := syscall.Mount(f, p, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", f, p, err)
		}
	}
	return nil
}

// remountCgroups mounts the host's cgroup hierarchies again: ip netns exec
// mounts a fresh /sys for the namespace, without /sys/fs/cgroup's mounts. The
// same controllers mounted again attach to the same hierarchies.
func remountCgroups() error {
	b, err := os.ReadFile("/proc/1/mountinfo")
	if err != nil {
		return fmt.Errorf("host mounts: %w", err)
	}
	type mnt struct{ point, fstype, opts string }
	var mounts []mnt
	for line := range strings.SplitSeq(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 3 || !strings.HasPrefix(f[4], "/sys/fs/cgroup/") {
			continue
		}
		if g[0] == "cgroup" || g[0] == "cgroup2" {
			mounts = append(mounts, mnt{f[4], g[0], g[2]})
		}
	}
	if len(mounts) == 0 {
		return fmt.Errorf("no cgroup hierarchy under /sys/fs/cgroup in /proc/1/mountinfo")
	}
	if err := syscall.Mount("tmpfs", "/sys/fs/cgroup", "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("tmpfs on /sys/fs/cgroup: %w", err)
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.point, 0o755); err != nil {
			return err
		}
		opts := strings.TrimPrefix(strings.TrimPrefix(m.opts, "rw,"), "rw")
		if err := syscall.Mount(m.fstype, m.point, m.fstype, 0, opts); err != nil {
			return fmt.Errorf("mount %s %s (%s): %w", m.fstype, m.point, opts, err)
		}
	}
	return nil
}

// startEtcd starts etcd and waits for it to be healthy; its data goes
// when the test ends.
func (c *cluster) startEtcd(t *testing.T) {
	t.Helper()
	t.Cleanup(env.RemoveEtcdData)
	if err := env.StartEtcd(); err != nil {
		t.Fatal(err)
	}
	c.etcd = env.Etcd
}

// startAPIServer starts a kube-apiserver on ip (not waiting for it), with
// the node's authorizer and admission, its client certificate for the
// kubelets and an audit log of the kubelet's requests.
func (c *cluster) startAPIServer(t *testing.T, ip string) *apiserver {
	t.Helper()
	a, err := env.StartAPIServer(ip,
		"--kubelet-client-certificate="+env.apiKubeletClientCert,
		"--kubelet-client-key="+env.apiKubeletClientKey,
		"--kubelet-preferred-address-types=InternalIP",
		"--enable-admission-plugins=NodeRestriction",
		"--audit-policy-file="+env.path("audit-policy.yaml"),
		"--audit-log-path="+auditLog(ip),
		"--audit-log-maxsize=100")
	if err != nil {
		t.Fatal(err)
	}
	c.showTail(t, a.P)
	return a
}

// auditPolicy records the kubelet's requests only (which apiserver served
// which request).
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["system:node:` + nodeName + `"]
- level: None
`

// auditLog is apiserver ip's audit log.
func auditLog(ip string) string { return env.path("logs", "audit-"+ip+".log") }

// restart starts a stopped apiserver again with the same arguments.
func (c *cluster) restartAPIServer(t *testing.T, a *apiserver) {
	t.Helper()
	b, err := env.StartAPIServer(a.IP, a.Extra...)
	if err != nil {
		t.Fatal(err)
	}
	c.showTail(t, b.P)
	*a = *b
}

// run starts a process for the whole run and shows its log tail when the
// test failed.
func (c *cluster) run(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	p, err := env.Start(name, bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	c.showTail(t, p)
	return p
}

// showTail shows the last lines of p's log when t failed.
func (c *cluster) showTail(t *testing.T, p *proc) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", p.Name, p.Tail(25))
		}
	})
}

// waitAPIServer waits for /readyz of a.
func (c *cluster) waitAPIServer(t *testing.T, a *apiserver, timeout time.Duration) time.Time {
	t.Helper()
	return poll(t, a.P.Name+" ready", timeout, 200*time.Millisecond, func() (bool, string) {
		if !a.P.Running() {
			t.Fatalf("%s exited: %v\n%s", a.P.Name, a.P.Err, a.P.Tail(30))
		}
		code, _, err := env.api(a.Addr(), http.MethodGet, "/readyz", nil)
		if err != nil {
			return false, err.Error()
		}
		return code == http.StatusOK, fmt.Sprintf("HTTP %d", code)
	})
}

// api sends a request with the admin token to server (host:port).
func (e *environment) api(server, method, path string, body []byte) (int, []byte, error) {
	req, err := http.NewRequest(method, "https://"+server+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+e.adminToken)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := e.HTTPSClient().Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// getObject GETs path from server and decodes it into v.
func (e *environment) getObject(server, path string, v any) error {
	code, b, err := e.api(server, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("GET %s: HTTP %d: %s", path, code, strings.TrimSpace(string(b)))
	}
	return json.Unmarshal(b, v)
}

// liveAPIServer returns the address of an apiserver that is running.
func (c *cluster) liveAPIServer() string {
	for _, a := range c.apiservers {
		if a.P.Running() {
			return a.Addr()
		}
	}
	return c.apiservers[0].Addr()
}

// containerdConfig is containerd's configuration: everything under the
// work directory, the test's own sandbox image, runc with cgroupfs, CNI
// from Debian's containernetworking-plugins, OOM score adjustments clamped.
const containerdConfig = `version = 2
root = "%[1]s/containerd/root"
state = "%[1]s/containerd/state"
[grpc]
  address = "%[2]s"
[ttrpc]
  address = "%[1]s/containerd/ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "%[1]s/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "%[3]s"
  enable_selinux = false
  # The kubelet asks for negative OOM score adjustments (-998 for the pod
  # sandbox); lowering one needs CAP_SYS_RESOURCE, which the machines this
  # runs on do not grant. Clamp them at containerd's own score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "%[1]s/cni/net.d"
`

// cniConfig is a bridge network on TEST-NET-3 inside the test namespace.
// Pods route everything through the bridge, so they reach the apiservers
// and the service VIP, both local addresses of the test namespace.
const cniConfig = `{
  "cniVersion": "0.4.0",
  "name": "node-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "203.0.113.0/24"}]],
        "dataDir": "%s/cni/ipam"
      }
    }
  ]
}
`

// startContainerd writes containerd's and CNI's configuration, starts
// containerd and waits for its socket.
func (c *cluster) startContainerd(t *testing.T) {
	t.Helper()
	if err := os.MkdirAll(env.path("cni", "net.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env.path("cni", "net.d", "10-node-e2e.conflist"), fmt.Appendf(nil, cniConfig, env.Dir), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := env.path("containerd.toml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, containerdConfig, env.Dir, c.sock, toolsImage), 0o644); err != nil {
		t.Fatal(err)
	}
	c.containerd = c.run(t, "containerd", env.bin.containerd, "--config", cfg)
	poll(t, "containerd socket", time.Minute, 200*time.Millisecond, func() (bool, string) {
		if !c.containerd.Running() {
			t.Fatalf("containerd exited: %v\n%s", c.containerd.Err, c.containerd.Tail(30))
		}
		out, err := c.ctr("version")
		return err == nil, out
	})
}

// ctr runs ctr against the test's containerd in the k8s.io namespace.
func (c *cluster) ctr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.bin.ctr, append([]string{"--address", c.sock, "--namespace", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// importImages imports the image under test and the tools image into
// containerd's k8s.io namespace (nothing is pulled from a registry), after
// checking that the archive's tag is the tag the manifests are rendered with.
func (c *cluster) importImages(t *testing.T) {
	t.Helper()
	name, tag, err := archiveRef(env.imageTar)
	if err != nil {
		t.Fatal(err)
	}
	want := env.imageRepo + ":" + env.imageTag
	if name != want || tag != env.imageTag {
		t.Fatalf("image archive %s is %s (tag %q); the manifests are rendered with %s", env.imageTar, name, tag, want)
	}
	env.record("image archive tag %s = tag rendered into the kubeadm manifest and the chart", name)
	tools := env.path("tools-image.oci.tar")
	if err := writeToolsImage(tools, env.bin.nodetools, toolsImage); err != nil {
		t.Fatal(err)
	}
	for _, tar := range []string{env.imageTar, tools} {
		if out, err := c.ctr("images", "import", "--platform", "linux/amd64", tar); err != nil {
			t.Fatalf("import %s: %v\n%s", tar, err, out)
		}
	}
	out, err := c.ctr("images", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{want, toolsImage} {
		if !strings.Contains("\n"+out, "\n"+ref+"\n") {
			t.Fatalf("%s not in containerd after import:\n%s", ref, out)
		}
	}
}

// kubeletConfig is the kubelet's configuration file. failCgroupV1: false
// because the machines this runs on are cgroup v1; protectKernelDefaults
// because the kernel settings are the test's own bind mounts (the kubelet
// fails instead of writing the host's).
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %[2]s
containerRuntimeEndpoint: unix://%[3]s
staticPodPath: %[1]s/manifests
podLogsDir: %[1]s/pod-logs
address: %[4]s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: %[5]s
tlsPrivateKeyFile: %[6]s
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %[7]s
authorization:
  mode: Webhook
clusterDomain: cluster.local
resolvConf: %[1]s/resolv.conf
failSwapOn: false
protectKernelDefaults: true
syncFrequency: 10s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 10s
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
`

// startKubelet writes the kubelet's configuration and kubeconfig (server
// https://127.0.0.1:7445 with tls-server-name kubernetes, as docs/kubeadm.md
// says) and starts it.
func (c *cluster) startKubelet(t *testing.T) {
	t.Helper()
	for _, d := range []string{"manifests", "pod-logs", "kubelet"} {
		if err := os.MkdirAll(env.path(d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(env.path("resolv.conf"), []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := env.path("kubelet.yaml")
	doc := fmt.Sprintf(kubeletConfig, env.Dir, cgroupRoot, c.sock, nodeIP,
		env.kubeletServingCert, env.kubeletServingKey, env.caFile)
	if err := os.WriteFile(cfg, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	kc, err := env.Kubeconfig("kubelet", harness.Kubeconfig{Server: "https://" + balancerAddr, ServerName: "kubernetes",
		Cert: env.kubeletClientCert, Key: env.kubeletClientKey})
	if err != nil {
		t.Fatal(err)
	}
	c.kubelet = c.run(t, "kubelet", env.bin.kubelet, "--config="+cfg, "--kubeconfig="+kc,
		"--root-dir="+env.path("kubelet"), "--hostname-override="+nodeName, "--node-ip="+nodeIP, "--v=2")
}

// startControllers starts kube-controller-manager and kube-scheduler, which
// also reach the API through the node's balancer.
func (c *cluster) startControllers(t *testing.T) {
	t.Helper()
	cm, err := env.Kubeconfig("controller-manager", harness.Kubeconfig{Server: "https://" + balancerAddr, ServerName: "kubernetes", Token: env.cmToken})
	if err != nil {
		t.Fatal(err)
	}
	sched, err := env.Kubeconfig("scheduler", harness.Kubeconfig{Server: "https://" + balancerAddr, ServerName: "kubernetes", Token: env.schedToken})
	if err != nil {
		t.Fatal(err)
	}
	c.cm = c.run(t, "kube-controller-manager", env.bin.controllerManager,
		"--kubeconfig="+cm, "--authentication-kubeconfig="+cm, "--authorization-kubeconfig="+cm,
		"--leader-elect=false", "--use-service-account-credentials=true",
		"--service-account-private-key-file="+env.SAKeyFile, "--root-ca-file="+env.caFile,
		"--bind-address=127.0.0.1", "--secure-port=10257", "--profiling=false")
	c.sched = c.run(t, "kube-scheduler", env.bin.scheduler,
		"--kubeconfig="+sched, "--authentication-kubeconfig="+sched, "--authorization-kubeconfig="+sched,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259", "--profiling=false")
}

// checkAlive fails the test when a component of the cluster exited.
func (c *cluster) checkAlive(t *testing.T) {
	t.Helper()
	for _, p := range []*proc{c.etcd, c.containerd, c.kubelet, c.cm, c.sched} {
		if p != nil && !p.Running() {
			t.Fatalf("%s exited: %v\n%s", p.Name, p.Err, p.Tail(30))
		}
	}
}
