package node

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	harness "github.com/extractedprism/extractedprism/test/cluster"
)

// env is the shared test environment of this run.
var env *environment

// environment is the shared cluster harness (credentials, processes,
// etcd, apiservers, kubectl) and what only this module adds: the node's
// programs and certificates and the image under test.
type environment struct {
	*harness.Env
	bin binaries

	// Image under test: the OCI archive and the tag the manifests get.
	imageTar  string
	imageRepo string
	imageTag  string

	// caFile, caPool and adminToken are the harness's CA and admin token.
	caFile     string
	caPool     *x509.CertPool
	adminToken string

	kubeletClientCert         string
	kubeletClientKey          string
	kubeletServingCert        string
	kubeletServingKey         string
	apiKubeletClientCert      string
	apiKubeletClientKey       string
	cmToken, schedToken       string
	kubeletStarted, nodeReady time.Time
}

// proc and apiserver are the harness's processes and apiservers.
type (
	proc      = harness.Proc
	apiserver = harness.APIServer
)

// poll waits for a condition (harness.Poll).
var poll = harness.Poll

// binaries are the programs the test runs.
type binaries struct {
	apiserver, controllerManager, scheduler, kubelet, kubectl string
	etcd, containerd, ctr, helm, nodetools                    string
}

// The static token users of the controller manager and the scheduler.
const (
	controllerManagerUser = "system:kube-controller-manager"
	schedulerUser         = "system:kube-scheduler"
)

// newEnvironment finds the binaries and writes certificates and tokens into
// dir.
func newEnvironment(dir string) (*environment, error) {
	if dir == "" {
		return nil, fmt.Errorf("%s is not set", workDirEnv)
	}
	e := &environment{}
	bin, err := harness.BinDir("EP_NODE_BIN")
	if err != nil {
		return nil, err
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
		p, err := harness.Find(bin, "EP_NODE_BIN", b.name, b.path)
		if err != nil {
			return nil, fmt.Errorf("%w; run make node-e2e", err)
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
	// The apiserver certificate names what kubeadm's does: the service
	// names and addresses, not 127.0.0.1 (clients of the balancer send
	// tls-server-name kubernetes, as docs/kubeadm.md says).
	e.Env, err = harness.NewEnv(harness.Options{
		Name:    "node-e2e",
		Dir:     dir,
		LogDir:  dir + "/logs",
		LogMode: 0o644,
		Bins:    harness.Bins{APIServer: e.bin.apiserver, Etcd: e.bin.etcd, Kubectl: e.bin.kubectl},
		ServingCert: harness.CertSpec{
			DNS: harness.ServiceDNSNames,
			IPs: append([]string{harness.ServiceIPv4}, apiserverIPs...),
		},
		Users:      []harness.User{{Name: controllerManagerUser}, {Name: schedulerUser}},
		ServerName: "kubernetes",
		ReportPath: os.Getenv("EP_NODE_REPORT"),
		Echo:       true,
	})
	if err != nil {
		return nil, err
	}
	e.AuthorizationMode = "Node,RBAC"
	e.caFile, e.caPool, e.adminToken = e.CA.File, e.CA.Pool, e.AdminToken
	e.cmToken, e.schedToken = e.Tokens[controllerManagerUser], e.Tokens[schedulerUser]
	if err := e.writeNodeCredentials(); err != nil {
		return nil, err
	}
	return e, nil
}

// path returns a path inside the work directory.
func (e *environment) path(elem ...string) string { return e.Path(elem...) }

// record keeps one measured figure for the report and prints it.
func (e *environment) record(format string, args ...any) { e.Record(format, args...) }

// writeNodeCredentials issues the kubelet's client and serving
// certificates and the apiserver's client certificate for the kubelet.
func (e *environment) writeNodeCredentials() error {
	var err error
	if e.kubeletClientCert, e.kubeletClientKey, err = e.CA.Issue("kubelet-client", harness.CertSpec{
		CN: "system:node:" + nodeName, Orgs: []string{"system:nodes"}, Client: true,
	}); err != nil {
		return err
	}
	if e.kubeletServingCert, e.kubeletServingKey, err = e.CA.Issue("kubelet-serving", harness.CertSpec{
		CN: nodeName, DNS: []string{nodeName}, IPs: []string{nodeIP}, Server: true,
	}); err != nil {
		return err
	}
	if e.apiKubeletClientCert, e.apiKubeletClientKey, err = e.CA.Issue("apiserver-kubelet-client", harness.CertSpec{
		CN: "kube-apiserver-kubelet-client", Orgs: []string{"system:masters"}, Client: true,
	}); err != nil {
		return err
	}
	return nil
}

// close stops every process still running, newest first.
func (e *environment) close() {
	e.StopAll(15 * time.Second)
	// Pod processes are in the pod cgroups (and partly in pod network
	// namespaces): kill what is left there before the outer run removes
	// the cgroups.
	cleanupCgroups(cgroupRoot)
	if os.Getenv("EP_NODE_KEEP") != "" {
		fmt.Println("node-e2e: logs are in", e.path("logs"))
	}
}

// helm runs the helm binary with the admin kubeconfig for server and its
// own cache and configuration folders.
func (e *environment) helm(ctx context.Context, server string, args ...string) (string, error) {
	kc, err := e.AdminKubeconfig(server)
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, e.bin.helm, append([]string{"--kubeconfig=" + kc}, args...)...)
	home := e.path("helm")
	cmd.Env = append(os.Environ(), "HOME="+e.Dir, "HELM_CACHE_HOME="+home+"/cache",
		"HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
