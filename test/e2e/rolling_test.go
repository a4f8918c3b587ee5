package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
	"github.com/extractedprism/extractedprism/test/cluster"
)

// The large LIST of the rolling-restart scenario: bigCount configmaps of
// bigSize bytes each in a namespace of their own, read at slowListRate, as
// a client on a slow link (or a busy one) reads it. The fixed read rate
// keeps the LIST in flight for about 8 s on any machine.
const (
	bigNamespace = "e2e-big"
	bigCount     = 1000
	bigSize      = 64 << 10
	slowListRate = 8 << 20 // bytes per second
	// slowLists are started before each SIGTERM: least-connections puts
	// one on each apiserver, so one rides on the terminated one.
	slowLists = 3
)

// apiRequest sends method path with the admin token to server (host:port).
func apiRequest(ctx context.Context, c *http.Client, method, server, path string, body []byte) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, "https://"+server+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+env.AdminToken)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// apiClient is an HTTPS client trusting the test CA. It asks for no
// compression, so that a large answer is as large on the wire as it is.
func apiClient(timeout time.Duration, keepAlive bool) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: env.CA.Pool, MinVersion: tls.VersionTLS12},
			DisableKeepAlives:   !keepAlive,
			DisableCompression:  true,
			MaxIdleConnsPerHost: 8,
		},
	}
}

// createBigConfigMaps fills bigNamespace through server.
func createBigConfigMaps(t *testing.T, server string) {
	t.Helper()
	c := apiClient(time.Minute, true)
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	code, b, err := apiRequest(ctx, c, http.MethodPost, server, "/api/v1/namespaces",
		fmt.Appendf(nil, `{"apiVersion":"v1","kind":"Namespace","metadata":{"name":%q}}`, bigNamespace))
	if err != nil || (code != http.StatusCreated && code != http.StatusConflict) {
		t.Fatalf("create namespace %s: %d %v %s", bigNamespace, code, err, b)
	}
	jobs := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := range jobs {
				// Random data: compression would not shrink it anyway.
				body := fmt.Appendf(nil, `{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"big-%04d"},"data":{"d":%q}}`, i, cluster.RandomHex(bigSize/2))
				code, b, err := apiRequest(ctx, c, http.MethodPost, server, "/api/v1/namespaces/"+bigNamespace+"/configmaps", body)
				if err == nil && code != http.StatusCreated && code != http.StatusConflict {
					err = fmt.Errorf("status %d: %.200s", code, b)
				}
				if err != nil {
					select {
					case errs <- fmt.Errorf("configmap big-%04d: %w", i, err):
					default:
					}
					cancel()
					return
				}
			}
		})
	}
	for i := range bigCount {
		select {
		case jobs <- i:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// deleteBigConfigMaps removes the configmaps of bigNamespace (the namespace
// itself would need the namespace controller to go away), so that
// apiservers started later do not cache them.
func deleteBigConfigMaps(t *testing.T, server string) {
	t.Helper()
	c := apiClient(2*time.Minute, false)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	code, b, err := apiRequest(ctx, c, http.MethodDelete, server, "/api/v1/namespaces/"+bigNamespace+"/configmaps", nil)
	if err != nil || code != http.StatusOK {
		t.Logf("delete the configmaps of %s: %d %v %.200s", bigNamespace, code, err, b)
	}
}

// slowList is one large LIST through extractedprism, read at a fixed rate.
type slowList struct {
	start     time.Time
	end       time.Time
	firstByte chan struct{}
	done      chan struct{}
	n         int64
	err       error
}

// startSlowList starts a LIST of bigNamespace's configmaps through
// extractedprism on a connection of its own.
func startSlowList(ctx context.Context, rate int64) *slowList {
	l := &slowList{start: time.Now(), firstByte: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		defer func() { l.end = time.Now() }()
		first := sync.OnceFunc(func() { close(l.firstByte) })
		defer first()
		c := apiClient(0, false)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+proxyAddr+"/api/v1/namespaces/"+bigNamespace+"/configmaps", nil)
		if err != nil {
			l.err = err
			return
		}
		req.Header.Set("Authorization", "Bearer "+env.AdminToken)
		resp, err := c.Do(req)
		if err != nil {
			l.err = err
			return
		}
		defer func() { _ = resp.Body.Close() }()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			l.err = fmt.Errorf("status %d: %s", resp.StatusCode, b)
			return
		}
		buf := make([]byte, 64<<10)
		began := time.Now()
		var last byte
		for {
			k, err := resp.Body.Read(buf)
			if k > 0 {
				first()
				l.n += int64(k)
				last = buf[k-1]
				// Pace the reads to rate.
				if ahead := time.Duration(l.n*int64(time.Second)/rate) - time.Since(began); ahead > 0 {
					select {
					case <-time.After(ahead):
					case <-ctx.Done():
					}
				}
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				l.err = fmt.Errorf("after %d bytes, %.1f s: %w", l.n, time.Since(l.start).Seconds(), err)
				return
			}
		}
		if l.n < bigCount*bigSize || (last != '}' && last != '\n') {
			l.err = fmt.Errorf("incomplete list: %d bytes, last byte %q", l.n, last)
		}
	}()
	return l
}

// startRawLoad sends a GET through extractedprism on a new connection every
// 100 ms (a short-lived client) and records each result.
func startRawLoad(t *testing.T) *loadLoop {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &loadLoop{cancel: cancel, done: make(chan struct{})}
	c := apiClient(10*time.Second, false)
	go func() {
		defer close(l.done)
		for ctx.Err() == nil {
			start := time.Now()
			code, b, err := apiRequest(context.WithoutCancel(ctx), c, http.MethodGet, proxyAddr, "/api/v1/namespaces/default/configmaps?limit=1", nil)
			if err == nil && code != http.StatusOK {
				err = fmt.Errorf("status %d: %.200s", code, b)
			}
			l.mu.Lock()
			l.runs = append(l.runs, kubectlRun{start: start, end: time.Now(), err: err})
			l.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(l.stop)
	return l
}

// testRollingRestart restarts the apiservers one at a time with their
// default --shutdown-delay-duration (0) while kubectl and a raw client run
// through extractedprism and large LISTs are in flight at every SIGTERM,
// and counts what failed. It is a measurement: the assertions are only
// bounds a working balancer stays far below (see the comments there).
func testRollingRestart(t *testing.T, d *daemon, as []*apiserver) {
	t0 := time.Now()
	defer deleteBigConfigMaps(t, proxyAddr)
	createBigConfigMaps(t, as[0].Addr())
	env.Record("rolling restart: %d configmaps of %d KiB created in %s", bigCount, bigSize>>10, time.Since(t0).Round(time.Millisecond))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	probe := startSlowList(ctx, 1<<40)
	<-probe.done
	if probe.err != nil {
		t.Fatalf("LIST of %s through extractedprism: %v", bigNamespace, probe.err)
	}
	env.Record("rolling restart: one unthrottled LIST of %d MiB through extractedprism takes %s; the test reads it at %d MiB/s",
		probe.n>>20, time.Since(probe.start).Round(time.Millisecond), slowListRate>>20)

	kubectl := env.startLoad(t)
	raw := startRawLoad(t)
	from := time.Now()
	var lists []*slowList
	var listFailures []string
	for _, x := range as {
		// One after the other, each once it is answering, so that
		// least-connections sees the earlier ones and puts one LIST on
		// each apiserver.
		batch := make([]*slowList, slowLists)
		for i := range batch {
			batch[i] = startSlowList(ctx, slowListRate)
			select {
			case <-batch[i].firstByte:
			case <-time.After(2 * time.Minute):
				t.Fatalf("a LIST through extractedprism sent no byte within 2 minutes")
			}
		}
		onVictim := int64(-1)
		if doc, err := d.status(); err == nil {
			if u, ok := upstream(doc, x.Addr()); ok {
				onVictim = u.ActiveConnections
			}
		}
		lists = append(lists, batch...)
		term := time.Now()
		x.P.Signal(syscall.SIGTERM)
		if err := x.P.Wait(2 * time.Minute); err != nil {
			t.Logf("%s exit: %v", x.P.Name, err)
		}
		exited := time.Since(term)
		*x = *env.RunAPIServer(t, x.IP)
		ready := env.WaitReady(t, x)
		_, up := d.waitStatus(t, x.IP+" up again", 2*time.Minute, func(doc status.Document) bool {
			u, ok := upstream(doc, x.Addr())
			return ok && u.State == "up"
		})
		failed := 0
		var cutAfter []string
		for _, l := range batch {
			select {
			case <-l.done:
			case <-time.After(2 * time.Minute):
				t.Fatalf("a LIST through extractedprism still running 2 minutes after the restart")
			}
			if l.err != nil {
				failed++
				cutAfter = append(cutAfter, fmt.Sprintf("%.1f s", l.end.Sub(term).Seconds()))
				listFailures = append(listFailures, fmt.Sprintf("%s: %v", x.IP, l.err))
			}
		}
		kt, kf := kubectl.between(term, up)
		rt, rf := raw.between(term, up)
		env.Record("rolling restart of %s: exit %s after SIGTERM, ready -> up in extractedprism %s; %d connections on it at SIGTERM; LISTs failed %d of %d (ended %v after SIGTERM); kubectl failed %d of %d; raw GETs failed %d of %d",
			x.IP, exited.Round(time.Millisecond), up.Sub(ready).Round(time.Millisecond), onVictim, failed, len(batch), cutAfter, len(kf), kt, len(rf), rt)
	}
	to := time.Now()
	kubectl.stop()
	raw.stop()
	kt, kf := kubectl.between(from, to)
	rt, rf := raw.between(from, to)
	env.Record("rolling restart (--shutdown-delay-duration=0), in all: large LISTs in flight at SIGTERM failed %d of %d; kubectl get failed %d of %d; raw GETs on new connections failed %d of %d",
		len(listFailures), len(lists), len(kf), kt, len(rf), rt)
	for _, f := range append(append(listFailures, kf...), rf...) {
		t.Logf("failed: %s", f)
	}
	// Bounds, not targets: a restart makes one apiserver of three go away,
	// so at most one LIST of each batch rides on it, and short requests on
	// new connections have two other apiservers to go to. More failures than
	// that mean the balancer sent work to an apiserver that was gone, or cut
	// requests on the healthy ones.
	if len(listFailures) > len(as) {
		t.Errorf("%d of %d large LISTs failed across %d restarts: more than one per restart", len(listFailures), len(lists), len(as))
	}
	if kt < 10 || rt < 10 {
		t.Errorf("too few requests during the rolling restart to count (kubectl %d, raw %d)", kt, rt)
	}
	if 10*len(kf) > kt || 10*len(rf) > rt {
		t.Errorf("more than 10 %% of short requests failed across the rolling restart: kubectl %d of %d, raw GETs %d of %d", len(kf), kt, len(rf), rt)
	}
}
