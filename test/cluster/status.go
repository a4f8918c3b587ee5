package cluster

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/extractedprism/extractedprism/pkg/status"
)

// GetStatus fetches extractedprism's /status from its admin address
// (host:port) with c (nil for a client of its own without keep-alives).
func GetStatus(c *http.Client, admin string) (status.Document, error) {
	if c == nil {
		c = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	}
	var doc status.Document
	resp, err := c.Get("http://" + admin + "/status")
	if err != nil {
		return doc, fmt.Errorf("GET /status: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return doc, fmt.Errorf("decode /status: %w", err)
	}
	return doc, nil
}

// Upstream returns the upstream with address addr in doc.
func Upstream(doc status.Document, addr string) (status.Upstream, bool) {
	for _, u := range doc.Upstreams {
		if u.Address == addr {
			return u, true
		}
	}
	return status.Upstream{}, false
}
