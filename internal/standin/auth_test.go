package standin_test

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/internal/standin"
)

// authClient trusts s's certificate, presents cert when it is not nil and
// speaks h2 unless h1 is set.
func authClient(t *testing.T, s *standin.Server, cert *tls.Certificate, h1 bool) *http.Client {
	t.Helper()
	c := client(t, s, h1)
	tr := c.Transport.(*http.Transport)
	if cert != nil {
		tr.TLSClientConfig.Certificates = []tls.Certificate{*cert}
	}
	return c
}

// getAs sends GET url with the bearer token (none when empty).
func getAs(t *testing.T, c *http.Client, url, token string) (int, string, http.Header) {
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
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", url, err)
	}
	return resp.StatusCode, string(b), resp.Header
}

// wantStatus checks a kube-apiserver Status body.
func wantStatus(t *testing.T, what, body string, code int, reason string) {
	t.Helper()
	var st standin.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("%s: body %q is not a Status: %v", what, body, err)
	}
	if st.Kind != "Status" || st.APIVersion != "v1" || st.Status != "Failure" || st.Reason != reason || st.Code != code || st.Message == "" {
		t.Errorf("%s: Status %+v, want kind Status, apiVersion v1, status Failure, reason %s, code %d and a message", what, st, reason, code)
	}
}

// userOf reads who GET / says the request was authenticated as.
func userOf(t *testing.T, c *http.Client, s *standin.Server, token string) string {
	t.Helper()
	code, body, _ := getAs(t, c, s.URL()+"/", token)
	if code != http.StatusOK {
		t.Fatalf("GET / = %d %q, want 200", code, body)
	}
	var info standin.RootInfo
	if err := json.Unmarshal([]byte(body), &info); err != nil {
		t.Fatalf("GET / body %q: %v", body, err)
	}
	return info.User
}

func TestRequireAuthAnswers401(t *testing.T) {
	s := start(t, standin.Options{Name: "locked", RequireAuth: true})
	for _, h1 := range []bool{true, false} {
		c := client(t, s, h1)
		for _, p := range []string{"/readyz", "/healthz", "/livez", "/", "/version", "/nope"} {
			code, body, h := getAs(t, c, s.URL()+p, "")
			if code != http.StatusUnauthorized {
				t.Errorf("anonymous GET %s = %d, want 401", p, code)
			}
			wantStatus(t, "anonymous GET "+p, body, http.StatusUnauthorized, "Unauthorized")
			if h.Get("Content-Type") != "application/json" || h.Get("X-Standin-Name") != "locked" {
				t.Errorf("anonymous GET %s: Content-Type %q, X-Standin-Name %q", p, h.Get("Content-Type"), h.Get("X-Standin-Name"))
			}
		}
		var st map[string]any
		_, body, _ := getAs(t, c, s.URL()+"/readyz", "")
		if err := json.Unmarshal([]byte(body), &st); err != nil || st["message"] != "Unauthorized" || st["code"] != float64(401) {
			t.Errorf("401 body = %q, want message Unauthorized and code 401", body)
		}
	}
	// The control paths stay open, and readiness still changes what an
	// authenticated client would see, not the 401.
	c := client(t, s, true)
	if code := post(t, c, s.URL()+"/control/unready"); code != http.StatusOK {
		t.Fatalf("anonymous POST /control/unready = %d, want 200", code)
	}
	if s.Ready() {
		t.Error("Ready() = true after /control/unready")
	}
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", ""); code != http.StatusUnauthorized {
		t.Errorf("unready, anonymous GET /readyz = %d, want 401", code)
	}
}

func TestTokenAccepted(t *testing.T) {
	s := start(t, standin.Options{RequireAuth: true, Tokens: []string{"s3cret"}})
	c := client(t, s, false)
	if code, body, _ := getAs(t, c, s.URL()+"/readyz", "s3cret"); code != http.StatusOK || body != "ok" {
		t.Errorf("GET /readyz with the token = %d %q, want 200 ok", code, body)
	}
	if u := userOf(t, c, s, "s3cret"); u != "token" {
		t.Errorf("user with the token = %q, want token", u)
	}
	s.SetReady(false)
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", "s3cret"); code != http.StatusInternalServerError {
		t.Errorf("unready, GET /readyz with the token = %d, want 500", code)
	}
	code, body, _ := getAs(t, c, s.URL()+"/readyz", "wrong")
	if code != http.StatusUnauthorized {
		t.Errorf("GET /readyz with a wrong token = %d, want 401", code)
	}
	wantStatus(t, "wrong token", body, http.StatusUnauthorized, "Unauthorized")
}

func TestAnonymousAllowedByDefault(t *testing.T) {
	// No token source: an Authorization header is not looked at.
	s := start(t, standin.Options{})
	c := client(t, s, true)
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", "anything"); code != http.StatusOK {
		t.Errorf("default server, GET /readyz with a token = %d, want 200", code)
	}
	if u := userOf(t, c, s, ""); u != standin.UserAnonymous {
		t.Errorf("default server, user = %q, want %s", u, standin.UserAnonymous)
	}
	// With tokens but anonymous allowed, no token is anonymous and a wrong
	// one is refused, as kube-apiserver does.
	s2 := start(t, standin.Options{Tokens: []string{"good"}})
	c2 := client(t, s2, true)
	if code, _, _ := getAs(t, c2, s2.URL()+"/readyz", ""); code != http.StatusOK {
		t.Errorf("anonymous allowed, GET /readyz without a token = %d, want 200", code)
	}
	if code, _, _ := getAs(t, c2, s2.URL()+"/readyz", "bad"); code != http.StatusUnauthorized {
		t.Errorf("anonymous allowed, GET /readyz with a wrong token = %d, want 401", code)
	}
}

func TestClientCertificateAccepted(t *testing.T) {
	pki, err := standin.GenerateClientPKI("system:node:n1", "system:nodes")
	if err != nil {
		t.Fatal(err)
	}
	s := start(t, standin.Options{RequireAuth: true, ClientCAs: pki.Pool})
	for _, h1 := range []bool{true, false} {
		c := authClient(t, s, &pki.Certificate, h1)
		if code, body, _ := getAs(t, c, s.URL()+"/readyz", ""); code != http.StatusOK || body != "ok" {
			t.Errorf("GET /readyz with a client certificate = %d %q, want 200 ok", code, body)
		}
		if u := userOf(t, c, s, ""); u != "system:node:n1" {
			t.Errorf("user with a client certificate = %q, want system:node:n1", u)
		}
	}
	if code, _, _ := getAs(t, client(t, s, true), s.URL()+"/readyz", ""); code != http.StatusUnauthorized {
		t.Errorf("GET /readyz without a client certificate = %d, want 401", code)
	}
	// A certificate of another CA fails the handshake.
	other, err := standin.GenerateClientPKI("intruder")
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := authClient(t, s, &other.Certificate, true).Get(s.URL() + "/readyz"); err == nil {
		_ = resp.Body.Close()
		t.Errorf("GET /readyz with a certificate of another CA = %d, want a failed handshake", resp.StatusCode)
	}
}

func TestAllowAnonymousPaths(t *testing.T) {
	s := start(t, standin.Options{RequireAuth: true, AllowAnonymousPaths: []string{"/readyz", "/livez"}})
	c := client(t, s, false)
	want := map[string]int{"/readyz": 200, "/livez": 200, "/healthz": 401, "/": 401, "/readyz/": 401}
	for p, w := range want {
		if code, _, _ := getAs(t, c, s.URL()+p, ""); code != w {
			t.Errorf("anonymous GET %s = %d, want %d", p, code, w)
		}
	}
}

func TestForbidHealth(t *testing.T) {
	s := start(t, standin.Options{ForbidHealth: true, Tokens: []string{"t"}})
	c := client(t, s, true)
	for _, p := range []string{"/readyz", "/healthz", "/livez"} {
		code, body, _ := getAs(t, c, s.URL()+p, "")
		if code != http.StatusForbidden {
			t.Errorf("anonymous GET %s = %d, want 403", p, code)
		}
		wantStatus(t, "anonymous GET "+p, body, http.StatusForbidden, "Forbidden")
		if !strings.Contains(body, `system:anonymous`) || !strings.Contains(body, p) {
			t.Errorf("403 body %q does not name the user and the path", body)
		}
		if code, _, _ := getAs(t, c, s.URL()+p, "t"); code != http.StatusOK {
			t.Errorf("GET %s with a token = %d, want 200", p, code)
		}
	}
	if code, _, _ := getAs(t, c, s.URL()+"/", ""); code != http.StatusOK {
		t.Errorf("anonymous GET / = %d, want 200", code)
	}

	// Allowed anonymous paths are authorized like any anonymous request.
	s2 := start(t, standin.Options{RequireAuth: true, ForbidHealth: true, AllowAnonymousPaths: []string{"/readyz"}})
	c2 := client(t, s2, true)
	if code, _, _ := getAs(t, c2, s2.URL()+"/readyz", ""); code != http.StatusForbidden {
		t.Errorf("anonymous GET /readyz, allowed path, health forbidden = %d, want 403", code)
	}
	if code, _, _ := getAs(t, c2, s2.URL()+"/livez", ""); code != http.StatusUnauthorized {
		t.Errorf("anonymous GET /livez, not an allowed path = %d, want 401", code)
	}
}

func TestSetTokensAtRuntime(t *testing.T) {
	s := start(t, standin.Options{RequireAuth: true, Tokens: []string{"old"}})
	c := client(t, s, false)
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", "old"); code != http.StatusOK {
		t.Fatalf("GET /readyz with the old token = %d, want 200", code)
	}
	s.SetTokens([]string{"new"})
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", "old"); code != http.StatusUnauthorized {
		t.Errorf("after SetTokens, GET /readyz with the old token = %d, want 401", code)
	}
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", "new"); code != http.StatusOK {
		t.Errorf("after SetTokens, GET /readyz with the new token = %d, want 200", code)
	}
}

func TestTokenFileIsReadAgain(t *testing.T) {
	f := filepath.Join(t.TempDir(), "tokens.csv")
	if err := os.WriteFile(f, []byte("# static tokens\nfirst-token,alice,1,\"system:masters,dev\"\n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := start(t, standin.Options{RequireAuth: true, TokenFile: f})
	c := client(t, s, true)
	if u := userOf(t, c, s, "first-token"); u != "alice" {
		t.Errorf("user of the file's token = %q, want alice", u)
	}
	// Rotate: the file now holds another token (of another length, so
	// that the change shows even where modification times are coarse).
	if err := os.WriteFile(f, []byte("second-token-rotated\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		oldCode, _, _ := getAs(t, c, s.URL()+"/readyz", "first-token")
		newCode, _, _ := getAs(t, c, s.URL()+"/readyz", "second-token-rotated")
		if oldCode == http.StatusUnauthorized && newCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30 s after the rotation: old token %d, new token %d; want 401 and 200", oldCode, newCode)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if u := userOf(t, c, s, "second-token-rotated"); u != "token" {
		t.Errorf("user of a bare token line = %q, want token", u)
	}

	// A broken file keeps the last good tokens.
	if err := os.WriteFile(f, []byte("\"unterminated\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := getAs(t, c, s.URL()+"/readyz", "second-token-rotated"); code != http.StatusOK {
		t.Errorf("after a broken rewrite, GET /readyz with the last good token = %d, want 200", code)
	}

	missing := filepath.Join(t.TempDir(), "none.csv")
	if _, err := standin.Start(t.Context(), standin.Options{TokenFile: missing}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("Start with a missing token file: err %v, want one naming it", err)
	}
}
