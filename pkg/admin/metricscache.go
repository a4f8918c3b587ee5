package admin

import (
	"bytes"
	"net/http"
	"strings"
	"sync"
	"time"
)

// openMetricsAccept is the Accept header a render for an OpenMetrics
// scraper is made with.
const openMetricsAccept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"

// metricsCache renders the metrics handler at most once per interval for
// each exposition format (plain text, OpenMetrics), whoever asks: callers
// within the interval get the body of the last render, and callers that
// arrive while a render runs wait for it and share its result. So the CPU
// that /metrics costs is bounded however often it is scraped.
type metricsCache struct {
	next     http.Handler
	interval time.Duration
	now      func() time.Time

	mu      sync.Mutex
	entries map[string]*metricsEntry
	renders uint64
}

// metricsEntry is the last render of one format, or the render in flight.
type metricsEntry struct {
	at     time.Time
	code   int
	header http.Header
	body   []byte
	// running is closed when the render in flight ends (nil when none).
	running chan struct{}
}

func newMetricsCache(next http.Handler, interval time.Duration, now func() time.Time) *metricsCache {
	return &metricsCache{next: next, interval: interval, now: now, entries: map[string]*metricsEntry{}}
}

// format is the cache key of r: the two exposition formats a scraper can
// ask for in text.
func format(r *http.Request) string {
	if strings.Contains(r.Header.Get("Accept"), "application/openmetrics-text") {
		return "openmetrics"
	}
	return "text"
}

func (m *metricsCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !allowRead(w, r) {
		return
	}
	e, ok := m.get(r, format(r))
	if !ok {
		// The caller went away while waiting.
		return
	}
	for k, v := range e.header {
		w.Header()[k] = v
	}
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(e.code)
	if r.Method == http.MethodGet {
		_, _ = w.Write(e.body)
	}
}

// get returns a render of key no older than the interval, running one if
// needed. Only one render of a key runs at a time.
func (m *metricsCache) get(r *http.Request, key string) (metricsEntry, bool) {
	for {
		m.mu.Lock()
		e := m.entries[key]
		if e != nil && e.running == nil && e.body != nil && m.now().Sub(e.at) < m.interval {
			out := *e
			m.mu.Unlock()
			return out, true
		}
		if e != nil && e.running != nil {
			wait := e.running
			m.mu.Unlock()
			select {
			case <-wait:
				// Take the render just made, however old the
				// interval says it is: waiting twice is no use.
				m.mu.Lock()
				out := *m.entries[key]
				m.mu.Unlock()
				if out.body != nil {
					return out, true
				}
				continue
			case <-r.Context().Done():
				return metricsEntry{}, false
			}
		}
		running := make(chan struct{})
		if e == nil {
			e = &metricsEntry{}
			m.entries[key] = e
		}
		e.running = running
		m.renders++
		m.mu.Unlock()

		return m.renderInto(e, key, running), true
	}
}

// renderInto renders key into e and wakes the callers waiting for it. A
// render that panics leaves no body, so the next caller renders again.
func (m *metricsCache) renderInto(e *metricsEntry, key string, running chan struct{}) (out metricsEntry) {
	code, header, body := http.StatusInternalServerError, http.Header{}, []byte(nil)
	defer func() {
		m.mu.Lock()
		e.at, e.code, e.header, e.body, e.running = m.now(), code, header, body, nil
		out = *e
		m.mu.Unlock()
		close(running)
	}()
	code, header, body = m.render(key)
	return out
}

// render runs the handler into a buffer, for the format key.
func (m *metricsCache) render(key string) (int, http.Header, []byte) {
	req, _ := http.NewRequest(http.MethodGet, "/metrics", http.NoBody)
	if key == "openmetrics" {
		req.Header.Set("Accept", openMetricsAccept)
	}
	rec := &bufferWriter{header: http.Header{}}
	m.next.ServeHTTP(rec, req)
	if rec.code == 0 {
		rec.code = http.StatusOK
	}
	return rec.code, rec.header, bytes.Clone(rec.body.Bytes())
}

// rendered returns how many renders have started.
func (m *metricsCache) rendered() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.renders
}

// bufferWriter is an http.ResponseWriter that keeps what is written.
type bufferWriter struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (b *bufferWriter) Header() http.Header { return b.header }

func (b *bufferWriter) WriteHeader(code int) {
	if b.code == 0 {
		b.code = code
	}
}

func (b *bufferWriter) Write(p []byte) (int, error) {
	if b.code == 0 {
		b.code = http.StatusOK
	}
	return b.body.Write(p)
}
