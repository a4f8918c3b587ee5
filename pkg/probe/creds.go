package probe

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// fileStamp identifies one version of a file: rotated files (a projected
// service-account token swapped by the kubelet, a kubelet client
// certificate renewed in place) change it.
type fileStamp struct {
	mod  time.Time
	size int64
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{mod: fi.ModTime(), size: fi.Size()}, nil
}

// maxTokenBytes bounds what is read of a bearer token file.
const maxTokenBytes = 64 << 10

// tokenFile reads a bearer token from a file and reads it again whenever
// the file changes. One tokenFile is shared by every target of a Prober.
type tokenFile struct {
	path string

	mu    sync.Mutex
	stamp fileStamp
	token string
	err   error
}

// get returns the current token. A file that cannot be read (or is empty)
// yields an error; the last good token is kept only while the file is
// unchanged.
func (t *tokenFile) get() (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, err := stampOf(t.path)
	if err != nil {
		t.token, t.err, t.stamp = "", fmt.Errorf("probe.bearer_token_file %s: %w", t.path, err), fileStamp{}
		return "", t.err
	}
	if st == t.stamp && (t.token != "" || t.err != nil) {
		return t.token, t.err
	}
	b, err := readBounded(t.path, maxTokenBytes)
	t.stamp = st
	switch {
	case err != nil:
		t.token, t.err = "", fmt.Errorf("probe.bearer_token_file %s: %w", t.path, err)
	case len(bytes.TrimSpace(b)) == 0:
		t.token, t.err = "", fmt.Errorf("probe.bearer_token_file %s: empty", t.path)
	default:
		t.token, t.err = string(bytes.TrimSpace(b)), nil
	}
	return t.token, t.err
}

func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path) //nolint:gosec // an operator-configured credential path
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return b, nil
}

// keyPair loads a client certificate and key and loads them again when
// either file changes. gen counts the versions loaded, so that a target
// can redial to present a renewed certificate.
type keyPair struct {
	certPath, keyPath string

	mu     sync.Mutex
	cs, ks fileStamp
	cert   *tls.Certificate
	err    error
	gen    uint64
}

// load returns the current certificate and its generation.
func (k *keyPair) load() (*tls.Certificate, uint64, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cs, err1 := stampOf(k.certPath)
	ks, err2 := stampOf(k.keyPath)
	if err := errors.Join(err1, err2); err != nil {
		return k.cert, k.gen, fmt.Errorf("probe client certificate: %w", err)
	}
	if k.cert != nil && cs == k.cs && ks == k.ks {
		return k.cert, k.gen, nil
	}
	c, err := tls.LoadX509KeyPair(k.certPath, k.keyPath)
	if err != nil {
		// A renewal caught half-written: keep presenting the last good
		// pair, and try again at the next probe.
		k.err = fmt.Errorf("probe client certificate %s / %s: %w", k.certPath, k.keyPath, err)
		return k.cert, k.gen, k.err
	}
	k.cs, k.ks, k.cert, k.err = cs, ks, &c, nil
	k.gen++
	return k.cert, k.gen, nil
}

// getClientCertificate is a tls.Config.GetClientCertificate; with nothing
// loadable it presents no certificate, so the server answers 401 and the
// round still proves liveness.
func (k *keyPair) getClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c, _, _ := k.load()
	if c == nil {
		return &tls.Certificate{}, nil
	}
	return c, nil
}
