package discovery

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// writeKubeconfig writes a kubeconfig for server that skips TLS verification.
func writeKubeconfig(t *testing.T, server string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kubeconfig")
	doc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: %q, insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: secret}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
`, server)
	if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestUnreachableAPIShowsAtOnce checks that a refused connection is reported
// at once, not after client-go's own retries (ten, a second apart).
func TestUnreachableAPIShowsAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	m, r, _ := newManager(t, Options{Static: []string{addr}, Enabled: true, Kubeconfig: writeKubeconfig(t, "https://"+addr)}, nil)
	m.newClient = m.buildClient
	start := time.Now()
	run(t, m)
	waitFor(t, "three errors", func() bool { return r.countEvents(EventError) >= 3 })
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("three failed attempts took %s: requests are being retried behind the backoff", d)
	}
	if s := m.Status(); s.State != StateError || !strings.Contains(s.LastError, "connection refused") {
		t.Fatalf("status %+v", s)
	}
}

// TestListAndWatchOverHTTP runs discovery against a small HTTPS server that
// speaks the list and watch protocol, and checks the requests it gets.
func TestListAndWatchOverHTTP(t *testing.T) {
	sl := func(rv string, addrs ...string) discoveryv1.EndpointSlice {
		s := *slice("kubernetes", discoveryv1.AddressTypeIPv4, 6443)
		s.ResourceVersion = rv
		s.Endpoints = []discoveryv1.Endpoint{ready(addrs...)}
		return s
	}
	var mu sync.Mutex
	var queries []string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices" {
			http.NotFound(w, req)
			return
		}
		if req.Header.Get("Authorization") != "Bearer secret" {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		mu.Lock()
		queries = append(queries, req.URL.RawQuery)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		q := req.URL.Query()
		if q.Get("watch") != "true" && q.Get("watch") != "1" {
			_ = json.NewEncoder(w).Encode(discoveryv1.EndpointSliceList{
				TypeMeta: metav1.TypeMeta{Kind: "EndpointSliceList", APIVersion: "discovery.k8s.io/v1"},
				ListMeta: metav1.ListMeta{ResourceVersion: "5"},
				Items:    []discoveryv1.EndpointSlice{sl("5", "10.0.0.2")},
			})
			return
		}
		s := sl("6", "10.0.0.2", "10.0.0.3")
		s.TypeMeta = metav1.TypeMeta{Kind: "EndpointSlice", APIVersion: "discovery.k8s.io/v1"}
		obj, _ := json.Marshal(s)
		_, _ = fmt.Fprintf(w, `{"type":"MODIFIED","object":%s}`+"\n", obj)
		w.(http.Flusher).Flush()
		<-req.Context().Done()
	}))
	t.Cleanup(srv.Close)

	m, r, _ := newManager(t, Options{Static: []string{"10.0.0.1:6443"}, Enabled: true, Kubeconfig: writeKubeconfig(t, srv.URL)}, nil)
	m.newClient = m.buildClient
	run(t, m)
	waitLast(t, r, "10.0.0.1:6443/static 10.0.0.2:6443/discovered 10.0.0.3:6443/discovered")
	mu.Lock()
	defer mu.Unlock()
	if len(queries) < 2 {
		t.Fatalf("requests %v, want a list and a watch", queries)
	}
	if !strings.Contains(queries[0], "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes") ||
		!strings.Contains(queries[0], "fieldSelector=metadata.name%3Dkubernetes") || strings.Contains(queries[0], "watch") {
		t.Errorf("list query %q", queries[0])
	}
	for _, want := range []string{"watch=true", "allowWatchBookmarks=true", "resourceVersion=5", "timeoutSeconds=", "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes", "fieldSelector=metadata.name%3Dkubernetes"} {
		if !strings.Contains(queries[1], want) {
			t.Errorf("watch query %q lacks %s", queries[1], want)
		}
	}
}
