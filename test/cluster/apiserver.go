package cluster

import (
	"net"
	"net/http"
	"testing"
	"time"
)

// APIServerPort is every apiserver's secure port.
const APIServerPort = "6443"

// APIServer is one kube-apiserver of the test cluster.
type APIServer struct {
	// IP is the address it binds and advertises.
	IP string
	P  *Proc
	// Extra are the flags it was started with beyond the common ones; a
	// restart passes them again.
	Extra []string
	// AuditLog is the audit log, for a caller that passes audit flags.
	AuditLog string
}

// Addr is the apiserver's host:port.
func (a *APIServer) Addr() string { return net.JoinHostPort(a.IP, APIServerPort) }

// APIServerArgs is the command line (for unshare) of an apiserver on ip:
// in a UTS namespace of its own with a host name of its own (its identity
// lease is named after the host name, and apiservers sharing one would
// fight over a single lease), bound to and advertising ip, with the
// service range of ip's family, the run's certificates and tokens, RBAC,
// then Env.APIServerFlags and extra (a later flag wins over an earlier
// one, so extra may set --service-cluster-ip-range of both families).
func (e *Env) APIServerArgs(ip string, extra ...string) []string {
	return e.apiServerArgs(ip, ip, EtcdURL, extra)
}

// apiServerArgs is APIServerArgs with the bind address and etcd's URL of
// its own.
func (e *Env) apiServerArgs(ip, bind, etcd string, extra []string) []string {
	mode := e.AuthorizationMode
	if mode == "" {
		mode = "RBAC"
	}
	args := []string{"--uts", "--", "sh", "-c", `hostname "$0" && exec "$@"`, "apiserver-" + hostLabel(ip), e.Bins.APIServer,
		"--etcd-servers=" + etcd,
		"--bind-address=" + bind, "--secure-port=" + APIServerPort, "--advertise-address=" + ip,
		"--cert-dir=" + e.Path("certs-"+hostLabel(ip)),
		"--tls-cert-file=" + e.CertFile, "--tls-private-key-file=" + e.KeyFile,
		"--client-ca-file=" + e.CA.File,
		"--token-auth-file=" + e.TokenFile,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + e.SAKeyFile,
		"--service-account-signing-key-file=" + e.SAKeyFile,
		"--service-cluster-ip-range=" + ServiceCIDR(ip),
		"--authorization-mode=" + mode,
		"--profiling=false",
	}
	args = append(args, e.APIServerFlags...)
	return append(args, extra...)
}

// StartAPIServer starts a kube-apiserver on ip with the extra flags, not
// waiting for it.
func (e *Env) StartAPIServer(ip string, extra ...string) (*APIServer, error) {
	p, err := e.Start("apiserver-"+ip, "unshare", e.APIServerArgs(ip, extra...)...)
	if err != nil {
		return nil, err
	}
	return &APIServer{IP: ip, P: p, Extra: extra}, nil
}

// RunAPIServer starts a kube-apiserver on ip for the test t (not waiting
// for it): it is killed when t ends and its log's last lines are shown if
// t failed.
func (e *Env) RunAPIServer(t testing.TB, ip string, extra ...string) *APIServer {
	t.Helper()
	a, err := e.StartAPIServer(ip, extra...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if a.P.Running() {
			a.P.Kill()
		}
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", a.P.Name, a.P.Tail(15))
		}
	})
	return a
}

// RerunAPIServer starts a (stopped) again on its address with the flags it
// had, for the test t.
func (e *Env) RerunAPIServer(t testing.TB, a *APIServer) {
	t.Helper()
	*a = *e.RunAPIServer(t, a.IP, a.Extra...)
}

// Ready reports whether the apiserver answers /readyz with 200 to the
// admin.
func (e *Env) Ready(a *APIServer) bool {
	req, err := http.NewRequest(http.MethodGet, "https://"+a.Addr()+"/readyz", nil)
	if err != nil {
		return false
	}
	req.Header.Set("Authorization", "Bearer "+e.AdminToken)
	resp, err := e.HTTPSClient().Do(req)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Answers reports whether the apiserver answers HTTPS requests at all (it
// serves requests before /readyz passes).
func (e *Env) Answers(a *APIServer) bool {
	resp, err := e.HTTPSClient().Get("https://" + a.Addr() + "/readyz")
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return true
}

// WaitReady waits up to 3 minutes for the apiservers to be ready and
// returns when the last one became ready; it fails t if one exits or the
// time runs out.
func (e *Env) WaitReady(t testing.TB, as ...*APIServer) time.Time {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for _, a := range as {
		for !e.Ready(a) {
			if !a.P.Running() {
				t.Fatalf("%s exited: %v\n%s", a.P.Name, a.P.Err, a.P.Tail(30))
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not ready within 3 minutes:\n%s", a.P.Name, a.P.Tail(30))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return time.Now()
}
