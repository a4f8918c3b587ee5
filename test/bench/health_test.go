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
