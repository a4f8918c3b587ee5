package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Bins are the programs of the control plane.
type Bins struct {
	APIServer, Etcd, Kubectl string
	// Dir is where FindBins looked, named by envVar.
	Dir    string
	envVar string
}

// BinDir is the directory the environment variable envVar names, or the
// repository's bin (where make builds the Kubernetes commands).
func BinDir(envVar string) (string, error) {
	if d := os.Getenv(envVar); d != "" {
		return d, nil
	}
	abs, err := filepath.Abs("../../bin")
	if err != nil {
		return "", fmt.Errorf("bin directory: %w", err)
	}
	return abs, nil
}

// Find returns dir/name if it exists, else (with path) name as found in
// PATH. envVar is the variable that names dir, for the error.
func Find(dir, envVar, name string, path bool) (string, error) {
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	if path {
		if lp, err := exec.LookPath(name); err == nil {
			return lp, nil
		}
		return "", fmt.Errorf("%s not found in %s (%s) nor in PATH", name, dir, envVar)
	}
	return "", fmt.Errorf("%s not found in %s (%s)", name, dir, envVar)
}

// FindBins finds kube-apiserver, kubectl (also in PATH) and etcd (also in
// PATH) in the directory envVar names (BinDir).
func FindBins(envVar string) (Bins, error) {
	var b Bins
	var err error
	if b.Dir, err = BinDir(envVar); err != nil {
		return b, err
	}
	b.envVar = envVar
	if b.APIServer, err = b.Find("kube-apiserver", false); err != nil {
		return b, err
	}
	if b.Kubectl, err = b.Find("kubectl", true); err != nil {
		return b, err
	}
	if b.Etcd, err = b.Find("etcd", true); err != nil {
		return b, err
	}
	return b, nil
}

// Find finds another program the way FindBins found the control plane's.
func (b Bins) Find(name string, path bool) (string, error) {
	return Find(b.Dir, b.envVar, name, path)
}
