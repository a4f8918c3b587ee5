package systemd_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"testing"
	"time"
)

// freePort returns a loopback TCP port that was free a moment ago, below
// the kernel's ephemeral range (32768 and up) so that no outgoing
// connection takes it before systemd binds it.
func freePort(t *testing.T) int {
	t.Helper()
	for range 1000 {
		port := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			_ = l.Close()
			return port
		}
	}
	t.Fatal("no free port in 20000-31999 on 127.0.0.1")
	return 0
}

// rootInfo is what a stand-in answers on GET /.
type rootInfo struct {
	Kind string `json:"kind"`
	Name string `json:"name"`
}

// requestThrough opens a new connection to proxy, speaks TLS and HTTP/1.1
// through it, and returns the name of the stand-in that answered GET /.
// The dial error is returned unwrapped so callers can test for ECONNREFUSED.
func requestThrough(ctx context.Context, proxy string) (string, error) {
	d := net.Dialer{Timeout: 20 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", proxy)
	if err != nil {
		return "", err
	}
	return requestOn(conn, 20*time.Second)
}

// requestOn speaks TLS and HTTP/1.1 on an open connection (and closes it),
// returning the name of the stand-in that answered GET /.
func requestOn(conn net.Conn, timeout time.Duration) (string, error) {
	defer func() { _ = conn.Close() }()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true, ServerName: "kubernetes"}) //nolint:gosec // stand-in's self-signed certificate
	if _, err := fmt.Fprintf(tc, "GET / HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"); err != nil {
		return "", fmt.Errorf("after connect: write: %w", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return "", fmt.Errorf("after connect: read response: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("after connect: read body: %w", err)
	}
	var info rootInfo
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &info) != nil || info.Kind != "Standin" {
		return "", fmt.Errorf("after connect: answer %s %q", resp.Status, body)
	}
	return info.Name, nil
}
