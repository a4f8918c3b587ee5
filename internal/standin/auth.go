package standin

import (
	"bufio"
	"bytes"
	"crypto/subtle"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// Users a request can be authenticated as.
const (
	// UserAnonymous is the user of a request without credentials that
	// anonymous authentication let through, as kube-apiserver names it.
	UserAnonymous = "system:anonymous"
	// userToken is the user of an accepted bearer token that names none
	// (a token given in Options.Tokens or a token file line of one field).
	userToken = "token"
)

// authenticator decides who a request is: a bearer token from the static
// set or the token file, a client certificate verified against the
// client CAs, or anonymous.
type authenticator struct {
	require   bool
	forbid    bool
	anonPaths []string
	file      string

	mu       sync.Mutex
	static   map[string]string // token -> user
	fromFile map[string]string
	fileStat fileStamp
	fileErr  error
}

// fileStamp tells whether a token file changed since it was read.
type fileStamp struct {
	mod  time.Time
	size int64
	ok   bool
}

func newAuthenticator(opts Options) (*authenticator, error) {
	a := &authenticator{
		require:   opts.RequireAuth,
		forbid:    opts.ForbidHealth,
		anonPaths: slices.Clone(opts.AllowAnonymousPaths),
		file:      opts.TokenFile,
	}
	a.setTokens(opts.Tokens)
	if a.file != "" {
		if err := a.reload(); err != nil {
			return nil, err
		}
	}
	return a, nil
}

func (a *authenticator) setTokens(tokens []string) {
	m := make(map[string]string, len(tokens))
	for _, t := range tokens {
		if t != "" {
			m[t] = userToken
		}
	}
	a.mu.Lock()
	a.static = m
	a.mu.Unlock()
}

// reload reads the token file again when its modification time or size
// changed since the last read. A file that cannot be read or parsed keeps
// the tokens of the last good read.
func (a *authenticator) reload() error {
	fi, err := os.Stat(a.file)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		a.fileErr = fmt.Errorf("standin: token file: %w", err)
		return a.fileErr
	}
	st := fileStamp{mod: fi.ModTime(), size: fi.Size(), ok: true}
	if st == a.fileStat {
		return a.fileErr
	}
	b, err := os.ReadFile(a.file)
	if err == nil {
		var m map[string]string
		if m, err = parseTokenFile(b); err == nil {
			a.fromFile, a.fileStat, a.fileErr = m, st, nil
			return nil
		}
	}
	a.fileErr = fmt.Errorf("standin: token file %s: %w", a.file, err)
	return a.fileErr
}

// parseTokenFile reads kube-apiserver's static token file format, a CSV
// line per token: token,user,uid,"group1,group2". Only the token is
// required; a line of one field is a bare token. Blank lines and lines
// starting with # are skipped.
func parseTokenFile(b []byte) (map[string]string, error) {
	var kept bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		kept.WriteString(l)
		kept.WriteByte('\n')
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	r := csv.NewReader(&kept)
	r.FieldsPerRecord = -1
	m := map[string]string{}
	for {
		rec, err := r.Read()
		if errors.Is(err, io.EOF) {
			return m, nil
		}
		if err != nil {
			return nil, err
		}
		tok := strings.TrimSpace(rec[0])
		if tok == "" {
			line, _ := r.FieldPos(0)
			return nil, fmt.Errorf("line %d: empty token", line)
		}
		user := userToken
		if len(rec) > 1 && strings.TrimSpace(rec[1]) != "" {
			user = strings.TrimSpace(rec[1])
		}
		m[tok] = user
	}
}

// tokensOn tells whether bearer tokens are looked at: when anonymous
// requests are refused or a token source is configured. Otherwise an
// Authorization header is ignored, as by a kube-apiserver without a token
// authenticator, and the request is anonymous.
func (a *authenticator) tokensOn() bool {
	if a.require || a.file != "" {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.static) > 0
}

// user returns who r is, or "" when r carries credentials that are not
// accepted (an unknown bearer token), and whether r is anonymous.
func (a *authenticator) user(r *http.Request) (user string, anonymous bool) {
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		return r.TLS.VerifiedChains[0][0].Subject.CommonName, false
	}
	h := r.Header.Get("Authorization")
	if h == "" || !a.tokensOn() {
		return UserAnonymous, true
	}
	scheme, tok, _ := strings.Cut(h, " ")
	tok = strings.TrimSpace(tok)
	if !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", false
	}
	if a.file != "" {
		_ = a.reload()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range []map[string]string{a.static, a.fromFile} {
		for t, u := range m {
			if subtle.ConstantTimeCompare([]byte(t), []byte(tok)) == 1 {
				return u, false
			}
		}
	}
	return "", false
}

// Status is the JSON body of kube-apiserver's error answers.
type Status struct {
	Kind       string            `json:"kind"`
	APIVersion string            `json:"apiVersion"`
	Metadata   map[string]string `json:"metadata"`
	Status     string            `json:"status"`
	Message    string            `json:"message"`
	Reason     string            `json:"reason"`
	Details    map[string]string `json:"details,omitempty"`
	Code       int               `json:"code"`
}

func writeStatus(w http.ResponseWriter, code int, reason, message string) {
	st := Status{Kind: "Status", APIVersion: "v1", Metadata: map[string]string{}, Status: "Failure",
		Message: message, Reason: reason, Code: code}
	if code == http.StatusForbidden {
		st.Details = map[string]string{}
	}
	w.Header().Set("Cache-Control", "no-cache, private")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	writeJSONStatus(w, code, st)
}

func isHealthPath(p string) bool {
	return p == "/readyz" || p == "/healthz" || p == "/livez"
}

// check answers 401 or 403 and returns false when r may not go on; it
// returns the user r is authenticated as otherwise.
func (a *authenticator) check(w http.ResponseWriter, r *http.Request) (string, bool) {
	user, anon := a.user(r)
	if user == "" || (anon && a.require && !slices.Contains(a.anonPaths, r.URL.Path)) {
		writeStatus(w, http.StatusUnauthorized, "Unauthorized", "Unauthorized")
		return "", false
	}
	if anon && a.forbid && isHealthPath(r.URL.Path) {
		writeStatus(w, http.StatusForbidden, "Forbidden",
			fmt.Sprintf("forbidden: User %q cannot get path %q", UserAnonymous, r.URL.Path))
		return "", false
	}
	return user, true
}
