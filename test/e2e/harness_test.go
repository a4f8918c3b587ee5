package e2e

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
	"encoding/json"
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

	"github.com/extractedprism/extractedprism/pkg/status"
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
	caPool     *x509.CertPool
	// caCert and caKey sign the serving certificate and client
	// certificates: the CA is also every apiserver's --client-ca-file.
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey

	mu       sync.Mutex
	procs    []*proc
	results  []string
	etcdP    *proc
	etcdData string
}

// discoveryUser is the restricted user the discovery credentials belong to.
const discoveryUser = "extractedprism-discovery"

// newEnvironment finds the binaries and writes certificates and tokens.
func newEnvironment() (*environment, error) {
	e := &environment{}
	bin := os.Getenv("EP_E2E_BIN")
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
		return "", fmt.Errorf("%s not found in %s (EP_E2E_BIN)", name, bin)
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
	if e.dir, err = os.MkdirTemp("", "ep-e2e-"); err != nil {
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
		Subject:               pkix.Name{CommonName: "extractedprism-e2e-ca"},
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
	e.caCert, e.caKey = ca, caKey

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
		e.tokenFile: fmt.Appendf(nil, "%s,admin,admin-uid,system:masters\n%s,%s,discovery-uid\n",
			e.adminToken, e.discToken, discoveryUser),
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
	return e.writeKubeconfig(name, server, "    token: "+token+"\n")
}

// certKubeconfig writes a kubeconfig for server with a client certificate
// and returns its path.
func (e *environment) certKubeconfig(name, server, certFile, keyFile string) (string, error) {
	return e.writeKubeconfig(name, server, fmt.Sprintf("    client-certificate: %s\n    client-key: %s\n", certFile, keyFile))
}

// writeKubeconfig writes a kubeconfig for server whose user has the given
// credential lines.
func (e *environment) writeKubeconfig(name, server, credentials string) (string, error) {
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
%scontexts:
- name: e2e
  context: {cluster: e2e, user: %s}
current-context: e2e
`, server, e.caFile, name, credentials, name)
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

// clientCert writes a client certificate and key for user cn in groups,
// signed by the cluster's client CA, and returns their paths.
func (e *environment) clientCert(name, cn string, groups ...string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("client key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return "", "", fmt.Errorf("serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		// Above the serials of the CA and the serving certificate.
		SerialNumber: serial.Add(serial, big.NewInt(3)),
		Subject:      pkix.Name{CommonName: cn, Organization: groups},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, e.caCert, &key.PublicKey, e.caKey)
	if err != nil {
		return "", "", fmt.Errorf("client certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", fmt.Errorf("client key: %w", err)
	}
	certFile = filepath.Join(e.dir, name+".crt")
	keyFile = filepath.Join(e.dir, name+".key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return "", "", fmt.Errorf("write %s: %w", certFile, err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return "", "", fmt.Errorf("write %s: %w", keyFile, err)
	}
	return certFile, keyFile, nil
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
	b.WriteString("== e2e measurements\n")
	for _, r := range e.results {
		b.WriteString("  " + r + "\n")
	}
	fmt.Print(b.String())
	if p := os.Getenv("EP_E2E_REPORT"); p != "" {
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
	if os.Getenv("EP_E2E_KEEP") == "" {
		_ = os.RemoveAll(e.dir)
		// etcd's data lives in /dev/shm, outside the work directory.
		if e.etcdData != "" {
			_ = os.RemoveAll(e.etcdData)
		}
	} else {
		fmt.Println("e2e: work directory kept in", e.dir)
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

// stop sends SIGTERM and waits up to timeout, then kills.
func (p *proc) stop(timeout time.Duration) error {
	p.signal(syscall.SIGTERM)
	err := p.wait(timeout)
	if p.running() {
		p.kill()
	}
	return err
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

// startEtcd starts the shared etcd and waits for it to be healthy. A
// restart keeps the data directory of the first start.
func (e *environment) startEtcd() error {
	if e.etcdData == "" {
		data, err := os.MkdirTemp(shmOr(e.dir), "etcd-")
		if err != nil {
			return fmt.Errorf("etcd data directory: %w", err)
		}
		e.etcdData = data
	}
	p, err := e.start("etcd", e.etcd,
		"--name=e2e", "--data-dir="+e.etcdData,
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380", "--log-level=warn")
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
	ip string
	p  *proc
	// extra are the flags it was started with beyond the common ones; a
	// restart (restartAPIServer) passes them again.
	extra []string
}

// addr is the apiserver's host:port.
func (a *apiserver) addr() string { return net.JoinHostPort(a.ip, "6443") }

// startAPIServer starts a kube-apiserver on ip (not waiting for it), with
// the common flags and then extra (for example anonymousOff or
// e.anonymousHealthOnly(t)).
func (e *environment) startAPIServer(t *testing.T, ip string, extra ...string) *apiserver {
	t.Helper()
	certDir := filepath.Join(e.dir, "certs-"+ip)
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
	a := &apiserver{ip: ip, p: p, extra: extra}
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

// restartAPIServer starts a again on its address with the flags it had.
func (e *environment) restartAPIServer(t *testing.T, a *apiserver) {
	t.Helper()
	*a = *e.startAPIServer(t, a.ip, a.extra...)
}

// anonymousOff are the flags of a control plane that refuses anonymous
// requests altogether (CIS 1.2.1): every request without credentials, the
// health paths included, is answered 401.
var anonymousOff = []string{"--anonymous-auth=false"}

// anonymousHealthOnly writes an AuthenticationConfiguration that allows
// anonymous requests of /livez, /readyz and /healthz only and returns the
// flag that loads it: every other anonymous request is answered 401.
func (e *environment) anonymousHealthOnly(t *testing.T) []string {
	t.Helper()
	p := filepath.Join(e.dir, "authentication-config.yaml")
	doc := `apiVersion: apiserver.config.k8s.io/v1
kind: AuthenticationConfiguration
anonymous:
  enabled: true
  conditions:
  - path: /livez
  - path: /readyz
  - path: /healthz
`
	if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--authentication-config=" + p}
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

// answers reports whether the apiserver answers HTTPS requests at all (it
// serves requests before /readyz passes).
func (e *environment) answers(a *apiserver) bool {
	resp, err := e.httpsClient().Get("https://" + a.addr() + "/readyz")
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return true
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
	return e.kubectlWith(ctx, kc, stdin, args...)
}

// kubectlWith runs kubectl with the kubeconfig kc.
func (e *environment) kubectlWith(ctx context.Context, kc string, stdin string, args ...string) (string, error) {
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
// rules docs/discovery.md documents: the one slice named after the
// service; e2e-dual is the service of TestDiscoveryAgainstRealAPIServers),
// bound to the restricted test user.
const rbacManifest = `apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: extractedprism-discovery
  namespace: default
rules:
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  resourceNames: ["kubernetes", "e2e-dual"]
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

// applyRBAC grants the discovery user its rights and checks they are no more.
func (e *environment) applyRBAC(t *testing.T, server string) {
	t.Helper()
	e.mustKubectl(t, server, rbacManifest, "apply", "-f", "-")
	checks := []struct {
		args []string
		want string
	}{
		{[]string{"list", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"watch", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"get", "endpointslices.discovery.k8s.io/kubernetes", "-n", "default"}, "yes"},
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"get", "endpointslices.discovery.k8s.io/kubernetes-extra", "-n", "default"}, "no"},
		{[]string{"list", "endpointslices.discovery.k8s.io", "-n", "kube-system"}, "no"},
		{[]string{"create", "endpointslices.discovery.k8s.io", "-n", "default"}, "no"},
		{[]string{"list", "secrets", "-n", "default"}, "no"},
	}
	for _, c := range checks {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, _ := e.kubectl(ctx, server, "", append([]string{"auth", "can-i", "--as=" + discoveryUser}, c.args...)...)
		cancel()
		if got := strings.TrimSpace(out); got != c.want {
			t.Fatalf("kubectl auth can-i --as=%s %s: %q, want %q", discoveryUser, strings.Join(c.args, " "), got, c.want)
		}
	}
}

// daemon is a running extractedprism.
type daemon struct {
	p     *proc
	start time.Time
}

// adminAddr is extractedprism's admin address inside the namespace.
const adminAddr = "127.0.0.1:7446"

// proxyAddr is extractedprism's listener inside the namespace.
const proxyAddr = "127.0.0.1:7445"

// startDaemon runs bin/extractedprism with args.
func (e *environment) startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	p, err := e.start("extractedprism", e.daemon, args...)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{p: p, start: time.Now()}
	t.Cleanup(func() {
		if p.running() {
			p.kill()
		}
		if t.Failed() {
			t.Logf("last lines of extractedprism:\n%s", p.tail(40))
		}
	})
	return d
}

// status fetches /status.
func (d *daemon) status() (status.Document, error) {
	var doc status.Document
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + adminAddr + "/status")
	if err != nil {
		return doc, fmt.Errorf("GET /status: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return doc, fmt.Errorf("decode /status: %w", err)
	}
	return doc, nil
}

// waitStatus polls /status until cond holds and returns the document and
// the time it first held.
func (d *daemon) waitStatus(t *testing.T, what string, timeout time.Duration, cond func(status.Document) bool) (status.Document, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last status.Document
	var lastErr error
	for time.Now().Before(deadline) {
		doc, err := d.status()
		if err == nil && cond(doc) {
			return doc, time.Now()
		}
		last, lastErr = doc, err
		if !d.p.running() {
			t.Fatalf("extractedprism exited while waiting for %s: %v\n%s", what, d.p.err, d.p.tail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := json.MarshalIndent(last, "", "  ")
	t.Fatalf("timed out after %s waiting for %s; last /status (error %v):\n%s", timeout, what, lastErr, b)
	return last, time.Time{}
}

// upstream returns the upstream with address addr.
func upstream(doc status.Document, addr string) (status.Upstream, bool) {
	for _, u := range doc.Upstreams {
		if u.Address == addr {
			return u, true
		}
	}
	return status.Upstream{}, false
}

// describe renders the upstreams as "addr(source,state)".
func describe(doc status.Document) string {
	parts := make([]string, 0, len(doc.Upstreams))
	for _, u := range doc.Upstreams {
		parts = append(parts, fmt.Sprintf("%s(%s,%s)", u.Address, u.Source, u.State))
	}
	return strings.Join(parts, " ")
}

// contextWithTimeout is context.WithTimeout on a background context.
func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
