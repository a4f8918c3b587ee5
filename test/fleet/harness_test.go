package fleet

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// env is the shared test environment of this run.
var env *environment

// environment holds the binaries, credentials and processes of the run.
type environment struct {
	dir        string
	apiserver  string
	kubectlBin string
	etcd       string
	daemon     string
	caFile     string
	certFile   string
	keyFile    string
	saKeyFile  string
	tokenFile  string
	adminToken string
	discToken  string
	pubToken   string // the readiness publisher's user
	nodeToken  string // a node's user, reading the shared readiness
	caPool     *x509.CertPool

	mu      sync.Mutex
	procs   []*proc
	results []string
	etcdP   *proc
}

// discoveryUser is the restricted user the discovery credentials belong to.
const discoveryUser = "extractedprism-discovery"

// publisherUser and nodeUser are the restricted users of the shared
// readiness: the publisher writes the ConfigMap, a node only reads it.
const (
	publisherUser = "extractedprism-readiness-publisher"
	nodeUser      = "extractedprism-node"
)

// newEnvironment finds the binaries and writes certificates and tokens.
func newEnvironment() (*environment, error) {
	e := &environment{}
	bin := os.Getenv("EP_FLEET_BIN")
	if bin == "" {
		abs, err := filepath.Abs("../../bin")
		if err != nil {
			return nil, fmt.Errorf("bin directory: %w", err)
		}
		bin = abs
	}
	find := func(name string, fallback bool) (string, error) {
		p := filepath.Join(bin, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if fallback {
			if lp, err := exec.LookPath(name); err == nil {
				return lp, nil
			}
		}
		return "", fmt.Errorf("%s not found in %s (EP_FLEET_BIN)", name, bin)
	}
	var err error
	if e.apiserver, err = find("kube-apiserver", false); err != nil {
		return nil, err
	}
	if e.kubectlBin, err = find("kubectl", true); err != nil {
		return nil, err
	}
	if e.etcd, err = find("etcd", true); err != nil {
		return nil, err
	}
	if e.daemon, err = find("extractedprism", false); err != nil {
		return nil, err
	}
	if e.dir, err = os.MkdirTemp("", "ep-fleet-"); err != nil {
		return nil, fmt.Errorf("work directory: %w", err)
	}
	if err := e.writeCredentials(); err != nil {
		return nil, err
	}
	return e, nil
}

// writeCredentials creates a CA, the apiserver serving certificate, the
// service account key and the token file.
func (e *environment) writeCredentials() error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("CA key: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "extractedprism-fleet-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("CA certificate: %w", err)
	}
	e.caPool = x509.NewCertPool()
	e.caPool.AddCert(ca)

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("serving key: %w", err)
	}
	ips := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP("10.0.0.1")}
	for _, ip := range apiserverIPs {
		ips = append(ips, net.ParseIP(ip))
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local", "localhost"},
		IPAddresses: ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("serving key: %w", err)
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	e.adminToken, e.discToken = randomHex(16), randomHex(16)
	e.pubToken, e.nodeToken = randomHex(16), randomHex(16)
	e.caFile = filepath.Join(e.dir, "ca.crt")
	e.certFile = filepath.Join(e.dir, "apiserver.crt")
	e.keyFile = filepath.Join(e.dir, "apiserver.key")
	e.saKeyFile = filepath.Join(e.dir, "sa.key")
	e.tokenFile = filepath.Join(e.dir, "tokens.csv")
	files := map[string][]byte{
		e.caFile:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		e.certFile:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		e.keyFile:   pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		e.saKeyFile: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		e.tokenFile: fmt.Appendf(nil, "%s,admin,admin-uid,system:masters\n%s,%s,discovery-uid\n%s,%s,publisher-uid\n%s,%s,node-uid\n",
			e.adminToken, e.discToken, discoveryUser, e.pubToken, publisherUser, e.nodeToken, nodeUser),
	}
	for p, b := range files {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// kubeconfig writes a kubeconfig for server with the given token and
// returns its path.
func (e *environment) kubeconfig(name, server, token string) (string, error) {
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: fleet
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: fleet
  context: {cluster: fleet, user: %s}
current-context: fleet
`, server, e.caFile, name, token, name)
	return writeKubeconfigFile(e.dir, name, doc)
}

// writeKubeconfigFile writes the kubeconfig doc to a file of its own,
// named by name and its content, and returns its path. kubectl runs read
// kubeconfigs while other steps write theirs: each file is written once,
// under a temporary name and then renamed into place, so no reader sees
// one half written or with another server's address.
func writeKubeconfigFile(dir, name, doc string) (string, error) {
	sum := sha256.Sum256([]byte(doc))
	p := filepath.Join(dir, name+"-"+hex.EncodeToString(sum[:6])+".kubeconfig")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	f, err := os.CreateTemp(dir, name+"-*.kubeconfig.tmp")
	if err != nil {
		return "", fmt.Errorf("write kubeconfig: %w", err)
	}
	_, err = f.WriteString(doc)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", fmt.Errorf("write kubeconfig %s: %w", p, err)
	}
	return p, nil
}

// record keeps one measured number for the report.
func (e *environment) record(format string, args ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.results = append(e.results, fmt.Sprintf(format, args...))
}

// report prints what was measured.
func (e *environment) report() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.results) == 0 {
		return
	}
	var b strings.Builder
	b.WriteString("== fleet measurements\n")
	for _, r := range e.results {
		b.WriteString("  " + r + "\n")
	}
	b.WriteString(resultLine() + "\n")
	fmt.Print(b.String())
	if p := os.Getenv("EP_FLEET_REPORT"); p != "" {
		_ = os.WriteFile(p, []byte(b.String()), 0o644)
	}
}

// close stops every process still running and removes the work directory.
func (e *environment) close() {
	e.mu.Lock()
	procs := slices.Clone(e.procs)
	e.mu.Unlock()
	for _, p := range procs {
		p.kill()
	}
	if os.Getenv("EP_FLEET_KEEP") == "" {
		_ = os.RemoveAll(e.dir)
	} else {
		fmt.Println("fleet: work directory kept in", e.dir)
	}
}

// proc is a child process with its output in a log file.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// start runs name with args, output to a log file in the work directory.
func (e *environment) start(name, bin string, args ...string) (*proc, error) {
	logPath := filepath.Join(e.dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	_, _ = fmt.Fprintf(f, "=== %s %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Dir = e.dir
	cmd.Env = append(os.Environ(), "HOME="+e.dir)
	// Die with the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	return p, nil
}

// running reports whether the process has not exited.
func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// signal sends sig to the process.
func (p *proc) signal(sig syscall.Signal) {
	if p.running() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// wait waits up to timeout for the process to exit.
func (p *proc) wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%s still running after %s", p.name, timeout)
	}
}

// kill ends the process and waits for it.
func (p *proc) kill() {
	p.signal(syscall.SIGKILL)
	<-p.done
}

// tail returns the last n lines of the process log.
func (p *proc) tail(n int) string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// startEtcd starts the shared etcd and waits for it to be healthy.
func (e *environment) startEtcd() error {
	data, err := os.MkdirTemp(shmOr(e.dir), "etcd-")
	if err != nil {
		return fmt.Errorf("etcd data directory: %w", err)
	}
	p, err := e.start("etcd", e.etcd,
		"--name=fleet", "--data-dir="+data,
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=fleet=http://127.0.0.1:2380", "--log-level=warn",
		// The apiservers' watch caches wait for etcd's progress
		// notifications to serve fresh watches and lists of quiet
		// resources; etcd 3.4 sends them every 10 minutes by default.
		"--experimental-watch-progress-notify-interval=2s")
	if err != nil {
		return err
	}
	e.etcdP = p
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		resp, err := http.Get("http://127.0.0.1:2379/health")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte(`"health":"true"`)) {
				http.DefaultClient.CloseIdleConnections()
				return nil
			}
		}
		if !p.running() {
			return fmt.Errorf("etcd exited: %v\n%s", p.err, p.tail(20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcd not healthy within a minute:\n%s", p.tail(20))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// shmOr returns /dev/shm when it exists (etcd's fsyncs are cheap there).
func shmOr(dir string) string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		return "/dev/shm"
	}
	return dir
}

// apiserver is one kube-apiserver of the test cluster.
type apiserver struct {
	ip       string
	p        *proc
	auditLog string // "" without audit
}

// addr is the apiserver's host:port.
func (a *apiserver) addr() string { return net.JoinHostPort(a.ip, "6443") }

// streamAudit records one event per watch of configmaps (the fleet's
// client streams), when its response starts: the moment a stream has
// (re)connected.
const streamAudit = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "ResponseComplete", "Panic"]
rules:
- level: Metadata
  verbs: ["watch"]
  resources: [{group: "", resources: ["configmaps"]}]
- level: None
`

// startupAudit records the nodes' probes (GET /readyz) and discovery
// requests (lists and watches of EndpointSlices): one event when each
// response starts (watches) or completes (the rest).
const startupAudit = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived", "Panic"]
rules:
- level: Metadata
  nonResourceURLs: ["/readyz"]
- level: Metadata
  resources: [{group: "discovery.k8s.io", resources: ["endpointslices"]}]
- level: None
`

// startAPIServer starts a kube-apiserver on ip (not waiting for it) with
// the extra flags. With an audit policy (streamAudit, startupAudit; ""
// for none), the apiserver logs what it selects to a.auditLog.
func (e *environment) startAPIServer(t *testing.T, ip, audit string, extra ...string) *apiserver {
	t.Helper()
	certDir := filepath.Join(e.dir, "certs-"+ip)
	auditLog := ""
	if audit != "" {
		stamp := time.Now().UnixNano()
		policy := filepath.Join(e.dir, fmt.Sprintf("audit-policy-%s-%d.yaml", ip, stamp))
		if err := os.WriteFile(policy, []byte(audit), 0o600); err != nil {
			t.Fatal(err)
		}
		auditLog = filepath.Join(e.dir, fmt.Sprintf("audit-%s-%d.log", ip, stamp))
		extra = append(extra, "--audit-policy-file="+policy, "--audit-log-path="+auditLog,
			"--audit-log-mode=blocking", "--audit-log-format=json")
	}
	// Each apiserver gets a host name of its own (a UTS namespace): its
	// identity lease is named after the host name, and apiservers sharing
	// one would fight over a single lease.
	host := "apiserver-" + strings.ReplaceAll(ip, ".", "-")
	args := []string{"--uts", "--", "sh", "-c", `hostname "$0" && exec "$@"`, host, e.apiserver,
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=" + ip, "--secure-port=6443", "--advertise-address=" + ip,
		"--cert-dir=" + certDir,
		"--tls-cert-file=" + e.certFile, "--tls-private-key-file=" + e.keyFile,
		"--client-ca-file=" + e.caFile,
		"--token-auth-file=" + e.tokenFile,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + e.saKeyFile,
		"--service-account-signing-key-file=" + e.saKeyFile,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=RBAC",
		"--profiling=false",
	}
	p, err := e.start("apiserver-"+ip, "unshare", append(args, extra...)...)
	if err != nil {
		t.Fatal(err)
	}
	a := &apiserver{ip: ip, p: p, auditLog: auditLog}
	t.Cleanup(func() {
		if p.running() {
			p.kill()
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", p.name, p.tail(15))
		}
	})
	return a
}

// httpsClient trusts the test CA.
func (e *environment) httpsClient() *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: e.caPool, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
		},
	}
}

// ready reports whether the apiserver answers /readyz with 200.
func (e *environment) ready(a *apiserver) bool {
	req, err := http.NewRequest(http.MethodGet, "https://"+a.addr()+"/readyz", nil)
	if err != nil {
		return false
	}
	req.Header.Set("Authorization", "Bearer "+e.adminToken)
	resp, err := e.httpsClient().Do(req)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// waitReady waits for the apiservers to be ready and returns when the last
// one became ready.
func (e *environment) waitReady(t *testing.T, as ...*apiserver) time.Time {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for _, a := range as {
		for !e.ready(a) {
			if !a.p.running() {
				t.Fatalf("%s exited: %v\n%s", a.p.name, a.p.err, a.p.tail(30))
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not ready within 3 minutes:\n%s", a.p.name, a.p.tail(30))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return time.Now()
}

// kubectl runs kubectl with the admin credentials against server.
func (e *environment) kubectl(ctx context.Context, server string, stdin string, args ...string) (string, error) {
	kc, err := e.kubeconfig("admin", "https://"+server, e.adminToken)
	if err != nil {
		return "", err
	}
	full := append([]string{"--kubeconfig=" + kc, "--cache-dir=" + filepath.Join(e.dir, "kubectl-cache"), "--request-timeout=20s"}, args...)
	cmd := exec.CommandContext(ctx, e.kubectlBin, full...)
	cmd.Env = append(os.Environ(), "HOME="+e.dir)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// mustKubectl runs kubectl and fails the test on error.
func (e *environment) mustKubectl(t *testing.T, server, stdin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := e.kubectl(ctx, server, stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rbacManifest is the Role and RoleBinding that discovery needs (the same
// rules docs/discovery.md documents), bound to the restricted test user.
const rbacManifest = `apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: extractedprism-discovery
  namespace: default
rules:
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: extractedprism-discovery
  namespace: default
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: extractedprism-discovery
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: extractedprism-discovery
`

// applyRBAC grants the discovery user its rights.
func (e *environment) applyRBAC(t *testing.T, server string) {
	t.Helper()
	e.mustKubectl(t, server, rbacManifest, "apply", "-f", "-")
}
