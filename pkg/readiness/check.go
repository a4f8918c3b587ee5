package readiness

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// answer is the outcome of one GET /readyz: an explicit verdict (explicit
// true), or why there is none.
type answer struct {
	verdict  Verdict
	explicit bool
	err      error
}

// classify turns a status and body into an answer. 200 is ready; 401 and
// 403 prove the apiserver alive but say nothing about its readiness; any
// other status is an explicit "not ready", with its first failing check
// as the reason.
func classify(code int, body []byte) answer {
	switch code {
	case http.StatusOK:
		return answer{verdict: Verdict{Ready: true, Code: code}, explicit: true}
	case http.StatusUnauthorized, http.StatusForbidden:
		return answer{err: fmt.Errorf("/readyz answered %d: readiness unknown to this identity", code)}
	}
	return answer{verdict: Verdict{Code: code, Reason: reasonOf(code, body)}, explicit: true}
}

// reasonOf is the line of a /readyz body that says why: the first failing
// check ("[-]etcd failed: reason withheld") when the body lists checks,
// else its first line; cut to MaxReasonBytes, and the status text when the
// body is empty.
func reasonOf(code int, body []byte) string {
	var first, failing string
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		if first == "" {
			first = line
		}
		if strings.HasPrefix(line, "[-]") {
			failing = line
			break
		}
	}
	r := failing
	if r == "" {
		r = first
	}
	if r == "" {
		r = http.StatusText(code)
	}
	r = strings.ToValidUTF8(r, "?")
	if len(r) > MaxReasonBytes {
		r = strings.ToValidUTF8(r[:MaxReasonBytes], "")
	}
	if r == "" {
		r = fmt.Sprintf("status %d", code)
	}
	return r
}

// maxBody is how much of a /readyz answer is read.
const maxBody = 16 << 10

// checker probes one apiserver's /readyz on its own kept-alive connection.
// It belongs to the Publisher's lead loop, which closes it when the
// apiserver leaves the list or leadership ends.
type checker struct {
	addr   string
	tr     *http.Transport
	client *http.Client
}

// newChecker builds the checker of addr. wrap adds the credentials (it
// may be nil).
func newChecker(addr string, tlsConf *tls.Config, wrap func(http.RoundTripper) http.RoundTripper, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *checker {
	var conf *tls.Config
	if tlsConf != nil {
		conf = tlsConf.Clone()
	}
	tr := &http.Transport{
		DialContext:         dial,
		TLSClientConfig:     conf,
		MaxIdleConns:        1,
		MaxIdleConnsPerHost: 1,
		MaxConnsPerHost:     1,
		IdleConnTimeout:     5 * time.Minute,
		DisableCompression:  true,
		// HTTP/1.1: one request at a time on one connection is all a
		// probe needs.
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	var rt http.RoundTripper = tr
	if wrap != nil {
		rt = wrap(tr)
	}
	return &checker{addr: addr, tr: tr, client: &http.Client{
		Transport:     rt,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// check sends one GET /readyz bounded by timeout.
func (c *checker) check(ctx context.Context, timeout time.Duration) answer {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+c.addr+"/readyz", nil)
	if err != nil {
		return answer{err: fmt.Errorf("request for %s: %w", c.addr, err)}
	}
	req.Header.Set("User-Agent", userAgent)
	resp, err := c.client.Do(req)
	if err != nil {
		return answer{err: fmt.Errorf("GET https://%s/readyz: %w", c.addr, err)}
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		// The status line came: it is still an explicit answer.
		body = nil
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
	return classify(resp.StatusCode, body)
}

// close drops the checker's connection.
func (c *checker) close() { c.tr.CloseIdleConnections() }
