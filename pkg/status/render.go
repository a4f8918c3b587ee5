package status

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// RenderTable writes d for a person: a header line (with the active
// connections against their cap, when there is one), one row per upstream
// (address, source, state and for how long, last probe and its latency,
// active connections, failures, reason) and a summary line saying whether
// the node is ready and why, the discovery state and the config reload
// state. Ages are relative to now.
func RenderTable(w io.Writer, d Document, now time.Time) error {
	var b strings.Builder
	fmt.Fprintf(&b, "extractedprism %s", orDash(d.Version))
	if d.Listen != "" {
		fmt.Fprintf(&b, " listening on %s", d.Listen)
	} else {
		b.WriteString(" not listening")
	}
	if d.MaxConnections > 0 {
		fmt.Fprintf(&b, ", %d of %d connections", d.ActiveConnections, d.MaxConnections)
		if d.RefusedConnections > 0 {
			fmt.Fprintf(&b, " (%d refused at the limit)", d.RefusedConnections)
		}
		b.WriteString("\n\n")
	} else {
		fmt.Fprintf(&b, ", %s\n\n", plural(d.ActiveConnections, "active connection"))
	}

	if len(d.Upstreams) == 0 {
		b.WriteString("no upstreams\n")
	} else {
		// tabwriter writes into b, a strings.Builder, which cannot fail.
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		_, _ = fmt.Fprintln(tw, "UPSTREAM\tSOURCE\tSTATE\tSINCE\tLAST PROBE\tLATENCY\tACTIVE\tFAILURES\tREASON")
		for _, u := range d.Upstreams {
			_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n",
				cell(u.Address), cell(orDash(u.Source)), cell(orDash(u.State)), age(now, u.Since),
				lastProbe(now, u), latency(u), u.ActiveConnections, u.Failures, cell(reason(u)))
		}
		if err := tw.Flush(); err != nil {
			return fmt.Errorf("status: render table: %w", err)
		}
	}

	b.WriteByte('\n')
	b.WriteString(readySummary(d))
	b.WriteString(" | ")
	b.WriteString(discoverySummary(d.Discovery, now))
	b.WriteString(" | ")
	b.WriteString(configSummary(d.Config, now))
	b.WriteByte('\n')

	// Rows with an empty last cell end in tabwriter padding; trim it.
	out := strings.Join(trimRight(strings.Split(b.String(), "\n")), "\n")
	if _, err := io.WriteString(w, out); err != nil {
		return fmt.Errorf("status: write table: %w", err)
	}
	return nil
}

// RenderJSON writes d as indented JSON with a trailing newline. A document
// without upstreams gets "upstreams": [] rather than null, so scripts can
// iterate over it unconditionally.
func RenderJSON(w io.Writer, d Document) error {
	if d.Upstreams == nil {
		d.Upstreams = []Upstream{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		return fmt.Errorf("status: write json: %w", err)
	}
	return nil
}

func readySummary(d Document) string {
	s := "ready: yes"
	if !d.Ready {
		s = "ready: NO"
	}
	if r := oneLine(d.Reason); r != "" {
		s += " (" + r + ")"
	}
	if !d.Alive {
		s += " | accept loop: NOT RUNNING"
	}
	up, unknown := 0, 0
	for _, u := range d.Upstreams {
		if u.State == "up" {
			up++
			if u.ReadinessUnknown != "" {
				unknown++
			}
		}
	}
	if len(d.Upstreams) == 0 {
		return s + " | upstreams: none"
	}
	s += fmt.Sprintf(" | upstreams: %d of %d up", up, len(d.Upstreams))
	if unknown > 0 {
		s += fmt.Sprintf(" (%d with readiness unknown: give probe credentials)", unknown)
	}
	return s
}

func discoverySummary(d Discovery, now time.Time) string {
	state := d.State
	if state == "" {
		state = "disabled"
		if d.Enabled {
			state = "starting"
		}
	}
	if !d.Enabled && state == "disabled" {
		return "discovery: disabled"
	}
	s := "discovery: " + state
	switch state {
	case "synced":
		s += " " + ago(now, d.LastSync) + ", " + plural(int64(len(d.Discovered)), "endpoint")
	case "error":
		if d.LastSync.IsZero() {
			s += ", never synced"
		} else {
			s += ", last sync " + ago(now, d.LastSync)
		}
	}
	if e := oneLine(d.LastError); e != "" {
		s += ": " + e
	}
	return s
}

func configSummary(c Config, now time.Time) string {
	s := "config: "
	if c.File == "" {
		return s + "no file (flags and environment only)"
	}
	s += c.File + " "
	switch {
	case c.LastReload.IsZero():
		s += "not reloaded yet"
	case c.LastReloadOK:
		s += "loaded ok " + ago(now, c.LastReload)
	default:
		s += "reload FAILED " + ago(now, c.LastReload) + ", previous config kept"
		if e := oneLine(c.LastReloadError); e != "" {
			s += ": " + e
		}
	}
	return s
}

func lastProbe(now time.Time, u Upstream) string {
	if u.LastProbe.IsZero() {
		return "never"
	}
	res := "ok"
	if !u.LastProbeOK {
		res = "failed"
	}
	return res + " " + ago(now, u.LastProbe)
}

func latency(u Upstream) string {
	if u.LastProbe.IsZero() {
		return "-"
	}
	d := time.Duration(u.LastProbeLatencySeconds * float64(time.Second))
	switch {
	case d < time.Millisecond:
		d = d.Round(time.Microsecond)
	case d < time.Second:
		d = d.Round(100 * time.Microsecond)
	default:
		d = d.Round(10 * time.Millisecond)
	}
	return d.String()
}

func reason(u Upstream) string {
	switch {
	case u.State == "up" && u.ReadinessUnknown != "":
		return u.ReadinessUnknown
	case u.Reason != "":
		return u.Reason
	case u.State != "up":
		return u.LastError
	}
	return ""
}

// ago is age with " ago", or "never" for the zero time.
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return age(now, t) + " ago"
}

// age renders now-t compactly at a precision a person needs: "12s",
// "3m12s", "5h3m", "3d5h"; "-" for the zero time.
func age(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := max(now.Sub(t), 0)
	switch {
	case d < time.Minute:
		return strconv.Itoa(int(d/time.Second)) + "s"
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", d/time.Minute, d%time.Minute/time.Second)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
	}
	return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
}

func plural(n int64, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return strconv.FormatInt(n, 10) + " " + what + "s"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// oneLine folds a multi-line message (e.g. a list of validation errors)
// into one line.
func oneLine(s string) string {
	lines := strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' })
	for i := range lines {
		lines[i] = strings.TrimSpace(lines[i])
	}
	return strings.Join(lines, "; ")
}

// cell makes s safe for one tabwriter cell.
func cell(s string) string {
	return strings.ReplaceAll(oneLine(s), "\t", " ")
}

func trimRight(lines []string) []string {
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ")
	}
	return lines
}
