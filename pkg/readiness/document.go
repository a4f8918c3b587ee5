package readiness

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"time"
)

// DataKey is the ConfigMap key that holds the encoded Document.
const DataKey = "readiness.json"

// DefaultConfigMap is the default name of the ConfigMap, in the
// publisher's own namespace.
const DefaultConfigMap = "extractedprism-readiness"

// FormatVersion is the version of the Document encoding. A Watcher treats
// any other version as malformed (no verdict, nodes keep their own checks).
const FormatVersion = 1

// Bounds on what a Document may hold; a larger one is malformed.
const (
	// MaxAPIServers caps the entries of one Document.
	MaxAPIServers = 64
	// MaxReasonBytes caps the reason of one entry.
	MaxReasonBytes = 256
	// MaxDocumentBytes caps the encoded Document.
	MaxDocumentBytes = 64 << 10
)

// Verdict is the shared readiness of one apiserver: its last explicit
// answer to GET /readyz.
type Verdict struct {
	Ready  bool   // /readyz answered 200
	Code   int    // HTTP status of the last explicit answer
	Reason string // why not ready ("" when ready)
}

// Document is what the Publisher writes under DataKey. Publisher, Sequence
// and Published identify a write; Interval and Heartbeat say how often the
// publisher probes and rewrites, so that a reader can tell a dead one.
// APIServers holds one entry per apiserver that gave an explicit answer in
// the publisher's last round; an apiserver that timed out, refused the
// connection or answered 401/403 has no entry.
type Document struct {
	Format     int              `json:"format"`
	Publisher  string           `json:"publisher"`
	Sequence   uint64           `json:"sequence"`
	Interval   time.Duration    `json:"-"`
	Heartbeat  time.Duration    `json:"-"`
	Published  time.Time        `json:"published"`
	APIServers map[string]Entry `json:"apiservers"`
}

// Entry is one apiserver's verdict in a Document. Since is when the
// publisher first saw this verdict (its own clock; informational).
type Entry struct {
	Ready  bool      `json:"ready"`
	Code   int       `json:"code"`
	Reason string    `json:"reason,omitempty"`
	Since  time.Time `json:"since"`
}

// Verdict returns the entry's verdict.
func (e Entry) Verdict() Verdict { return Verdict{Ready: e.Ready, Code: e.Code, Reason: e.Reason} }

// wireDocument is Document with its durations as Go duration strings.
type wireDocument struct {
	Format     int              `json:"format"`
	Publisher  string           `json:"publisher"`
	Sequence   uint64           `json:"sequence"`
	Interval   string           `json:"interval"`
	Heartbeat  string           `json:"heartbeat"`
	Published  time.Time        `json:"published"`
	APIServers map[string]Entry `json:"apiservers"`
}

// Encode returns the JSON encoding of d (keys sorted, so equal documents
// encode equally).
func Encode(d Document) ([]byte, error) {
	if err := d.validate(); err != nil {
		return nil, err
	}
	w := wireDocument{
		Format: d.Format, Publisher: d.Publisher, Sequence: d.Sequence,
		Interval: d.Interval.String(), Heartbeat: d.Heartbeat.String(),
		Published: d.Published.UTC(), APIServers: d.APIServers,
	}
	if w.APIServers == nil {
		w.APIServers = map[string]Entry{}
	}
	b, err := json.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("encode readiness document: %w", err)
	}
	return b, nil
}

// ErrMalformed is wrapped by every error of Decode about the content.
var ErrMalformed = errors.New("malformed readiness document")

// Decode parses and checks an encoded Document. Unknown fields are
// allowed (a newer publisher may add some); everything known must be
// valid, or the whole document is rejected.
func Decode(b []byte) (Document, error) {
	if len(b) > MaxDocumentBytes {
		return Document{}, fmt.Errorf("%w: %d bytes, more than %d", ErrMalformed, len(b), MaxDocumentBytes)
	}
	var w wireDocument
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&w); err != nil {
		return Document{}, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	if dec.More() {
		return Document{}, fmt.Errorf("%w: data after the document", ErrMalformed)
	}
	d := Document{Format: w.Format, Publisher: w.Publisher, Sequence: w.Sequence, Published: w.Published, APIServers: w.APIServers}
	var err error
	if d.Interval, err = time.ParseDuration(w.Interval); err != nil {
		return Document{}, fmt.Errorf("%w: interval: %w", ErrMalformed, err)
	}
	if d.Heartbeat, err = time.ParseDuration(w.Heartbeat); err != nil {
		return Document{}, fmt.Errorf("%w: heartbeat: %w", ErrMalformed, err)
	}
	if err := d.validate(); err != nil {
		return Document{}, err
	}
	if d.APIServers == nil {
		d.APIServers = map[string]Entry{}
	}
	return d, nil
}

// validate checks what a reader relies on.
func (d Document) validate() error {
	if d.Format != FormatVersion {
		return fmt.Errorf("%w: format %d, want %d", ErrMalformed, d.Format, FormatVersion)
	}
	if d.Publisher == "" {
		return fmt.Errorf("%w: no publisher", ErrMalformed)
	}
	if d.Interval <= 0 || d.Heartbeat <= 0 {
		return fmt.Errorf("%w: interval %s and heartbeat %s must be positive", ErrMalformed, d.Interval, d.Heartbeat)
	}
	if len(d.APIServers) > MaxAPIServers {
		return fmt.Errorf("%w: %d apiservers, more than %d", ErrMalformed, len(d.APIServers), MaxAPIServers)
	}
	for addr, e := range d.APIServers {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().Is4In6() || ap.String() != addr {
			return fmt.Errorf("%w: apiserver %q is not a canonical IP:port", ErrMalformed, addr)
		}
		if e.Code < 100 || e.Code > 599 {
			return fmt.Errorf("%w: apiserver %s: status %d", ErrMalformed, addr, e.Code)
		}
		if e.Ready != (e.Code == 200) {
			return fmt.Errorf("%w: apiserver %s: ready=%t with status %d", ErrMalformed, addr, e.Ready, e.Code)
		}
		if e.Code == 401 || e.Code == 403 {
			return fmt.Errorf("%w: apiserver %s: status %d says nothing about readiness", ErrMalformed, addr, e.Code)
		}
		if len(e.Reason) > MaxReasonBytes {
			return fmt.Errorf("%w: apiserver %s: reason of %d bytes", ErrMalformed, addr, len(e.Reason))
		}
	}
	return nil
}

// sameVerdicts reports whether a and b hold the same verdicts for the same
// apiservers (Since aside).
func sameVerdicts(a, b map[string]Entry) bool {
	return maps.EqualFunc(a, b, func(x, y Entry) bool { return x.Verdict() == y.Verdict() })
}
