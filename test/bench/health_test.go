package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestHealthScenariosInReport(t *testing.T) {
	res := sampleResults()
	ep := res.Chaos[nameEP]
	ep.Silent = &silentResult{Clients: 30, Seconds: 20, ReadyzShare: 0.55, Downs: 7, Total: 1000, Failed: 3, FreshTotal: 500, FreshFailed: 3, Closed: 30, CloseMedian: 6.1}
	ep.AllUnready = &allUnreadyResult{Seconds: 15, Streams: 10, Cut: 10, FirstCut: 7.2, Total: 900, FreshTotal: 450, ReadyzShare: 0}
	res.Chaos[nameEP] = ep
	ha := res.Chaos[nameHA]
	ha.Silent = &silentResult{Clients: 30, Seconds: 20, ReadyzShare: -1, Downs: -1, Total: 1000, FreshTotal: 500, Closed: 30, CloseMedian: 2}
	ha.AllUnready = &allUnreadyResult{Seconds: 15, Streams: 10, FirstCut: -1, Total: 900, FreshTotal: 450, ReadyzShare: -1}
	res.Chaos[nameHA] = ha
	dir := t.TempDir()
	o := options{out: filepath.Join(dir, "B.md"), chart: filepath.Join(dir, "b.png"), jsonOut: filepath.Join(dir, "r.json")}
	if err := writeOutputs(o, res); err != nil {
		t.Fatalf("writeOutputs: %v", err)
	}
	md, err := os.ReadFile(o.out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"balancer's `/readyz` answering 200 | 55% of the time | n/a |",
		"… upstreams marked down (transitions in `/status`) | 7 | n/a |",
		"| 3 / 1000 (3 / 500) | 0 / 1000 (0 / 500) |",
		"| 30 of 30 (6.1 s) | 30 of 30 (2.0 s) |",
		"streams cut (first, seconds in) | 10 of 10 (7.2 s) | 0 of 10 |",
		"30 silent clients mark no upstream down and `/readyz` stays 200: missed (200 55% of the time, 7 upstreams marked down, 3 of 1000 requests failed).",
		"cuts no stream and fails no request: missed (10 of 10 streams cut, 0 of 900 requests failed; haproxy 0 cut, 0 failed, nginx not measured).",
	} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report lacks %q", want)
		}
	}
}

func TestMergeKeepsEarlierFigures(t *testing.T) {
	prev := sampleResults()
	old := prev.Chaos[nameEP]
	old.Errors = []string{"silent: stale", "kill: kept"}
	old.Failures = map[string][]string{"silent": {"stale"}, "kill": {"kept"}}
	prev.Chaos[nameEP] = old
	cur := results{Machine: machine{Date: "2026-02-02 00:00 UTC", ExtractedPrism: "extractedprism v9"},
		Chaos: map[string]chaosResult{nameEP: {KillTotal: 1, Silent: &silentResult{Clients: 30, ReadyzShare: 1}, Errors: []string{"kill: new", "silent: new"}}}}
	got := mergeResults(prev, cur, []string{"silent"}, false)
	c := got.Chaos[nameEP]
	if c.Silent == nil || c.Silent.ReadyzShare != 1 {
		t.Errorf("silent figures not merged: %+v", c.Silent)
	}
	if c.KillTotal != 100 {
		t.Errorf("kill figures replaced by a run that did not measure them: %d", c.KillTotal)
	}
	if strings.Join(c.Errors, "|") != "kill: kept|silent: new" {
		t.Errorf("errors = %q", c.Errors)
	}
	if _, ok := c.Failures["silent"]; ok || c.Failures["kill"][0] != "kept" {
		t.Errorf("failures = %q", c.Failures)
	}
	if got.Median[nameEP].KARps != prev.Median[nameEP].KARps || got.Machine.Date != prev.Machine.Date {
		t.Errorf("throughput figures or machine replaced by a chaos-only run")
	}
	if n := got.Notes["chaos"]; len(n) != 1 || !strings.Contains(n[0], "silent scenarios were measured on 2026-02-02") {
		t.Errorf("notes = %q", n)
	}
	again := mergeResults(got, cur, []string{"silent"}, false)
	if n := again.Notes["chaos"]; len(n) != 1 {
		t.Errorf("a second merge of the same scenarios left notes %q", n)
	}
	other := mergeResults(again, cur, []string{"kill"}, false)
	if n := other.Notes["chaos"]; len(n) != 2 {
		t.Errorf("a merge of other scenarios dropped the earlier note: %q", n)
	}
	wider := mergeResults(other, cur, []string{"kill", "silent", "allunready"}, false)
	if n := wider.Notes["chaos"]; len(n) != 1 || !strings.Contains(n[0], "kill, silent, allunready") {
		t.Errorf("a merge covering every earlier scenario left notes %q", n)
	}
}

func TestPickScenarios(t *testing.T) {
	got, err := pickScenarios("silent, allunready,silent")
	if err != nil || strings.Join(got, ",") != "silent,allunready" {
		t.Errorf("pickScenarios = %q, %v", got, err)
	}
	if _, err := pickScenarios("kill,flood"); err == nil || !strings.Contains(err.Error(), `--scenarios "kill,flood": unknown scenario "flood"`) {
		t.Errorf("unknown scenario error = %v", err)
	}
}

func TestUnreadyLoadInReport(t *testing.T) {
	res := sampleResults()
	ep := res.Chaos[nameEP]
	ep.UnreadyClients, ep.UnreadyShare, ep.UnreadyFresh = unreadyClients, 0.125, 1600
	res.Chaos[nameEP] = ep
	ha := res.Chaos[nameHA]
	ha.UnreadyClients = unreadyClients
	res.Chaos[nameHA] = ha
	md := renderMarkdown(res, "b.png")
	for _, want := range []string{
		"16 clients each opening a new TLS connection per request: share of new connections sent to it 5-10 s later | 12% of 1600 | 30% of 50 |",
		"16 clients each opening a new TLS connection per request, 20 requests/s each",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// Results from before the scenario had its own load render as they did.
	if md := renderMarkdown(sampleResults(), "b.png"); strings.Contains(md, "clients each opening") ||
		!strings.Contains(md, "| One upstream `/readyz` 500 (`/healthz` 200, still serving): share of new connections sent to it 5-10 s later | 0% of 50 | 30% of 50 |") {
		t.Errorf("report of older results changed:\n%s", md)
	}
}

func TestAnonOffInReport(t *testing.T) {
	res := sampleResults()
	ep := res.Chaos[nameEP]
	ep.AnonOff = &anonOffResult{Seconds: 10, Total: 2000, Bad: 150, All: 4000, Failed: 300, OKRate: 370, ReadyzShare: 0.1}
	ep.AnonOffToken = &anonOffResult{ProbeToken: true, Seconds: 10, Total: 2000, All: 4000, OKRate: 400, ReadyzShare: 1}
	ep.Failures = map[string][]string{"anonoff": {"keep-alive client, +5.1 s after anonoff, after 10.0 s: timeout"}}
	res.Chaos[nameEP] = ep
	ha := res.Chaos[nameHA]
	ha.AnonOff = &anonOffResult{Seconds: 10, Total: 2000, Bad: 2000, All: 4000, Failed: 4000, ReadyzShare: -1}
	res.Chaos[nameHA] = ha
	dir := t.TempDir()
	o := options{out: filepath.Join(dir, "B.md"), chart: filepath.Join(dir, "b.png"), jsonOut: filepath.Join(dir, "r.json")}
	if err := writeOutputs(o, res); err != nil {
		t.Fatalf("writeOutputs: %v", err)
	}
	b, err := os.ReadFile(o.out)
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	for _, want := range []string{
		"balancers check without credentials, one upstream SIGSTOPped for 10 s: failed or slow (>1 s) 5-10 s in | 7.5% (150 of 2000) | 100.0% (2000 of 2000) |",
		"… successful requests/s during the stop (failed / requests) | 370 (300 / 4000) | 0 (4000 / 4000) |",
		"… balancer's `/readyz` answering 200 | 10% of the time | n/a |",
		"haproxy `http-check send hdr Authorization`; nginx has no check): failed or slow 5-10 s in | 0.0% (0 of 2000) | – |",
		"… successful requests/s during the stop (failed / requests) | 400 (0 / 4000) | – |",
		"… balancer's `/readyz` answering 200 | 100% of the time | – |",
		"extractedprism, keep-alive client, +5.1 s after anonoff",
		"With anonymous authentication off, checking without credentials, a SIGSTOPped upstream costs no failed or slow request 5-10 s after the stop: missed (150 of 2000; haproxy 2000 of 2000, nginx not measured).",
		"With anonymous authentication off, checking with a bearer token, a SIGSTOPped upstream costs no failed or slow request 5-10 s after the stop: met (0 of 2000; haproxy not measured, nginx not measured).",
		"With anonymous authentication off the stand-ins run `--anonymous-auth=false`",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}

	// Results from before these scenarios render without their rows.
	old := sampleResults()
	if md := renderMarkdown(old, "b.png"); strings.Contains(md, "nonymous authentication off") {
		t.Errorf("report of results without the scenarios mentions them:\n%s", md)
	}

	// A chaos-only run of one variant merges into earlier figures.
	cur := results{Machine: machine{Date: "2026-02-02 00:00 UTC"}, Chaos: map[string]chaosResult{nameEP: {AnonOff: ep.AnonOff, AnonOffToken: ep.AnonOffToken, UnreadyFresh: 1600}}}
	got := mergeResults(old, cur, []string{"anonoff"}, false)
	if c := got.Chaos[nameEP]; c.AnonOff == nil || c.AnonOff.Bad != 150 || c.AnonOffToken != nil || c.UnreadyFresh != 50 {
		t.Errorf("merged anonoff: %+v, token variant %+v, unready fresh %d; want only the anonoff figures replaced", c.AnonOff, c.AnonOffToken, c.UnreadyFresh)
	}
}

func TestHAProxyCheckToken(t *testing.T) {
	e := &env{upstreams: []*upstream{{name: "a", addr: "127.0.20.1:16443"}}}
	if cfg := e.haproxyConfig(balancerMode{}); strings.Contains(cfg, "Authorization") {
		t.Errorf("haproxy config without a probe token sends one:\n%s", cfg)
	}
	cfg := e.haproxyConfig(balancerMode{probeToken: true})
	want := "  option httpchk GET /healthz\n  http-check send hdr Authorization \"Bearer " + benchToken + "\"\n  http-check expect status 200\n"
	if !strings.Contains(cfg, want) {
		t.Errorf("haproxy config with a probe token lacks\n%s\nin\n%s", want, cfg)
	}
}
