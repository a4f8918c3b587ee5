package main

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestSlowReaders runs a few slow readers against an in-process HTTPS
// server that serves /bulk as the stand-ins do: every reader is opened,
// reads at about the rate asked for, and the sampler runs throughout.
func TestSlowReaders(t *testing.T) {
	chunk := make([]byte, 64<<10)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/bulk" || r.URL.Query().Get("bytes") != strconv.Itoa(slowBodyBytes) {
			http.Error(w, "unexpected request", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(slowBodyBytes))
		for {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	srv.Listener.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = ln
	srv.TLS = &tls.Config{NextProtos: []string{"http/1.1"}, MinVersion: tls.VersionTLS12}
	srv.StartTLS()
	defer srv.Close()

	const n, rate = 4, 128 << 10
	hold := 1500 * time.Millisecond
	var samples atomic.Int64
	opened, rates, failed, err := slowReaders(context.Background(), ln.Addr().String(), n, rate, hold, func() { samples.Add(1) })
	if err != nil {
		t.Fatalf("slowReaders: %v", err)
	}
	if opened != n || len(rates) != n || failed != 0 {
		t.Fatalf("opened %d, %d rates, %d failed; want %d, %d, 0", opened, len(rates), failed, n, n)
	}
	// Paced reads: never much faster than asked for; slower only when the
	// machine is loaded, so the lower bound is loose.
	for i, r := range rates {
		if r > 1.3*rate/1024 || r < 0.3*rate/1024 {
			t.Errorf("reader %d read %.0f KiB/s, want about %d", i, r, rate>>10)
		}
	}
	if s := samples.Load(); s < int64(hold/slowSampleEvery)/2 {
		t.Errorf("%d memory samples during a %s hold, want about %d", s, hold, hold/slowSampleEvery)
	}
}

func TestSlowFiguresInReport(t *testing.T) {
	res := sampleResults()
	res.Params["slow_readers"], res.Params["slow_rate"], res.Params["slow_hold"] = "300", "256 KiB/s", "10s"
	res.Slow = map[string]slowResult{
		nameEP: {Readers: 300, Opened: 300, BaseRSSKiB: 10240, PeakRSSKiB: 10240 + 300*12, BasePSSKiB: 9000, PeakPSSKiB: 9000 + 300*10, RateKiBs: 256, SlowestKiBs: 250},
		nameHA: {Readers: 300, Opened: 300, BaseRSSKiB: 8192, PeakRSSKiB: 8192 + 300*20, BasePSSKiB: 7000, PeakPSSKiB: 7000 + 300*19, RateKiBs: 256, SlowestKiBs: 240},
		// nginx could not be measured.
		nameNginx: {Readers: 300, Error: "connection refused"},
	}
	// A run that measured only the slow readers, merged into an earlier
	// one, carries them into the medians.
	cur := results{Slow: res.Slow}
	prev := res
	prev.Slow = nil
	got := mergeResults(prev, cur, nil, false)
	if m := got.Median[nameEP]; m.SlowRSSKiB != 12 || m.SlowPSSKiB != 10 {
		t.Errorf("merged extractedprism slow figures = %v RSS, %v PSS; want 12, 10", m.SlowRSSKiB, m.SlowPSSKiB)
	}
	if prev.Median[nameEP].SlowRSSKiB != 0 {
		t.Error("merging changed the earlier run's medians")
	}
	// A later run without them keeps the earlier run's.
	again := mergeResults(got, results{}, nil, false)
	if m := again.Median[nameHA]; m.SlowRSSKiB != 20 || len(again.Slow) != 3 {
		t.Errorf("slow figures lost in a merge without them: %v, %d set-ups", m.SlowRSSKiB, len(again.Slow))
	}
	md := renderMarkdown(got, "b.png")
	for _, want := range []string{
		"| Balancer memory per slow reader, RSS (KiB RSS) | n/a | 12.0 | 20.0 | – |",
		"| Balancer memory per slow reader, PSS (KiB PSS) | n/a | 10.0 | 19.0 | – |",
		"| Memory per slow reader ≤ haproxy's | 12.0 KiB RSS | 20.0 (haproxy) | 0.60 | **met** |",
		"300 TLS clients through it",
		"extractedprism: 300 of 300 readers open, RSS 10.0 → 13.5 MiB",
		"nginx: not measured (connection refused)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// Without slow readers the rows are not shown.
	if md := renderMarkdown(prev, "b.png"); strings.Contains(md, "per slow reader, RSS") {
		t.Error("report shows slow-reader rows for a run without them")
	}
}
