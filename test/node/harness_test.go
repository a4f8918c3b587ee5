package node

import (
	"context"
	"crypto"
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
	dir string
	bin binaries

	// Image under test: the OCI archive and the tag the manifests get.
	imageTar  string
	imageRepo string
	imageTag  string

	caFile                    string
	apiCertFile, apiKeyFile   string
	kubeletClientCert         string
	kubeletClientKey          string
	kubeletServingCert        string
	kubeletServingKey         string
	apiKubeletClientCert      string
	apiKubeletClientKey       string
	saKeyFile, tokenFile      string
	adminToken, cmToken       string
	schedToken                string
	caPool                    *x509.CertPool
	caCert                    *x509.Certificate
	caKey                     crypto.Signer
	nextSerial                int64
	serialMu                  sync.Mutex
	results                   []string
	mu                        sync.Mutex
	procs                     []*proc
	reportPath                string
	kubeletStarted, nodeReady time.Time
}

// binaries are the programs the test runs.
type binaries struct {
	apiserver, controllerManager, scheduler, kubelet, kubectl string
	etcd, containerd, ctr, helm, nodetools                    string
}

// newEnvironment finds the binaries and writes certificates and tokens into
// dir.
func newEnvironment(dir string) (*environment, error) {
	if dir == "" {
		return nil, fmt.Errorf("%s is not set", workDirEnv)
	}
	e := &environment{dir: dir, nextSerial: 10, reportPath: os.Getenv("EP_NODE_REPORT")}
	bin := os.Getenv("EP_NODE_BIN")
	if bin == "" {
		abs, err := filepath.Abs("../../bin")
		if err != nil {
			return nil, fmt.Errorf("bin directory: %w", err)
		}
		bin = abs
	}
	find := func(name string, path bool) (string, error) {
		p := filepath.Join(bin, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if path {
			if lp, err := exec.LookPath(name); err == nil {
				return lp, nil
			}
		}
		return "", fmt.Errorf("%s not found in %s (EP_NODE_BIN)%s; run make node-e2e", name, bin,
			map[bool]string{true: " nor in PATH", false: ""}[path])
	}
	for _, b := range []struct {
		dst  *string
		name string
		path bool
	}{
		{&e.bin.apiserver, "kube-apiserver", false},
		{&e.bin.controllerManager, "kube-controller-manager", false},
		{&e.bin.scheduler, "kube-scheduler", false},
		{&e.bin.kubelet, "kubelet", false},
		{&e.bin.kubectl, "kubectl", false},
		{&e.bin.helm, "helm", false},
		{&e.bin.nodetools, "nodetools", false},
		{&e.bin.etcd, "etcd", true},
		{&e.bin.containerd, "containerd", true},
		{&e.bin.ctr, "ctr", true},
	} {
		p, err := find(b.name, b.path)
		if err != nil {
			return nil, err
		}
		*b.dst = p
	}
	for _, tool := range []string{"runc", "unshare", "ip", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found in PATH; run: bash .ci/deps.d/node.sh", tool)
		}
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		return nil, fmt.Errorf("CNI plugins not found in /usr/lib/cni; run: bash .ci/deps.d/node.sh")
	}
	e.imageTar = os.Getenv("EP_NODE_IMAGE_TAR")
	e.imageRepo = os.Getenv("EP_NODE_IMAGE_REPO")
	e.imageTag = os.Getenv("EP_NODE_IMAGE_TAG")
	if e.imageTar == "" || e.imageRepo == "" || e.imageTag == "" {
		return nil, fmt.Errorf("EP_NODE_IMAGE_TAR, EP_NODE_IMAGE_REPO and EP_NODE_IMAGE_TAG must name the image under test; run make node-e2e")
	}
	if err := e.writeCredentials(); err != nil {
		return nil, err
	}
	return e, nil
}

// path returns a path inside the work directory.
func (e *environment) path(elem ...string) string {
	return filepath.Join(append([]string{e.dir}, elem...)...)
}

// certSpec describes one certificate signed by the test CA.
type certSpec struct {
	cn     string
	orgs   []string
	dns    []string
	ips    []string
	server bool
	client bool
}

// issue writes a key and a certificate for spec to name.{crt,key}.
func (e *environment) issue(name string, spec certSpec) (string, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("%s key: %w", name, err)
	}
	e.serialMu.Lock()
	e.nextSerial++
	serial := e.nextSerial
	e.serialMu.Unlock()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: spec.cn, Organization: spec.orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		DNSNames:     spec.dns,
	}
	for _, ip := range spec.ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	if spec.server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if spec.client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, e.caCert, &key.PublicKey, e.caKey)
	if err != nil {
		return "", "", fmt.Errorf("%s certificate: %w", name, err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", fmt.Errorf("%s key: %w", name, err)
	}
	crt, kf := e.path("pki", name+".crt"), e.path("pki", name+".key")
	if err := os.WriteFile(crt, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(kf, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return "", "", err
	}
	return crt, kf, nil
}

// writeCredentials creates the CA, the serving and client certificates, the
// service account key and the token file.
func (e *environment) writeCredentials() error {
	if err := os.MkdirAll(e.path("pki"), 0o755); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("CA key: %w", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "extractedprism-node-e2e-ca"},
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
	if e.caCert, err = x509.ParseCertificate(caDER); err != nil {
		return fmt.Errorf("CA certificate: %w", err)
	}
	e.caKey = caKey
	e.caPool = x509.NewCertPool()
	e.caPool.AddCert(e.caCert)
	e.caFile = e.path("pki", "ca.crt")
	if err := os.WriteFile(e.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		return err
	}
	// The apiserver certificate names what kubeadm's does: the service
	// names and addresses, not 127.0.0.1 (clients of the balancer send
	// tls-server-name kubernetes, as docs/kubeadm.md says).
	if e.apiCertFile, e.apiKeyFile, err = e.issue("apiserver", certSpec{
		cn: "kube-apiserver", server: true,
		dns: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		ips: append([]string{"10.0.0.1"}, apiserverIPs...),
	}); err != nil {
		return err
	}
	if e.kubeletClientCert, e.kubeletClientKey, err = e.issue("kubelet-client", certSpec{
		cn: "system:node:" + nodeName, orgs: []string{"system:nodes"}, client: true,
	}); err != nil {
		return err
	}
	if e.kubeletServingCert, e.kubeletServingKey, err = e.issue("kubelet-serving", certSpec{
		cn: nodeName, dns: []string{nodeName}, ips: []string{nodeIP}, server: true,
	}); err != nil {
		return err
	}
	if e.apiKubeletClientCert, e.apiKubeletClientKey, err = e.issue("apiserver-kubelet-client", certSpec{
		cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true,
	}); err != nil {
		return err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("service account key: %w", err)
	}
	e.saKeyFile = e.path("pki", "sa.key")
	if err := os.WriteFile(e.saKeyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}), 0o600); err != nil {
		return err
	}
	e.adminToken, e.cmToken, e.schedToken = randomHex(16), randomHex(16), randomHex(16)
	e.tokenFile = e.path("pki", "tokens.csv")
	tokens := fmt.Sprintf("%s,admin,admin-uid,system:masters\n%s,system:kube-controller-manager,cm-uid\n%s,system:kube-scheduler,sched-uid\n",
		e.adminToken, e.cmToken, e.schedToken)
	return os.WriteFile(e.tokenFile, []byte(tokens), 0o600)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// kubeconfigSpec is what one kubeconfig holds.
type kubeconfigSpec struct {
	server     string // https URL
	serverName string // tls-server-name ("" = none)
	token      string
	cert, key  string
}

// kubeconfig writes a kubeconfig and returns its path.
func (e *environment) kubeconfig(name string, s kubeconfigSpec) (string, error) {
	var cluster strings.Builder
	fmt.Fprintf(&cluster, "    server: %s\n    certificate-authority: %s\n", s.server, e.caFile)
	if s.serverName != "" {
		fmt.Fprintf(&cluster, "    tls-server-name: %s\n", s.serverName)
	}
	var user string
	if s.token != "" {
		user = "    token: " + s.token + "\n"
	} else {
		user = fmt.Sprintf("    client-certificate: %s\n    client-key: %s\n", s.cert, s.key)
	}
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: node-e2e
  cluster:
%susers:
- name: %s
  user:
%scontexts:
- name: node-e2e
  context: {cluster: node-e2e, user: %s}
current-context: node-e2e
`, cluster.String(), name, user, name)
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

// record keeps one measured figure for the report.
func (e *environment) record(format string, args ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	line := fmt.Sprintf(format, args...)
	e.results = append(e.results, line)
	fmt.Println("node-e2e: measured:", line)
}

// report prints what was measured and writes it to EP_NODE_REPORT.
func (e *environment) report() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.results) == 0 {
		return
	}
	var b strings.Builder
	b.WriteString("== node-e2e measurements\n")
	for _, r := range e.results {
		b.WriteString("  " + r + "\n")
	}
	fmt.Print(b.String())
	if e.reportPath != "" {
		_ = os.WriteFile(e.reportPath, []byte(b.String()), 0o644)
	}
}

// close stops every process still running, newest first.
func (e *environment) close() {
	e.mu.Lock()
	procs := slices.Clone(e.procs)
	e.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		if p.running() {
			_ = p.stop(15 * time.Second)
		}
	}
	// Pod processes are in the pod cgroups (and partly in pod network
	// namespaces): kill what is left there before the outer run removes
	// the cgroups.
	cleanupCgroups(cgroupRoot)
	if os.Getenv("EP_NODE_KEEP") != "" {
		fmt.Println("node-e2e: logs are in", e.path("logs"))
	}
}

// proc is a child process with its output in a log file.
type proc struct {
	name string
	args []string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// start runs bin with args, output appended to logs/NAME.log.
func (e *environment) start(name, bin string, args ...string) (*proc, error) {
	if err := os.MkdirAll(e.path("logs"), 0o755); err != nil {
		return nil, err
	}
	logPath := e.path("logs", name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
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
	p := &proc{name: name, args: append([]string{bin}, args...), cmd: cmd, log: logPath, done: make(chan struct{})}
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
		return fmt.Errorf("%s (pid %d) still running after %s", p.name, p.cmd.Process.Pid, timeout)
	}
}

// stop sends SIGTERM and waits up to timeout, then SIGKILL.
func (p *proc) stop(timeout time.Duration) error {
	p.signal(syscall.SIGTERM)
	err := p.wait(timeout)
	if p.running() {
		p.signal(syscall.SIGKILL)
		<-p.done
	}
	return err
}

// tail returns the last n lines of the process log.
func (p *proc) tail(n int) string {
	return tailFile(p.log, n)
}

// tailFile returns the last n lines of a file.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// poll calls cond every interval until it returns true or timeout passes;
// it fails the test with what the last call said.
func poll(t *testing.T, what string, timeout, interval time.Duration, cond func() (bool, string)) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ok, msg := cond()
		if ok {
			return time.Now()
		}
		last = msg
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last: %s", timeout, what, last)
		}
		time.Sleep(interval)
	}
}

// httpsClient trusts the test CA and sends serverName.
func (e *environment) httpsClient(serverName string) *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: e.caPool, ServerName: serverName, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
		},
	}
}

// kubectl runs kubectl with the admin token against server (host:port),
// sending tls-server-name kubernetes (as a client of the balancer must).
func (e *environment) kubectl(ctx context.Context, server, stdin string, args ...string) (string, error) {
	kc, err := e.adminKubeconfig(server)
	if err != nil {
		return "", err
	}
	full := append([]string{"--kubeconfig=" + kc, "--cache-dir=" + e.path("kubectl-cache"), "--request-timeout=20s"}, args...)
	cmd := exec.CommandContext(ctx, e.bin.kubectl, full...)
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

// adminKubeconfig returns the admin kubeconfig for server.
func (e *environment) adminKubeconfig(server string) (string, error) {
	return e.kubeconfig("admin-"+strings.NewReplacer(":", "-", ".", "-").Replace(server),
		kubeconfigSpec{server: "https://" + server, serverName: "kubernetes", token: e.adminToken})
}

// mustKubectl runs kubectl (one minute at most) and fails the test on error.
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

// helm runs the helm binary with the admin kubeconfig for server and its
// own cache and configuration folders.
func (e *environment) helm(ctx context.Context, server string, args ...string) (string, error) {
	kc, err := e.adminKubeconfig(server)
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, e.bin.helm, append([]string{"--kubeconfig=" + kc}, args...)...)
	home := e.path("helm")
	cmd.Env = append(os.Environ(), "HOME="+e.dir, "HELM_CACHE_HOME="+home+"/cache",
		"HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
