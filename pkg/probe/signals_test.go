package probe

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// h2Server starts a TLS test server that speaks HTTP/2, as kube-apiserver
// does.
func h2Server(t *testing.T, h http.Handler) (*httptest.Server, string) {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv, strings.TrimPrefix(srv.URL, "https://")
}

func last(rs []result) Result { return rs[len(rs)-1].r }

// TestReadinessIsNeverSkippedForTraffic: without a shared verdict every
// round checks readiness, however busy the upstream's connections are,
// so an apiserver that turns unready under traffic is seen at the next
// round.
func TestReadinessIsNeverSkippedForTraffic(t *testing.T) {
	var hits, h2GETs atomic.Int32
	var ready atomic.Bool
	ready.Store(true)
	_, addr := h2Server(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if r.ProtoMajor == 2 {
			h2GETs.Add(1) // a GET costs kube-apiserver twice as much over HTTP/2
		}
		if !ready.Load() {
			http.Error(w, "[-]etcd failed", http.StatusInternalServerError)
		}
	}))
	rec := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Timeout: time.Second, Reporter: rec,
		Heard: func(string, time.Duration) bool { return true }}, addr)
	waitFor(t, "10 rounds", 10*time.Second, func() bool { return len(rec.results(addr)) >= 10 })
	rs := rec.results(addr)
	if int(hits.Load()) < len(rs)-1 {
		t.Fatalf("%d rounds but only %d readiness checks: traffic stood in for readiness", len(rs), hits.Load())
	}
	for _, r := range rs {
		if r.r.Evidence != EvidenceAnswer || r.r.Readiness != Ready {
			t.Fatalf("round %+v, want an answered readiness check", r.r)
		}
	}
	if n := h2GETs.Load(); n > 0 {
		t.Errorf("%d readiness GETs went over HTTP/2, want HTTP/1.1", n)
	}
	ready.Store(false)
	waitFor(t, "an unready result", 10*time.Second, func() bool {
		r := last(rec.results(addr))
		return r.Readiness == Unready && r.Alive && !r.OK()
	})
}

// TestUnauthorizedIsAliveWithUnknownReadiness: a 401 or 403 proves the
// apiserver alive; readiness is unknown and said so; liveness is then
// kept with PINGs, with a GET every MaxSkipped+1 rounds.
func TestUnauthorizedIsAliveWithUnknownReadiness(t *testing.T) {
	for _, code := range []int{http.StatusUnauthorized, http.StatusForbidden} {
		t.Run(http.StatusText(code), func(t *testing.T) {
			var gets atomic.Int32
			_, addr := h2Server(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				gets.Add(1)
				w.WriteHeader(code)
			}))
			rec := &recorder{}
			run(t, Options{Interval: 20 * time.Millisecond, Timeout: time.Second, Reporter: rec}, addr)
			waitFor(t, "20 rounds", 20*time.Second, func() bool { return len(rec.results(addr)) >= 20 })
			rs := rec.results(addr)
			pings := 0
			for _, r := range rs {
				if !r.ok || !r.r.Alive || r.r.Readiness != ReadinessUnknown {
					t.Fatalf("round %+v: want alive, routed to, readiness unknown", r.r)
				}
				if want := fmt.Sprintf("readiness unknown: %d %s", code, http.StatusText(code)); !strings.Contains(r.r.Note, want) {
					t.Fatalf("note %q, want it to contain %q", r.r.Note, want)
				}
				if r.r.Evidence == EvidencePing {
					pings++
				}
			}
			if g := int(gets.Load()); g > len(rs)/(MaxSkipped+1)+2 || pings < len(rs)/2 {
				t.Fatalf("%d rounds: %d GETs and %d PINGs, want PINGs with a GET every %d rounds", len(rs), g, pings, MaxSkipped+1)
			}
		})
	}
}

// TestSharedVerdictReplacesReadinessChecks: with a fresh shared verdict
// the node sends no GET: readiness is the verdict, liveness a PING or
// recent traffic; Reassess applies a changed verdict without I/O; a stale
// verdict brings the node's own checks back.
func TestSharedVerdictReplacesReadinessChecks(t *testing.T) {
	var gets atomic.Int32
	_, addr := h2Server(t, http.HandlerFunc(func(http.ResponseWriter, *http.Request) { gets.Add(1) }))
	var mu sync.Mutex
	verdict, fresh := Verdict{Ready: true, Code: 200}, true
	var busy atomic.Bool
	rec := &recorder{}
	p := run(t, Options{Interval: 30 * time.Millisecond, Timeout: time.Second, Reporter: rec,
		Shared: func(string) (Verdict, bool) {
			mu.Lock()
			defer mu.Unlock()
			return verdict, fresh
		},
		Heard: func(string, time.Duration) bool { return busy.Load() },
	}, addr)
	waitFor(t, "10 rounds", 10*time.Second, func() bool { return len(rec.results(addr)) >= 10 })
	if g := gets.Load(); g != 0 {
		t.Fatalf("%d GETs with a fresh shared verdict, want 0", g)
	}
	for _, r := range rec.results(addr) {
		if !r.ok || r.r.Evidence != EvidencePing || !r.r.Shared {
			t.Fatalf("round %+v: want a PING and the shared verdict", r.r)
		}
	}

	busy.Store(true)
	n := len(rec.results(addr))
	waitFor(t, "15 busy rounds", 10*time.Second, func() bool { return len(rec.results(addr)) >= n+15 })
	traffic := 0
	for _, r := range rec.results(addr)[n:] {
		if r.r.Evidence == EvidenceTraffic {
			traffic++
		}
	}
	if traffic < 10 {
		t.Fatalf("busy: %d of 15 rounds took liveness from traffic, want most", traffic)
	}

	mu.Lock()
	verdict = Verdict{Ready: false, Code: 500, Reason: "[-]etcd failed"}
	mu.Unlock()
	p.Reassess()
	waitFor(t, "the unready verdict applied", 5*time.Second, func() bool {
		r := last(rec.results(addr))
		return r.Readiness == Unready && r.Shared && strings.Contains(r.Err.Error(), "etcd failed")
	})

	mu.Lock()
	fresh = false
	mu.Unlock()
	waitFor(t, "the node's own check", 5*time.Second, func() bool { return gets.Load() > 0 })
	waitFor(t, "a local ready result", 5*time.Second, func() bool {
		r := last(rec.results(addr))
		return r.Readiness == Ready && !r.Shared
	})
}

// TestHTTP1ServerStillWorks: a server that offers only HTTP/1.1 is probed
// with GETs on one kept-alive connection (and one more, once, that found
// out it has no HTTP/2 for PINGs).
func TestHTTP1ServerStillWorks(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
	}))
	var conns atomic.Int32
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	rec := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Timeout: time.Second, Reporter: rec}, addr)
	waitFor(t, "10 rounds", 10*time.Second, func() bool { return len(rec.results(addr)) >= 10 })
	for _, r := range rec.results(addr) {
		if !r.ok || r.r.Evidence != EvidenceAnswer {
			t.Fatalf("round %+v: want an answer", r.r)
		}
	}
	if n := conns.Load(); n > 2 {
		t.Fatalf("%d connections for %d rounds, want one kept alive (and one that found no HTTP/2)", n, len(rec.results(addr)))
	}
}

// testCA is a CA that signs server and client certificates for tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return &testCA{cert: c, key: key, pool: pool}
}

var serial atomic.Int64

// issue returns PEM certificate and key for cn, a server certificate for
// 127.0.0.1 when server is set, else a client certificate.
func (ca *testCA) issue(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(100 + serial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

// authServer is an apiserver stand-in with anonymous authentication off:
// it answers 401 unless a bearer token in tokens or a client certificate
// of ca is presented, and records who was seen.
func authServer(t *testing.T, ca *testCA, tokens *sync.Map) (string, func() []string) {
	t.Helper()
	var mu sync.Mutex
	var seen []string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who := ""
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			who = "cert:" + r.TLS.PeerCertificates[0].Subject.CommonName
		} else if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
			if _, known := tokens.Load(tok); known {
				who = "token:" + tok
			}
		}
		mu.Lock()
		seen = append(seen, who)
		mu.Unlock()
		if who == "" {
			w.WriteHeader(http.StatusUnauthorized)
		}
	}))
	sc, sk := ca.issue(t, "apiserver", true)
	pair, err := tls.X509KeyPair(sc, sk)
	if err != nil {
		t.Fatal(err)
	}
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: ca.pool, ClientAuth: tls.VerifyClientCertIfGiven}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "https://"), func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	// Write beside and rename, as the kubelet and kubeadm rotate.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func lastSeen(seen func() []string) string {
	s := seen()
	if len(s) == 0 {
		return ""
	}
	return s[len(s)-1]
}

// TestBearerTokenIsSentAndRotated: with a token file and a verifying CA,
// readiness is checked with the token, and a rotated token is used
// without a restart; without verification the token is never sent.
func TestBearerTokenIsSentAndRotated(t *testing.T) {
	ca := newCA(t)
	var tokens sync.Map
	tokens.Store("first", true)
	tokens.Store("second", true)
	addr, seen := authServer(t, ca, &tokens)
	dir := t.TempDir()
	tf := filepath.Join(dir, "token")
	writeFile(t, tf, []byte("first\n"))

	rec := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Timeout: time.Second, Reporter: rec, BearerTokenFile: tf,
		TLS: &tls.Config{RootCAs: ca.pool, MinVersion: tls.VersionTLS12}}, addr)
	waitFor(t, "a check with the first token", 10*time.Second, func() bool { return lastSeen(seen) == "token:first" })
	waitFor(t, "a ready result", 10*time.Second, func() bool {
		rs := rec.results(addr)
		return len(rs) > 0 && last(rs).Readiness == Ready
	})
	writeFile(t, tf, []byte("second"))
	waitFor(t, "a check with the rotated token", 10*time.Second, func() bool { return lastSeen(seen) == "token:second" })

	// Not verifying the server: the token stays home.
	addr2, seen2 := authServer(t, ca, &tokens)
	rec2 := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Timeout: time.Second, Reporter: rec2, BearerTokenFile: tf}, addr2)
	waitFor(t, "5 rounds", 10*time.Second, func() bool { return len(rec2.results(addr2)) >= 5 })
	for _, who := range seen2() {
		if who != "" {
			t.Fatalf("an unverified server was sent credentials: %q", who)
		}
	}
	if r := last(rec2.results(addr2)); r.Readiness != ReadinessUnknown || !r.OK() {
		t.Fatalf("unverified: %+v, want routed with readiness unknown", r)
	}
}

// TestClientCertificateIsPresentedAndRotated: a client certificate makes
// readiness checkable; a renewed one is presented from the next probe on.
func TestClientCertificateIsPresentedAndRotated(t *testing.T) {
	ca := newCA(t)
	var tokens sync.Map
	addr, seen := authServer(t, ca, &tokens)
	dir := t.TempDir()
	cf, kf := filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key")
	c1, k1 := ca.issue(t, "node-a-1", false)
	writeFile(t, kf, k1)
	writeFile(t, cf, c1)

	rec := &recorder{}
	run(t, Options{Interval: 20 * time.Millisecond, Timeout: time.Second, Reporter: rec,
		ClientCertFile: cf, ClientKeyFile: kf}, addr)
	waitFor(t, "a check with the certificate", 10*time.Second, func() bool { return lastSeen(seen) == "cert:node-a-1" })
	waitFor(t, "a ready result", 10*time.Second, func() bool {
		rs := rec.results(addr)
		return len(rs) > 0 && last(rs).Readiness == Ready
	})
	c2, k2 := ca.issue(t, "node-a-2", false)
	writeFile(t, kf, k2)
	writeFile(t, cf, c2)
	waitFor(t, "a check with the renewed certificate", 10*time.Second, func() bool { return lastSeen(seen) == "cert:node-a-2" })
}
