package readiness

import (
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func sampleDoc() Document {
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	return Document{
		Format: FormatVersion, Publisher: "publisher-0", Sequence: 7,
		Interval: time.Second, Heartbeat: 10 * time.Second, Published: at,
		APIServers: map[string]Entry{
			"10.0.0.1:6443":    {Ready: true, Code: 200, Since: at},
			"10.0.0.2:6443":    {Ready: false, Code: 500, Reason: "[-]etcd failed: reason withheld", Since: at},
			"[fd00::3]:6443":   {Ready: true, Code: 200, Since: at},
			"192.168.1.4:8443": {Ready: false, Code: 503, Reason: "Service Unavailable", Since: at},
		},
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	d := sampleDoc()
	b, err := Encode(d)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatalf("Decode(%s): %v", b, err)
	}
	if got.Publisher != d.Publisher || got.Sequence != d.Sequence || got.Interval != d.Interval ||
		got.Heartbeat != d.Heartbeat || !got.Published.Equal(d.Published) || !sameVerdicts(got.APIServers, d.APIServers) {
		t.Errorf("round trip changed the document:\n got %+v\nwant %+v", got, d)
	}
	again, err := Encode(got)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != string(b) {
		t.Errorf("encoding is not stable:\n%s\n%s", b, again)
	}
}

// The exact format: what a reader of the ConfigMap (or another
// implementation) sees.
func TestEncodeFormat(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	b, err := Encode(Document{
		Format: 1, Publisher: "p", Sequence: 3, Interval: time.Second, Heartbeat: 10 * time.Second, Published: at,
		APIServers: map[string]Entry{"10.0.0.2:6443": {Code: 500, Reason: "[-]etcd failed: reason withheld", Since: at}},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"format":1,"publisher":"p","sequence":3,"interval":"1s","heartbeat":"10s","published":"2026-01-02T03:04:05Z",` +
		`"apiservers":{"10.0.0.2:6443":{"ready":false,"code":500,"reason":"[-]etcd failed: reason withheld","since":"2026-01-02T03:04:05Z"}}}`
	if string(b) != want {
		t.Errorf("Encode =\n%s\nwant\n%s", b, want)
	}
}

func TestDecodeAcceptsUnknownFieldsAndNoEntries(t *testing.T) {
	d, err := Decode([]byte(`{"format":1,"publisher":"p","sequence":1,"interval":"1s","heartbeat":"10s","later":true,"apiservers":{}}`))
	if err != nil {
		t.Fatal(err)
	}
	if len(d.APIServers) != 0 {
		t.Errorf("apiservers %v", d.APIServers)
	}
}

func TestDecodeRejectsMalformed(t *testing.T) {
	ok := `"publisher":"p","sequence":1,"interval":"1s","heartbeat":"10s"`
	tests := map[string]string{
		"empty":               ``,
		"not JSON":            `ready`,
		"two documents":       `{"format":1,` + ok + `} {}`,
		"other format":        `{"format":2,` + ok + `}`,
		"no publisher":        `{"format":1,"publisher":"","sequence":1,"interval":"1s","heartbeat":"10s"}`,
		"bad interval":        `{"format":1,"publisher":"p","sequence":1,"interval":"soon","heartbeat":"10s"}`,
		"zero heartbeat":      `{"format":1,"publisher":"p","sequence":1,"interval":"1s","heartbeat":"0s"}`,
		"host name":           `{"format":1,` + ok + `,"apiservers":{"api.example.com:6443":{"ready":true,"code":200}}}`,
		"no port":             `{"format":1,` + ok + `,"apiservers":{"10.0.0.1":{"ready":true,"code":200}}}`,
		"port 0":              `{"format":1,` + ok + `,"apiservers":{"10.0.0.1:0":{"ready":true,"code":200}}}`,
		"not canonical":       `{"format":1,` + ok + `,"apiservers":{"[::ffff:10.0.0.1]:6443":{"ready":true,"code":200}}}`,
		"ready with 500":      `{"format":1,` + ok + `,"apiservers":{"10.0.0.1:6443":{"ready":true,"code":500}}}`,
		"unready with 200":    `{"format":1,` + ok + `,"apiservers":{"10.0.0.1:6443":{"ready":false,"code":200}}}`,
		"401 is no verdict":   `{"format":1,` + ok + `,"apiservers":{"10.0.0.1:6443":{"ready":false,"code":401}}}`,
		"status out of range": `{"format":1,` + ok + `,"apiservers":{"10.0.0.1:6443":{"ready":false,"code":1000}}}`,
		"long reason": `{"format":1,` + ok + `,"apiservers":{"10.0.0.1:6443":{"ready":false,"code":500,"reason":"` +
			strings.Repeat("x", MaxReasonBytes+1) + `"}}}`,
		"too large": `{"format":1,` + ok + `,"pad":"` + strings.Repeat("x", MaxDocumentBytes) + `"}`,
	}
	for name, in := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := Decode([]byte(in)); !errors.Is(err, ErrMalformed) {
				t.Errorf("Decode = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestEncodeRefusesWhatDecodeWouldReject(t *testing.T) {
	d := sampleDoc()
	d.APIServers["10.0.0.9:6443"] = Entry{Code: 403}
	if _, err := Encode(d); !errors.Is(err, ErrMalformed) {
		t.Errorf("Encode = %v, want ErrMalformed", err)
	}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		code     int
		body     string
		explicit bool
		want     Verdict
	}{
		{200, "ok", true, Verdict{Ready: true, Code: 200}},
		{500, "[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n[+]poststarthook/x ok\nreadyz check failed\n", true,
			Verdict{Code: 500, Reason: "[-]etcd failed: reason withheld"}},
		{503, "shutting down\nmore", true, Verdict{Code: 503, Reason: "shutting down"}},
		{500, "", true, Verdict{Code: 500, Reason: "Internal Server Error"}},
		{404, "\n\n404 page not found\n", true, Verdict{Code: 404, Reason: "404 page not found"}},
		{599, "", true, Verdict{Code: 599, Reason: "status 599"}},
		{401, "Unauthorized", false, Verdict{}},
		{403, "forbidden", false, Verdict{}},
	}
	for _, tt := range tests {
		a := classify(tt.code, []byte(tt.body))
		if a.explicit != tt.explicit || a.verdict != tt.want {
			t.Errorf("classify(%d, %q) = %+v explicit=%t, want %+v explicit=%t", tt.code, tt.body, a.verdict, a.explicit, tt.want, tt.explicit)
		}
	}
	long := classify(500, []byte(strings.Repeat("é", MaxReasonBytes)))
	if len(long.verdict.Reason) > MaxReasonBytes || !strings.HasPrefix(long.verdict.Reason, "éé") {
		t.Errorf("long reason cut to %d bytes: %q", len(long.verdict.Reason), long.verdict.Reason[:10])
	}
}
