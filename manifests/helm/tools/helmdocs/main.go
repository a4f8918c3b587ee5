// Command helmdocs writes the values table of a chart's README.md from the
// comments in its values.yaml, in the format of helm-docs:
//
//	# -- Description of the key below (continued on following "#" lines).
//	# -- (int) Description with an explicit type.
//	# @default -- text shown instead of the value
//
// A key with a "# --" comment is one row, even when its value is a map;
// a map without one is walked into; an undocumented leaf is a row with an
// empty description. Rows are sorted by key. The table replaces the lines
// between the markers <!-- values-table-start --> and
// <!-- values-table-end --> in README.md. With -check it only reports
// whether the README is up to date (exit status 1 when not).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

const (
	startMarker = "<!-- values-table-start -->"
	endMarker   = "<!-- values-table-end -->"
)

// Row is one documented value.
type Row struct {
	Key         string
	Type        string
	Default     string
	Description string
}

// ErrStale is returned by check when the README table differs from values.yaml.
var ErrStale = errors.New("README values table is out of date; run make chart-docs")

func main() {
	chart := flag.String("chart", "", "chart directory (holds values.yaml and README.md)")
	check := flag.Bool("check", false, "only check that README.md is up to date")
	flag.Parse()
	if err := run(*chart, *check); err != nil {
		fmt.Fprintln(os.Stderr, "helmdocs:", err)
		os.Exit(1)
	}
}

func run(chart string, check bool) error {
	if chart == "" {
		return errors.New("-chart is required")
	}
	values, err := os.ReadFile(filepath.Join(chart, "values.yaml"))
	if err != nil {
		return fmt.Errorf("read values: %w", err)
	}
	readmePath := filepath.Join(chart, "README.md")
	readme, err := os.ReadFile(readmePath)
	if err != nil {
		return fmt.Errorf("read readme: %w", err)
	}
	rows, err := Parse(values)
	if err != nil {
		return err
	}
	updated, err := Replace(readme, Table(rows))
	if err != nil {
		return fmt.Errorf("%s: %w", readmePath, err)
	}
	if bytes.Equal(updated, readme) {
		return nil
	}
	if check {
		return ErrStale
	}
	if err := os.WriteFile(readmePath, updated, 0o644); err != nil {
		return fmt.Errorf("write readme: %w", err)
	}
	return nil
}

var typeHint = regexp.MustCompile(`^\((\w+)\)\s*`)

// Parse returns the rows documented in a values.yaml document.
func Parse(values []byte) ([]Row, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(values, &doc); err != nil {
		return nil, fmt.Errorf("parse values.yaml: %w", err)
	}
	if len(doc.Content) == 0 {
		return nil, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, errors.New("values.yaml: top level is not a mapping")
	}
	var rows []Row
	if err := walk(root, "", &rows); err != nil {
		return nil, err
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].Key < rows[j].Key })
	return rows, nil
}

func walk(m *yaml.Node, prefix string, rows *[]Row) error {
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		key := prefix + k.Value
		desc, typ, def, documented := comment(k.HeadComment)
		if !documented && v.Kind == yaml.MappingNode && len(v.Content) > 0 {
			if err := walk(v, key+".", rows); err != nil {
				return err
			}
			continue
		}
		var value any
		if err := v.Decode(&value); err != nil {
			return fmt.Errorf("values.yaml: decode %s: %w", key, err)
		}
		if typ == "" {
			typ = typeOf(value)
		}
		if def == "" {
			j, err := compactJSON(value)
			if err != nil {
				return fmt.Errorf("values.yaml: encode default of %s: %w", key, err)
			}
			def = "`" + j + "`"
		}
		*rows = append(*rows, Row{Key: key, Type: typ, Default: def, Description: desc})
	}
	return nil
}

// comment extracts the "# --" description (with an optional "(type)"
// prefix) and an "# @default --" override from a key's head comment.
func comment(head string) (desc, typ, def string, documented bool) {
	var parts []string
	in := false
	for _, line := range strings.Split(head, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "# -- "), line == "# --":
			in, documented = true, true
			parts = []string{strings.TrimSpace(strings.TrimPrefix(line, "# --"))}
		case strings.HasPrefix(line, "# @default -- "):
			def = strings.TrimSpace(strings.TrimPrefix(line, "# @default -- "))
			in = false
		case in && strings.HasPrefix(line, "#"):
			parts = append(parts, strings.TrimSpace(strings.TrimPrefix(line, "#")))
		default:
			in = false
		}
	}
	desc = strings.Join(strings.Fields(strings.Join(parts, " ")), " ")
	if m := typeHint.FindStringSubmatch(desc); m != nil {
		typ = m[1]
		desc = desc[len(m[0]):]
	}
	return desc, typ, def, documented
}

func typeOf(v any) string {
	switch v.(type) {
	case nil:
		return "string"
	case bool:
		return "bool"
	case int, int64, uint64:
		return "int"
	case float64:
		return "float"
	case string:
		return "string"
	case []any:
		return "list"
	default:
		return "object"
	}
}

func compactJSON(v any) (string, error) {
	if v == nil {
		return "nil", nil
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return "", fmt.Errorf("encode json: %w", err)
	}
	return strings.TrimSpace(b.String()), nil
}

// Table renders rows as the helm-docs Markdown table.
func Table(rows []Row) string {
	var b strings.Builder
	b.WriteString("| Key | Type | Default | Description |\n")
	b.WriteString("|-----|------|---------|-------------|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.Key, r.Type,
			strings.ReplaceAll(r.Default, "|", `\|`), strings.ReplaceAll(r.Description, "|", `\|`))
	}
	return b.String()
}

// Replace puts table between the markers of readme.
func Replace(readme []byte, table string) ([]byte, error) {
	s := string(readme)
	start := strings.Index(s, startMarker)
	end := strings.Index(s, endMarker)
	if start < 0 || end < start {
		return nil, fmt.Errorf("markers %s and %s not found in order", startMarker, endMarker)
	}
	head := s[:start+len(startMarker)]
	return []byte(head + "\n" + table + s[end:]), nil
}
