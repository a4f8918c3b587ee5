package cluster

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Kubeconfig is what one kubeconfig holds: the server, the CA the run's
// own, and one credential (a token, or a client certificate and key).
type Kubeconfig struct {
	Server     string // https URL
	ServerName string // tls-server-name ("" for none)
	Token      string
	Cert, Key  string
}

// Kubeconfig writes a kubeconfig for user and returns its path.
func (e *Env) Kubeconfig(user string, k Kubeconfig) (string, error) {
	var cluster strings.Builder
	fmt.Fprintf(&cluster, "    server: %s\n    certificate-authority: %s\n", k.Server, e.CA.File)
	if k.ServerName != "" {
		fmt.Fprintf(&cluster, "    tls-server-name: %s\n", k.ServerName)
	}
	var cred string
	if k.Token != "" {
		cred = "    token: " + k.Token + "\n"
	} else {
		cred = fmt.Sprintf("    client-certificate: %s\n    client-key: %s\n", k.Cert, k.Key)
	}
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: %[1]s
  cluster:
%[2]susers:
- name: %[3]s
  user:
%[4]scontexts:
- name: %[1]s
  context: {cluster: %[1]s, user: %[3]s}
current-context: %[1]s
`, e.Name, cluster.String(), user, cred)
	return WriteKubeconfigFile(e.Dir, user, doc)
}

// TokenKubeconfig writes a kubeconfig for server (an https URL) with the
// given token and returns its path.
func (e *Env) TokenKubeconfig(user, server, token string) (string, error) {
	return e.Kubeconfig(user, Kubeconfig{Server: server, ServerName: e.ServerName, Token: token})
}

// CertKubeconfig writes a kubeconfig for server (an https URL) with a
// client certificate and returns its path.
func (e *Env) CertKubeconfig(user, server, certFile, keyFile string) (string, error) {
	return e.Kubeconfig(user, Kubeconfig{Server: server, ServerName: e.ServerName, Cert: certFile, Key: keyFile})
}

// AdminKubeconfig writes the admin kubeconfig for server (host:port).
func (e *Env) AdminKubeconfig(server string) (string, error) {
	return e.TokenKubeconfig(AdminUser, "https://"+server, e.AdminToken)
}

// WriteKubeconfigFile writes the kubeconfig doc to a file of its own in
// dir, named by name and its content, and returns its path. kubectl runs
// read kubeconfigs while other steps write theirs: each file is written
// once, under a temporary name and then renamed into place, so no reader
// sees one half written or with another server's address.
func WriteKubeconfigFile(dir, name, doc string) (string, error) {
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
