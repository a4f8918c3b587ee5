package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// clientCert is the client certificate the harness's clients present when
// a stand-in asks for one (the scenarios with anonymous authentication
// off), as kubelets authenticate; nil until such stand-ins wrote it.
var clientCert atomic.Pointer[tls.Certificate]

// tlsConf is what every client of the harness uses: the stand-ins present
// self-signed certificates and the harness measures transport, not PKI.
// A stand-in that verifies client certificates gets clientCert.
func tlsConf() *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12, //nolint:gosec // self-signed stand-ins on loopback
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if c := clientCert.Load(); c != nil {
				return c, nil
			}
			return &tls.Certificate{}, nil
		}}
}

// httpClient speaks HTTP/1.1 over one keep-alive connection per client
// (unless keepAlive is off), so each load worker is one proxied connection.
type httpClient struct {
	*http.Client
	tr *http.Transport
}

func newHTTPClientKA(timeout time.Duration, keepAlive bool) *httpClient {
	tr := &http.Transport{
		TLSClientConfig:     tlsConf(),
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost: 4,
		DisableKeepAlives:   !keepAlive,
		DisableCompression:  true,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}
	return &httpClient{Client: &http.Client{Transport: tr, Timeout: timeout}, tr: tr}
}

func newHTTPClient(timeout time.Duration) *httpClient { return newHTTPClientKA(timeout, true) }

func (c *httpClient) CloseIdleConnections() { c.tr.CloseIdleConnections() }

// get fetches https://addr+path and returns the status and the name of the
// stand-in that answered.
func (c *httpClient) get(ctx context.Context, addr, path string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+path, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("X-Standin-Name"), err
}

// perfResult holds one run's figures for one set-up.
type perfResult struct {
	KARps       float64 `json:"ka_rps"`
	KAP50ms     float64 `json:"ka_p50_ms"`
	KAP99ms     float64 `json:"ka_p99_ms"`
	KAErrors    int64   `json:"ka_errors"`
	CPUPer10k   float64 `json:"cpu_s_per_10k"`
	NewConnRate float64 `json:"new_conns_per_s"`
	NCErrors    int64   `json:"nc_errors"`
	Bulk1MBs    float64 `json:"bulk1_mb_s"`
	Bulk4MBs    float64 `json:"bulk4_mb_s"`
	IdleKiB     float64 `json:"idle_kib_per_conn"`
	IdleOpened  int     `json:"idle_opened"`
	StartReady  float64 `json:"start_ready_ms"`
	// The keep-alive load again from wrk (-t2 -c32), a C client that costs
	// less per request than the Go one; the CPU is the balancer's during it.
	WrkRps       float64 `json:"wrk_rps,omitempty"`
	WrkP50ms     float64 `json:"wrk_p50_ms,omitempty"`
	WrkP99ms     float64 `json:"wrk_p99_ms,omitempty"`
	WrkErrors    int64   `json:"wrk_errors,omitempty"`
	WrkCPUPer10k float64 `json:"wrk_cpu_s_per_10k,omitempty"`
	// Go runtime figures per idle connection (extractedprism only).
	GoroutinesPerConn float64 `json:"goroutines_per_conn,omitempty"`
	StackKiBPerConn   float64 `json:"stack_kib_per_conn,omitempty"`
	HeapKiBPerConn    float64 `json:"heap_kib_per_conn,omitempty"`
	// Growth of the balancer's RSS and PSS per slow reader (a client
	// downloading through it while reading slowly), peak minus base; set
	// on the medians only, from the one slow-reader measurement of a run.
	SlowRSSKiB float64 `json:"slow_rss_kib_per_reader,omitempty"`
	SlowPSSKiB float64 `json:"slow_pss_kib_per_reader,omitempty"`
}

// keepAlive runs workers keep-alive clients doing GET / for d and returns
// requests/s, p50, p99 and the errors.
func keepAlive(ctx context.Context, targets []string, workers int, d time.Duration) (rps, p50, p99 float64, reqs, errs int64) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	lat := make([][]time.Duration, workers)
	var nerr atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Go(func() {
			c := newHTTPClient(10 * time.Second)
			defer c.CloseIdleConnections()
			addr := targets[w%len(targets)]
			l := make([]time.Duration, 0, 1<<14)
			for ctx.Err() == nil {
				t0 := time.Now()
				code, _, err := c.get(ctx, addr, "/")
				if dl, _ := ctx.Deadline(); ctx.Err() != nil || !time.Now().Before(dl) {
					break
				}
				if err != nil || code != http.StatusOK {
					nerr.Add(1)
					continue
				}
				l = append(l, time.Since(t0))
			}
			lat[w] = l
		})
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	all := slices.Concat(lat...)
	slices.Sort(all)
	reqs = int64(len(all))
	return float64(reqs) / el, ms(pct(all, 0.50)), ms(pct(all, 0.99)), reqs, nerr.Load()
}

func pct(s []time.Duration, q float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	i := int(float64(len(s)-1) * q)
	return s[i]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// newConns measures new TLS connections per second: dial, full handshake,
// one request, close.
func newConns(ctx context.Context, targets []string, workers int, d time.Duration) (rate float64, errs int64, firstErr error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var ok, nerr atomic.Int64
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Go(func() {
			addr := targets[w%len(targets)]
			buf := make([]byte, 4096)
			for ctx.Err() == nil {
				if err := oneShot(ctx, addr, buf); err != nil {
					// A dial after the deadline fails at once, possibly
					// before ctx reports it is done: not an error.
					if dl, _ := ctx.Deadline(); time.Now().Before(dl) {
						nerr.Add(1)
						errOnce.Do(func() { firstErr = err })
					}
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	return float64(ok.Load()) / time.Since(start).Seconds(), nerr.Load(), firstErr
}

// oneShot opens a TLS connection, sends GET /readyz with Connection: close
// and reads the answer to the end.
func oneShot(ctx context.Context, addr string, buf []byte) error {
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer func() { _ = raw.Close() }()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	c := tls.Client(raw, tlsConf())
	if _, err := io.WriteString(c, "GET /readyz HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"); err != nil {
		return err
	}
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			if errors.Is(err, io.EOF) && n > 12 && string(buf[9:12]) == "200" {
				return nil
			}
			return fmt.Errorf("read answer (%d bytes): %w", n, err)
		}
		if n == len(buf) {
			n = 12 // keep the status line, discard the rest
		}
	}
}

// bulk measures download throughput with streams parallel keep-alive
// downloads of /bulk for d, in MB/s (10^6 bytes).
func bulk(ctx context.Context, targets []string, streams int, d time.Duration) float64 {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var total atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range streams {
		wg.Go(func() {
			c := newHTTPClient(0)
			defer c.CloseIdleConnections()
			addr := targets[w%len(targets)]
			buf := make([]byte, 256<<10)
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+"/bulk?bytes=1073741824", nil)
				resp, err := c.Do(req)
				if err != nil {
					continue
				}
				for {
					n, err := resp.Body.Read(buf)
					total.Add(int64(n))
					if err != nil {
						break
					}
				}
				_ = resp.Body.Close()
			}
		})
	}
	wg.Wait()
	return float64(total.Load()) / time.Since(start).Seconds() / 1e6
}

// idleConns opens n TLS connections through addr, each answering one
// keep-alive request, and returns them open. The caller closes them.
func idleConns(ctx context.Context, addr string, n, par int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range par {
		wg.Go(func() {
			buf := make([]byte, 4096)
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				c, err := idleConn(ctx, addr, buf)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("idle connection %d through %s: %w", i, addr, err)
					}
					mu.Unlock()
					continue
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	open := slices.DeleteFunc(conns, func(c net.Conn) bool { return c == nil })
	return open, firstErr
}

func idleConn(ctx context.Context, addr string, buf []byte) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	_ = raw.SetDeadline(time.Now().Add(15 * time.Second))
	c := tls.Client(raw, tlsConf())
	if _, err := io.WriteString(c, "GET /readyz HTTP/1.1\r\nHost: kubernetes\r\n\r\n"); err != nil {
		_ = raw.Close()
		return nil, err
	}
	// The answer is small: "HTTP/1.1 200 OK ... ok".
	br := bufio.NewReaderSize(c, len(buf))
	status, err := br.ReadString('\n')
	if err != nil || !strings.Contains(status, " 200 ") {
		_ = raw.Close()
		return nil, fmt.Errorf("status line %q: %w", status, err)
	}
	_ = raw.SetDeadline(time.Time{})
	return c, nil
}
