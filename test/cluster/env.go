package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// AdminUser is the static token user in system:masters that the harness
// itself (kubectl, readiness checks) uses.
const AdminUser = "admin"

// Options configure NewEnv.
type Options struct {
	// Name names the run: the CA ("extractedprism-NAME-ca"), the clusters
	// of the kubeconfigs and the report ("== NAME measurements").
	Name string
	// Dir is the work directory, which must exist; "" makes a fresh one
	// under the system's temporary directory.
	Dir string
	// LogDir holds the process logs ("" for Dir).
	LogDir string
	// LogMode is the log files' permission bits (0 for 0600).
	LogMode os.FileMode
	// Bins are the programs: kube-apiserver, etcd and kubectl at least.
	// With BinEnv set, NewEnv finds them (FindBins(BinEnv)), and Programs
	// too (in the same directory, Env.Programs).
	Bins     Bins
	BinEnv   string
	Programs []string
	// ServingCert is the apiservers' serving certificate; NewEnv issues it
	// with CN kube-apiserver and server auth.
	ServingCert CertSpec
	// Users get a static token each besides AdminUser (Env.Tokens).
	Users []User
	// ServerName is the TLS server name the admin kubeconfigs and
	// HTTPSClient send ("" for the address's own).
	ServerName string
	// ReportPath receives the report too ("" for none). Echo prints each
	// figure as it is recorded.
	ReportPath string
	Echo       bool
	// Hosts: the tests run apiservers on hosts (AddHost), and etcd listens
	// on GatewayIPv4 too, which must be among the namespace's addresses.
	Hosts bool
	// For RunTests: KeepEnv names the environment variable that keeps the
	// work directory, EtcdFlags are etcd's extra flags and ReportExtra
	// returns lines for the report's end.
	KeepEnv     string
	EtcdFlags   []string
	ReportExtra func() []string
}

// ModuleOptions are the Options of a module whose tests run extractedprism
// against apiservers on the namespace's lo: the programs in the directory
// PREFIX_BIN names (extractedprism among them), the report also written to
// PREFIX_REPORT, the work directory kept when PREFIX_KEEP is set, a
// serving certificate for localhost and every test address of both
// families, and a token for each user.
func ModuleOptions(name, envPrefix string, users ...string) Options {
	o := Options{
		Name: name, BinEnv: envPrefix + "_BIN", Programs: []string{"extractedprism"},
		ReportPath: os.Getenv(envPrefix + "_REPORT"), KeepEnv: envPrefix + "_KEEP",
		ServingCert: CertSpec{
			DNS: append([]string{"localhost"}, ServiceDNSNames...),
			IPs: []string{"127.0.0.1", "::1", ServiceIPv4, ServiceIPv6},
		},
	}
	for _, ips := range [][]string{APIServerIPv4, APIServerIPv6, HostIPv4, HostIPv6} {
		o.ServingCert.IPs = append(o.ServingCert.IPs, ips...)
	}
	for _, u := range users {
		o.Users = append(o.Users, User{Name: u})
	}
	return o
}

// Env is one run's harness: the work directory, the processes, the
// credentials and the measured figures.
type Env struct {
	Name string
	Dir  string
	*Procs
	Bins Bins
	// Programs are Options.Programs' paths by name.
	Programs map[string]string
	CA       *CA
	// The apiservers' serving certificate and key, service account key
	// and static token file.
	CertFile, KeyFile, SAKeyFile, TokenFile string
	// Tokens are the static tokens by user name, AdminUser's among them.
	Tokens     map[string]string
	AdminToken string
	ServerName string
	// APIServerFlags are added to every apiserver's flags after the
	// common ones; AuthorizationMode replaces "RBAC".
	APIServerFlags    []string
	AuthorizationMode string
	// Etcd is the running etcd (StartEtcd); EtcdData its data directory.
	Etcd     *Proc
	EtcdData string

	hosts      bool
	reportPath string
	echo       bool
	mu         sync.Mutex
	results    []string
}

// NewEnv creates the work directory and writes the CA, the serving
// certificate, the service account key and the token file into its pki
// folder.
func NewEnv(o Options) (*Env, error) {
	e := &Env{Name: o.Name, Dir: o.Dir, Bins: o.Bins, ServerName: o.ServerName, reportPath: o.ReportPath, echo: o.Echo, hosts: o.Hosts,
		Programs: map[string]string{}}
	if o.BinEnv != "" {
		var err error
		if e.Bins, err = FindBins(o.BinEnv); err != nil {
			return nil, err
		}
		for _, name := range o.Programs {
			if e.Programs[name], err = e.Bins.Find(name, false); err != nil {
				return nil, err
			}
		}
	}
	if e.Dir == "" {
		d, err := os.MkdirTemp("", "ep-"+o.Name+"-")
		if err != nil {
			return nil, fmt.Errorf("work directory: %w", err)
		}
		e.Dir = d
	}
	logDir := o.LogDir
	if logDir == "" {
		logDir = e.Dir
	}
	e.Procs = &Procs{Dir: e.Dir, LogDir: logDir, LogMode: o.LogMode}
	pki := filepath.Join(e.Dir, "pki")
	var err error
	if e.CA, err = NewCA(pki, "extractedprism-"+o.Name+"-ca"); err != nil {
		return nil, err
	}
	spec := o.ServingCert
	spec.CN, spec.Server = "kube-apiserver", true
	if e.CertFile, e.KeyFile, err = e.CA.Issue("apiserver", spec); err != nil {
		return nil, err
	}
	e.SAKeyFile = filepath.Join(pki, "sa.key")
	if err := WriteServiceAccountKey(e.SAKeyFile); err != nil {
		return nil, err
	}
	e.TokenFile = filepath.Join(pki, "tokens.csv")
	users := append([]User{{Name: AdminUser, Groups: []string{"system:masters"}}}, o.Users...)
	if e.Tokens, err = writeTokens(e.TokenFile, users); err != nil {
		return nil, err
	}
	e.AdminToken = e.Tokens[AdminUser]
	return e, nil
}

// Path returns a path inside the work directory.
func (e *Env) Path(elem ...string) string {
	return filepath.Join(append([]string{e.Dir}, elem...)...)
}

// Record keeps one measured figure for the report.
func (e *Env) Record(format string, args ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	line := fmt.Sprintf(format, args...)
	e.results = append(e.results, line)
	if e.echo {
		fmt.Printf("%s: measured: %s\n", e.Name, line)
	}
}

// Report prints the recorded figures and the extra lines, and writes them
// to the report path.
func (e *Env) Report(extra ...string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.results) == 0 {
		return
	}
	var b strings.Builder
	b.WriteString("== " + e.Name + " measurements\n")
	for _, r := range e.results {
		b.WriteString("  " + r + "\n")
	}
	for _, l := range extra {
		b.WriteString(l + "\n")
	}
	fmt.Print(b.String())
	if e.reportPath != "" {
		_ = os.WriteFile(e.reportPath, []byte(b.String()), 0o644)
	}
}

// Close kills every process still running and, unless keep, removes the
// work directory and etcd's data.
func (e *Env) Close(keep bool) {
	e.KillAll()
	if keep {
		fmt.Println(e.Name+": work directory kept in", e.Dir)
		return
	}
	_ = os.RemoveAll(e.Dir)
	e.RemoveEtcdData()
}

// HTTPSClient trusts the test CA and sends ServerName.
func (e *Env) HTTPSClient() *http.Client { return e.HTTPSClientFor(e.ServerName) }

// HTTPSClientFor trusts the test CA and sends serverName, without
// keep-alives.
func (e *Env) HTTPSClientFor(serverName string) *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: e.CA.Pool, ServerName: serverName, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
		},
	}
}

// Kubectl runs kubectl with the admin token against server (host:port).
func (e *Env) Kubectl(ctx context.Context, server, stdin string, args ...string) (string, error) {
	kc, err := e.AdminKubeconfig(server)
	if err != nil {
		return "", err
	}
	return e.KubectlWith(ctx, kc, stdin, args...)
}

// KubectlWith runs kubectl with the kubeconfig kc, stdin on its standard
// input ("" for none), and returns its combined output.
func (e *Env) KubectlWith(ctx context.Context, kc, stdin string, args ...string) (string, error) {
	full := append([]string{"--kubeconfig=" + kc, "--cache-dir=" + e.Path("kubectl-cache"), "--request-timeout=20s"}, args...)
	cmd := exec.CommandContext(ctx, e.Bins.Kubectl, full...)
	cmd.Env = append(os.Environ(), "HOME="+e.Dir)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// MustKubectl runs kubectl (one minute at most) and fails the test on
// error.
func (e *Env) MustKubectl(t testing.TB, server, stdin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := e.Kubectl(ctx, server, stdin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
