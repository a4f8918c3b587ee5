package cluster

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// netns is where the control plane test runs: as root, TestMain runs the
// tests again inside it; otherwise only the tests that need no root run.
var netns = &Netns{
	Prefix: "ep-cluster", Tag: "cluster", EnvVar: "EP_CLUSTER_NETNS",
	Addrs: []string{APIServerIPv4[0], APIServerIPv6[0], GatewayIPv4},
}

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 && !netns.Inside() {
		os.Exit(netns.Run())
	}
	if netns.Inside() {
		if err := netns.CheckInside(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster:", err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

func TestFamilies(t *testing.T) {
	for _, c := range []struct{ ip, prefix, cidr string }{
		{"198.51.100.11", "198.51.100.11/32", ServiceCIDRv4},
		{"fd00::11", "fd00::11/128", ServiceCIDRv6},
	} {
		if got := HostPrefix(c.ip); got != c.prefix {
			t.Errorf("HostPrefix(%s) = %s, want %s", c.ip, got, c.prefix)
		}
		if got := ServiceCIDR(c.ip); got != c.cidr {
			t.Errorf("ServiceCIDR(%s) = %s, want %s", c.ip, got, c.cidr)
		}
	}
	for cidr, ip := range map[string]string{ServiceCIDRv4: ServiceIPv4, ServiceCIDRv6: ServiceIPv6} {
		_, n, err := net.ParseCIDR(cidr)
		if err != nil || !n.Contains(net.ParseIP(ip)) {
			t.Errorf("service IP %s not in %s (%v)", ip, cidr, err)
		}
	}
	if got := hostLabel("fd00::11"); got != "fd00--11" {
		t.Errorf("hostLabel(fd00::11) = %q", got)
	}
}

// TestCertificates checks that the CA's certificates verify for the names
// and addresses of both families they carry, and for nothing else.
func TestCertificates(t *testing.T) {
	ca, err := NewCA(t.TempDir(), "test-ca")
	if err != nil {
		t.Fatal(err)
	}
	crt, _, err := ca.Issue("server", CertSpec{CN: "kube-apiserver", DNS: ServiceDNSNames,
		IPs: []string{APIServerIPv4[0], APIServerIPv6[0]}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(crt)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM block", crt)
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"kubernetes", APIServerIPv4[0], APIServerIPv6[0], "[" + APIServerIPv6[0] + "]"} {
		host := strings.Trim(name, "[]")
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: host, Roots: ca.Pool}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: APIServerIPv6[1], Roots: ca.Pool}); err == nil {
		t.Errorf("certificate verifies for %s, which it does not name", APIServerIPv6[1])
	}
	if _, _, err := ca.Issue("bad", CertSpec{CN: "x", IPs: []string{"not-an-ip"}}); err == nil {
		t.Error("Issue accepted an IP address that is none")
	}
}

func TestDiscoveryRBAC(t *testing.T) {
	if got := DiscoveryRBAC(); strings.Contains(got, "resourceNames") || !strings.Contains(got, "name: "+DiscoveryUser+"\n") {
		t.Errorf("DiscoveryRBAC() without names:\n%s", got)
	}
	if got := DiscoveryRBAC("kubernetes", "other"); !strings.Contains(got, `  resourceNames: ["kubernetes", "other"]`+"\n  verbs:") {
		t.Errorf("DiscoveryRBAC(kubernetes, other):\n%s", got)
	}
}

func TestKubeconfigFiles(t *testing.T) {
	dir := t.TempDir()
	a, err := WriteKubeconfigFile(dir, "admin", "doc a\n")
	if err != nil {
		t.Fatal(err)
	}
	again, err := WriteKubeconfigFile(dir, "admin", "doc a\n")
	if err != nil {
		t.Fatal(err)
	}
	b, err := WriteKubeconfigFile(dir, "admin", "doc b\n")
	if err != nil {
		t.Fatal(err)
	}
	if a != again || a == b {
		t.Fatalf("paths %s, %s, %s: want the same for the same content, another for other content", a, again, b)
	}
	if got, _ := os.ReadFile(b); string(got) != "doc b\n" {
		t.Fatalf("%s holds %q", b, got)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "*.tmp"))
	if len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
}

func TestProcs(t *testing.T) {
	dir := t.TempDir()
	ps := &Procs{Dir: dir, LogDir: filepath.Join(dir, "logs")}
	p, err := ps.Start("echo", "sh", "-c", `echo "one $HOME"; echo two; exec sleep 600`)
	if err != nil {
		t.Fatal(err)
	}
	Poll(t, "two lines logged", time.Minute, 20*time.Millisecond, func() (bool, string) {
		tail := p.Tail(2)
		return strings.HasSuffix(tail, "one "+dir+"\ntwo"), tail
	})
	if !p.Running() {
		t.Fatalf("exited early: %v", p.Err)
	}
	if err := p.Wait(10 * time.Millisecond); err == nil {
		t.Fatal("Wait returned no error while the process runs")
	}
	q, err := ps.Start("term", "sh", "-c", "exit 3")
	if err != nil {
		t.Fatal(err)
	}
	<-q.Done()
	if q.Err == nil || !strings.Contains(q.Err.Error(), "exit status 3") {
		t.Fatalf("exit error %v, want exit status 3", q.Err)
	}
	p.Signal(syscall.SIGTERM)
	if err := p.Wait(time.Minute); err == nil || p.Running() {
		t.Fatalf("after SIGTERM: running %v, error %v", p.Running(), err)
	}
	if got := len(ps.List()); got != 2 {
		t.Fatalf("%d processes listed, want 2", got)
	}
	ps.KillAll()
}

// controlPlane makes an environment and starts etcd, for the tests that
// need root.
func controlPlane(t *testing.T) *Env {
	t.Helper()
	if !netns.Inside() {
		t.Skip("needs root (a network namespace of its own)")
	}
	o := ModuleOptions("cluster", "EP_CLUSTER")
	o.Programs, o.Hosts = nil, true
	e, err := NewEnv(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close(os.Getenv("EP_CLUSTER_KEEP") != "") })
	if err := e.StartEtcd(); err != nil {
		t.Fatal(err)
	}
	return e
}

// TestIPv6ControlPlane brings up etcd and one kube-apiserver that listens
// on an IPv6 address only, and checks what a user sees: /readyz, and the
// kubernetes Service and EndpointSlice of the IPv6 family.
func TestIPv6ControlPlane(t *testing.T) {
	e := controlPlane(t)
	ip := APIServerIPv6[0]
	a := e.RunAPIServer(t, ip)
	e.WaitReady(t, a)
	if a.Addr() != "[fd00::11]:6443" {
		t.Fatalf("address %s", a.Addr())
	}
	if got := e.MustKubectl(t, a.Addr(), "", "get", "--raw", "/readyz"); got != "ok" {
		t.Fatalf("kubectl get --raw /readyz: %q", got)
	}
	out := e.MustKubectl(t, a.Addr(), "", "get", "service", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}")
	if out != ServiceIPv6 {
		t.Fatalf("kubernetes Service ClusterIP %q, want %s", out, ServiceIPv6)
	}
	sp := e.PollSlice(t, []string{ip})
	sp.WaitFor(t, "the apiserver's IPv6 address", time.Now(), 2*time.Minute, func(s []string) bool {
		return slices.Equal(s, []string{a.Addr()})
	})
	out = e.MustKubectl(t, a.Addr(), "", "get", "endpointslice", "kubernetes", "-n", "default", "-o", "jsonpath={.addressType}")
	if out != "IPv6" {
		t.Fatalf("kubernetes EndpointSlice addressType %q, want IPv6", out)
	}
}

// TestDualStackHost runs a kube-apiserver on a host of its own (AddHost)
// and reaches it on both of the host's addresses, from the test namespace.
func TestDualStackHost(t *testing.T) {
	e := controlPlane(t)
	h := e.AddHost(t, netns, 0)
	a := e.RunHostAPIServer(t, h, h.IPv4, "--etcd-prefix=/registry-dual",
		"--service-cluster-ip-range="+ServiceCIDRv4+","+ServiceCIDRv6)
	a6 := &APIServer{IP: h.IPv6, P: a.P}
	e.WaitReady(t, a, a6)
	for _, s := range []*APIServer{a, a6} {
		if got := e.MustKubectl(t, s.Addr(), "", "get", "endpointslice", "kubernetes", "-n", "default", "-o", "jsonpath={.addressType} {.endpoints[*].addresses[*]}"); got != "IPv4 "+h.IPv4 {
			t.Fatalf("kubernetes EndpointSlice through %s: %q, want IPv4 %s", s.Addr(), got, h.IPv4)
		}
	}
}
