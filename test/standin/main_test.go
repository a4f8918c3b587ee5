package main

import (
	"bufio"
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRunServesAndStopsOnSignal runs the command in-process: it must print one
// line per listener, toggle readiness on SIGUSR1 and exit 0 on SIGTERM.
func TestRunServesAndStopsOnSignal(t *testing.T) {
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0", "--name", "a", "--log-level", "error"}, pw, io.Discard)
		_ = pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	var addrs []string
	for len(addrs) < 2 && sc.Scan() {
		line := sc.Text()
		addr, ok := strings.CutPrefix(line, "standin a listening on ")
		if !ok {
			t.Fatalf("unexpected stdout line %q", line)
		}
		addrs = append(addrs, addr)
	}
	if len(addrs) != 2 {
		t.Fatalf("got listening lines for %v, want two", addrs)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // self-signed test server
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	readyz := func(addr string) int {
		resp, err := c.Get("https://" + addr + "/readyz")
		if err != nil {
			t.Fatalf("GET /readyz on %s: %v", addr, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	for _, a := range addrs {
		if code := readyz(a); code != http.StatusOK {
			t.Errorf("GET /readyz on %s = %d, want 200", a, code)
		}
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for readyz(addrs[1]) != http.StatusInternalServerError {
		if time.Now().After(deadline) {
			t.Fatal("still ready 30 s after SIGUSR1")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("exit status %d after SIGTERM, want 0", code)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("still running 30 s after SIGTERM")
	}
	_, _ = io.Copy(io.Discard, pr)
}

func TestRunRejectsBadFlags(t *testing.T) {
	for _, args := range [][]string{{"--listen", "nope"}, {"--log-level", "loud"}, {"extra"}} {
		if code := run(args, io.Discard, io.Discard); code != 2 {
			t.Errorf("run(%q) = %d, want 2", args, code)
		}
	}
}

// runInProcess runs the command with args and one listener, returns its
// address and a function that stops it with SIGTERM and checks its exit.
func runInProcess(t *testing.T, args ...string) (string, func()) {
	t.Helper()
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		done <- run(append([]string{"--listen", "127.0.0.1:0", "--name", "x", "--log-level", "error"}, args...), pw, io.Discard)
		_ = pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	if !sc.Scan() {
		t.Fatalf("run %q: no listening line (exit %d)", args, <-done)
	}
	addr, ok := strings.CutPrefix(sc.Text(), "standin x listening on ")
	if !ok {
		t.Fatalf("unexpected stdout line %q", sc.Text())
	}
	return addr, func() {
		t.Helper()
		if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("exit status %d after SIGTERM, want 0", code)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("still running 30 s after SIGTERM")
		}
		_, _ = io.Copy(io.Discard, pr)
	}
}

func status(t *testing.T, c *http.Client, url, token string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode
}

func httpsClient(t *testing.T, certs ...tls.Certificate) *http.Client {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, Certificates: certs}} //nolint:gosec // self-signed test server
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// TestRunAnonymousAuthOff: with --anonymous-auth=false only the token, the
// written client certificate and the anonymous paths get through; a second
// run trusts the written CA through --client-ca-file, reads --token-file and
// forbids the health paths to anonymous callers.
func TestRunAnonymousAuthOff(t *testing.T) {
	dir := t.TempDir()
	addr, stop := runInProcess(t, "--anonymous-auth=false", "--client-cert-out", dir,
		"--token", "tok-1", "--token", "tok,2", "--anonymous-paths", "/livez,/healthz")
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key"))
	if err != nil {
		t.Fatalf("written client certificate: %v", err)
	}
	anon, withCert := httpsClient(t), httpsClient(t, cert)
	base := "https://" + addr
	for _, c := range []struct {
		name   string
		client *http.Client
		path   string
		token  string
		want   int
	}{
		{"anonymous", anon, "/readyz", "", 401},
		{"anonymous", anon, "/", "", 401},
		{"anonymous, allowed path", anon, "/livez", "", 200},
		{"anonymous, allowed path", anon, "/healthz", "", 200},
		{"first token", anon, "/readyz", "tok-1", 200},
		{"token with a comma", anon, "/readyz", "tok,2", 200},
		{"unknown token", anon, "/readyz", "tok-3", 401},
		{"client certificate", withCert, "/readyz", "", 200},
		{"client certificate", withCert, "/", "", 200},
	} {
		if got := status(t, c.client, base+c.path, c.token); got != c.want {
			t.Errorf("%s: GET %s = %d, want %d", c.name, c.path, got, c.want)
		}
	}
	stop()

	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte("file-token,probe,1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr, stop = runInProcess(t, "--client-ca-file", filepath.Join(dir, "ca.crt"), "--token-file", tokens, "--forbid-health")
	base = "https://" + addr
	anon, withCert = httpsClient(t), httpsClient(t, cert)
	for _, c := range []struct {
		name   string
		client *http.Client
		path   string
		token  string
		want   int
	}{
		{"anonymous", anon, "/readyz", "", 403},
		{"anonymous", anon, "/livez", "", 403},
		{"anonymous", anon, "/", "", 200},
		{"file token", anon, "/readyz", "file-token", 200},
		{"client certificate of the trusted CA", withCert, "/readyz", "", 200},
	} {
		if got := status(t, c.client, base+c.path, c.token); got != c.want {
			t.Errorf("second run, %s: GET %s = %d, want %d", c.name, c.path, got, c.want)
		}
	}
	stop()
}

func TestRunRejectsBadCredentialFiles(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--listen", "127.0.0.1:0", "--client-ca-file", filepath.Join(dir, "missing.crt")},
		{"--listen", "127.0.0.1:0", "--client-ca-file", notPEM},
		{"--listen", "127.0.0.1:0", "--token-file", filepath.Join(dir, "missing.csv")},
	} {
		if code := run(args, io.Discard, io.Discard); code != 1 {
			t.Errorf("run(%q) = %d, want 1", args, code)
		}
	}
}
