package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"
)

// sliceObservation is the kubernetes EndpointSlice's ready addresses at a
// time.
type sliceObservation struct {
	at    time.Time
	addrs []string
}

// SlicePoller reads the kubernetes EndpointSlice straight from the
// apiservers (not through extractedprism) every 50 ms, so that a test can
// tell the apiservers' own delay from discovery's.
type SlicePoller struct {
	mu     sync.Mutex
	seen   []sliceObservation
	cancel context.CancelFunc
	done   chan struct{}
}

// PollSlice starts a poller that asks the apiservers on ips, the first
// that answers; it stops when t ends.
func (e *Env) PollSlice(t testing.TB, ips []string) *SlicePoller {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	sp := &SlicePoller{cancel: cancel, done: make(chan struct{})}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.CA.Pool, ServerName: e.ServerName, MinVersion: tls.VersionTLS12}}
	client := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	go func() {
		defer close(sp.done)
		defer tr.CloseIdleConnections()
		for ctx.Err() == nil {
			for _, ip := range ips {
				addrs, err := e.ReadSlice(ctx, client, ip)
				if err == nil {
					sp.add(addrs)
					break
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(sp.stop)
	return sp
}

func (sp *SlicePoller) stop() {
	sp.cancel()
	<-sp.done
}

func (sp *SlicePoller) add(addrs []string) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if n := len(sp.seen); n > 0 && slices.Equal(sp.seen[n-1].addrs, addrs) {
		return
	}
	sp.seen = append(sp.seen, sliceObservation{at: time.Now(), addrs: addrs})
}

// ReadSlice fetches the ready addresses of the kubernetes EndpointSlice
// from the apiserver on ip, as sorted host:port.
func (e *Env) ReadSlice(ctx context.Context, c *http.Client, ip string) ([]string, error) {
	url := "https://" + net.JoinHostPort(ip, APIServerPort) + "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+e.AdminToken)
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var s struct {
		Endpoints []struct {
			Addresses  []string `json:"addresses"`
			Conditions struct {
				Ready *bool `json:"ready"`
			} `json:"conditions"`
		} `json:"endpoints"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, fmt.Errorf("decode %s: %w", url, err)
	}
	var out []string
	for _, ep := range s.Endpoints {
		if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
			continue
		}
		for _, a := range ep.Addresses {
			out = append(out, net.JoinHostPort(a, APIServerPort))
		}
	}
	slices.Sort(out)
	return out, nil
}

// WaitFor returns when the slice first satisfied cond at or after since,
// polling for up to timeout.
func (sp *SlicePoller) WaitFor(t testing.TB, what string, since time.Time, timeout time.Duration, cond func([]string) bool) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		sp.mu.Lock()
		var last []string
		for i, o := range sp.seen {
			// The observation in force at since counts from since.
			end := time.Now()
			if i+1 < len(sp.seen) {
				end = sp.seen[i+1].at
			}
			if end.Before(since) {
				continue
			}
			if cond(o.addrs) {
				sp.mu.Unlock()
				return maxTime(o.at, since)
			}
			last = o.addrs
		}
		sp.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("the kubernetes EndpointSlice did not reach %s within %s; last seen %v", what, timeout, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
