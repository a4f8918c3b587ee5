package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Slow-reader load: clients that download a large body through the balancer
// but read it slowly, so that the balancer's client-side writes block and
// whatever it keeps of a blocked direction shows in its memory.
const (
	// slowBodyBytes is what each slow reader asks /bulk for: far more
	// than it reads before the measurement ends.
	slowBodyBytes = 1 << 30
	slowDialers   = 16
	// slowSampleEvery is how often the balancer's memory is sampled.
	slowSampleEvery = 200 * time.Millisecond
	// slowChunk is the most one read takes from the connection.
	slowChunk = 16 << 10
)

// slowResult is one balancer's figures with slow readers.
type slowResult struct {
	Readers int `json:"readers"`
	// Opened is how many slow readers were reading when the hold began.
	Opened int `json:"opened"`
	// Base and peak RSS and PSS of the balancer's processes, KiB.
	BaseRSSKiB int64 `json:"base_rss_kib"`
	PeakRSSKiB int64 `json:"peak_rss_kib"`
	BasePSSKiB int64 `json:"base_pss_kib"`
	PeakPSSKiB int64 `json:"peak_pss_kib"`
	// RateKiBs is the median rate the readers got over the hold, KiB/s;
	// SlowestKiBs the slowest reader's.
	RateKiBs    float64 `json:"rate_kib_s"`
	SlowestKiBs float64 `json:"slowest_kib_s"`
	// Failed readers lost their connection or stalled during the hold.
	Failed int    `json:"failed"`
	Error  string `json:"error,omitempty"`
}

// RSSPerReader and PSSPerReader are peak minus base per open reader, KiB.
func (s slowResult) RSSPerReader() float64 {
	if s.Opened == 0 {
		return 0
	}
	return float64(s.PeakRSSKiB-s.BaseRSSKiB) / float64(s.Opened)
}

func (s slowResult) PSSPerReader() float64 {
	if s.Opened == 0 {
		return 0
	}
	return float64(s.PeakPSSKiB-s.BasePSSKiB) / float64(s.Opened)
}

// slowReader is one client reading /bulk at a fixed rate.
type slowReader struct {
	conn net.Conn
	read atomic.Int64
	err  atomic.Pointer[error]
}

func (r *slowReader) fail(err error) { r.err.CompareAndSwap(nil, &err) }

// dialSlowReader opens a TLS connection through addr and asks for a large
// /bulk body; it reads the status line's first bytes to know the answer
// started.
func dialSlowReader(ctx context.Context, addr string) (*slowReader, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	_ = raw.SetDeadline(time.Now().Add(15 * time.Second))
	c := tls.Client(raw, tlsConf())
	if _, err := fmt.Fprintf(c, "GET /bulk?bytes=%d HTTP/1.1\r\nHost: kubernetes\r\n\r\n", slowBodyBytes); err != nil {
		_ = raw.Close()
		return nil, err
	}
	head := make([]byte, 12)
	if _, err := io.ReadFull(c, head); err != nil || string(head[9:12]) != "200" {
		_ = raw.Close()
		return nil, fmt.Errorf("answer %q: %v", head, err)
	}
	_ = raw.SetDeadline(time.Time{})
	r := &slowReader{conn: c}
	r.read.Store(int64(len(head)))
	return r, nil
}

// pace reads at rate bytes/s until ctx ends; a read that takes longer than
// stall is a failure (the balancer stopped forwarding).
func (r *slowReader) pace(ctx context.Context, rate int64, stall time.Duration) {
	buf := make([]byte, slowChunk)
	start := time.Now()
	var got int64
	for ctx.Err() == nil {
		// The next read is due when what was read so far is what the
		// rate allows.
		due := start.Add(time.Duration(float64(got) / float64(rate) * float64(time.Second)))
		if w := time.Until(due); w > 0 {
			sleepCtx(ctx, w)
			if ctx.Err() != nil {
				return
			}
		}
		_ = r.conn.SetReadDeadline(time.Now().Add(stall))
		n, err := r.conn.Read(buf)
		got += int64(n)
		r.read.Add(int64(n))
		if err != nil {
			if ctx.Err() == nil {
				r.fail(err)
			}
			return
		}
	}
}

// slowReaders opens n slow readers through addr (each reading rate bytes/s),
// holds them for hold once all are open, and calls sample every
// slowSampleEvery from the first connect to the end of the hold. It returns
// the readers' rates over the hold (KiB/s), how many failed, and the first
// error opening one.
func slowReaders(ctx context.Context, addr string, n int, rate int64, hold time.Duration, sample func()) (opened int, rates []float64, failed int, firstErr error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopSampling := make(chan struct{})
	var sampling sync.WaitGroup
	sampling.Go(func() {
		t := time.NewTicker(slowSampleEvery)
		defer t.Stop()
		for {
			sample()
			select {
			case <-stopSampling:
				return
			case <-t.C:
			}
		}
	})

	readers := make([]*slowReader, n)
	var next atomic.Int64
	var mu sync.Mutex
	var dial, read sync.WaitGroup
	for range slowDialers {
		dial.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				r, err := dialSlowReader(ctx, addr)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("slow reader %d through %s: %w", i, addr, err)
					}
					mu.Unlock()
					continue
				}
				readers[i] = r
				read.Go(func() { r.pace(ctx, rate, 20*time.Second) })
			}
		})
	}
	dial.Wait()
	open := slices.DeleteFunc(readers, func(r *slowReader) bool { return r == nil })
	before := make([]int64, len(open))
	for i, r := range open {
		before[i] = r.read.Load()
	}
	t0 := time.Now()
	sleepCtx(ctx, hold)
	el := time.Since(t0).Seconds()
	for i, r := range open {
		rates = append(rates, float64(r.read.Load()-before[i])/1024/el)
		if r.err.Load() != nil {
			failed++
		}
	}
	close(stopSampling)
	sampling.Wait()
	cancel()
	for _, r := range open {
		_ = r.conn.Close()
	}
	read.Wait()
	return len(open), rates, failed, firstErr
}

// slowAll measures every balancer's memory with n slow readers, one
// freshly started balancer at a time.
func (e *env) slowAll(ctx context.Context, log *slog.Logger, setups []string, n int, rate int64, hold time.Duration) map[string]slowResult {
	out := map[string]slowResult{}
	for _, s := range setups {
		if s == nameDirect || ctx.Err() != nil {
			continue
		}
		r := slowResult{Readers: n}
		p, _, err := e.startBalancer(ctx, s)
		if err != nil {
			r.Error = err.Error()
			log.Warn("slow readers: start", "setup", s, "err", err)
			out[s] = r
			continue
		}
		sleepCtx(ctx, healthEvery)
		r.BaseRSSKiB, r.BasePSSKiB = p.memKiB()
		var mu sync.Mutex
		r.PeakRSSKiB, r.PeakPSSKiB = r.BaseRSSKiB, r.BasePSSKiB
		opened, rates, failed, err := slowReaders(ctx, e.targets(s)[0], n, rate, hold, func() {
			rss, pss := p.memKiB()
			mu.Lock()
			r.PeakRSSKiB, r.PeakPSSKiB = max(r.PeakRSSKiB, rss), max(r.PeakPSSKiB, pss)
			mu.Unlock()
		})
		r.Opened, r.Failed = opened, failed
		if err != nil {
			r.Error = err.Error()
			log.Warn("slow readers", "setup", s, "opened", opened, "err", err)
		}
		if len(rates) > 0 {
			r.RateKiBs, r.SlowestKiBs = median(rates), slices.Min(rates)
		}
		if p.exited() {
			r.Error = fmt.Sprintf("%s exited during the measurement: %v (log: %s)", s, p.err, p.log.Name())
		}
		p.stop(15 * time.Second)
		log.Info("slow readers", "setup", s, "opened", r.Opened, "failed", r.Failed,
			"rss_kib_per_reader", round(r.RSSPerReader(), 1), "pss_kib_per_reader", round(r.PSSPerReader(), 1),
			"base_rss_kib", r.BaseRSSKiB, "peak_rss_kib", r.PeakRSSKiB, "rate_kib_s", round(r.RateKiBs, 0))
		out[s] = r
	}
	return out
}

// slowDescription says how the slow-reader figures were measured, with
// each balancer's base and peak and the rates the readers got.
func slowDescription(res results) string {
	var b strings.Builder
	fmt.Fprintf(&b, "a freshly started balancer at a time, %s TLS clients through it, each sending `GET /bulk?bytes=%d` and reading the answer at %s, held %s once all are open, the balancer's RSS and PSS (/proc/PID/smaps_rollup, all its processes) sampled every %s from the first connect",
		res.Params["slow_readers"], slowBodyBytes, res.Params["slow_rate"], res.Params["slow_hold"], slowSampleEvery)
	for _, s := range []string{nameEP, nameHA, nameNginx} {
		r, ok := res.Slow[s]
		if !ok {
			continue
		}
		if r.Opened == 0 {
			fmt.Fprintf(&b, "; %s: not measured (%s)", s, r.Error)
			continue
		}
		fmt.Fprintf(&b, "; %s: %d of %d readers open, RSS %.1f → %.1f MiB, PSS %.1f → %.1f MiB, readers got %.0f KiB/s (median, slowest %.0f), %d failed",
			s, r.Opened, r.Readers, float64(r.BaseRSSKiB)/1024, float64(r.PeakRSSKiB)/1024,
			float64(r.BasePSSKiB)/1024, float64(r.PeakPSSKiB)/1024, r.RateKiBs, r.SlowestKiBs, r.Failed)
	}
	return b.String()
}
