package config

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

var update = flag.Bool("update", false, "rewrite the key table in docs/configuration.md")

const (
	exampleFile = "../../configs/extractedprism.yaml"
	docsFile    = "../../docs/configuration.md"
	readmeFile  = "../../README.md"
	tableStart  = "<!-- config-table:start -->"
	tableEnd    = "<!-- config-table:end -->"
)

// leafKeys walks the Config type by reflection (independently of the
// schema table) and returns every leaf key.
func leafKeys(t reflect.Type, prefix string) []string {
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		key := prefix + f.Tag.Get("koanf")
		if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeFor[time.Duration]() {
			out = append(out, leafKeys(f.Type, key+".")...)
			continue
		}
		out = append(out, key)
	}
	return out
}

func TestSchemaCoversConfigType(t *testing.T) {
	keys := leafKeys(reflect.TypeFor[Config](), "")
	if !reflect.DeepEqual(keys, Keys()) {
		t.Fatalf("reflection walk %v\n!= Keys() %v", keys, Keys())
	}
	for _, k := range keys {
		if strings.Contains(k, "..") || strings.HasSuffix(k, ".") || k == "" {
			t.Errorf("field without a koanf tag: %q", k)
		}
	}
}

func TestExampleFileHasEveryKeyWithItsDefault(t *testing.T) {
	data, err := os.ReadFile(exampleFile)
	if err != nil {
		t.Fatal(err)
	}
	layer, err := parseYAML(exampleFile, data)
	if err != nil {
		t.Fatalf("example file does not load strictly:\n%v", err)
	}
	for _, k := range leafKeys(reflect.TypeFor[Config](), "") {
		if _, ok := layer.values[k]; !ok {
			t.Errorf("%s: key missing from %s", k, exampleFile)
		}
	}
	// The example has no endpoints (they are site-specific); give one
	// through the environment so that it validates, then compare.
	c, err := Load(exampleFile, nil, []string{"EP_ENDPOINTS=10.0.0.1:6443"})
	if err != nil {
		t.Fatalf("example file does not validate:\n%v", err)
	}
	c.Endpoints = layer.values["endpoints"].([]string)
	if d := Defaults(); !reflect.DeepEqual(c, d) {
		for _, k := range Keys() {
			if got, want := c.value(k), d.value(k); !reflect.DeepEqual(got, want) {
				t.Errorf("%s: example file has %v, Defaults() has %v", k, got, want)
			}
		}
	}
}

func TestExampleFileCommentsEveryKey(t *testing.T) {
	desc, err := exampleDescriptions()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range Keys() {
		if desc[k] == "" {
			t.Errorf("%s: no comment above the key in %s", k, exampleFile)
		}
	}
}

func TestDocsListEveryKeyAndFlag(t *testing.T) {
	data, err := os.ReadFile(docsFile)
	if err != nil {
		t.Fatal(err)
	}
	docs := string(data)
	for _, k := range leafKeys(reflect.TypeFor[Config](), "") {
		if !strings.Contains(docs, "`"+k+"`") {
			t.Errorf("%s: missing from %s", k, docsFile)
		}
	}
	for _, s := range flagSpecs {
		if !strings.Contains(docs, "`--"+s.Name+"`") || !strings.Contains(docs, "`"+EnvName(s.Name)+"`") {
			t.Errorf("--%s / %s: missing from %s", s.Name, EnvName(s.Name), docsFile)
		}
	}
}

func TestDocsTableIsCurrent(t *testing.T) {
	want, err := markdownTable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(docsFile)
	if err != nil {
		t.Fatal(err)
	}
	before, rest, ok1 := strings.Cut(string(data), tableStart+"\n")
	got, after, ok2 := strings.Cut(rest, tableEnd)
	if !ok1 || !ok2 {
		t.Fatalf("%s lacks the %s / %s markers", docsFile, tableStart, tableEnd)
	}
	if got == want {
		return
	}
	if *update {
		out := before + tableStart + "\n" + want + tableEnd + after
		if err := os.WriteFile(docsFile, []byte(out), 0o644); err != nil { //nolint:gosec // documentation file
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("the key table in %s is stale; run: go test ./pkg/config -run TestDocsTableIsCurrent -update\n--- have\n%s--- want\n%s", docsFile, got, want)
}

func TestReadmeTableListsEveryKey(t *testing.T) {
	data, err := os.ReadFile(readmeFile)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	_, rest, ok1 := strings.Cut(string(data), tableStart)
	section, _, ok2 := strings.Cut(rest, tableEnd)
	if !ok1 || !ok2 {
		t.Skipf("%s has no %s / %s section yet", readmeFile, tableStart, tableEnd)
	}
	for _, k := range leafKeys(reflect.TypeFor[Config](), "") {
		if !strings.Contains(section, "`"+k+"`") {
			t.Errorf("%s: missing from the config table in %s", k, readmeFile)
		}
	}
}

// exampleDescriptions returns the comment above each key of the example
// file, by dotted key.
func exampleDescriptions() (map[string]string, error) {
	data, err := os.ReadFile(exampleFile)
	if err != nil {
		return nil, err
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	out := map[string]string{}
	var walk func(n *yaml.Node, prefix string)
	walk = func(n *yaml.Node, prefix string) {
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			path := prefix + k.Value
			lines := strings.Split(strings.TrimSpace(k.HeadComment), "\n")
			// A file header ends with a blank line; keep the last paragraph.
			if j := strings.LastIndex(k.HeadComment, "\n\n"); j >= 0 {
				lines = strings.Split(strings.TrimSpace(k.HeadComment[j:]), "\n")
			}
			var text []string
			for _, l := range lines {
				if l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "#")); l != "" {
					text = append(text, l)
				}
			}
			out[path] = strings.Join(text, " ")
			if v.Kind == yaml.MappingNode {
				walk(v, path+".")
			}
		}
	}
	walk(doc.Content[0], "")
	return out, nil
}

// formatDefault renders a default value as the YAML file spells it.
func formatDefault(v any) string {
	switch v := v.(type) {
	case string:
		return strconv.Quote(v)
	case time.Duration:
		s := v.String()
		if strings.HasSuffix(s, "m0s") {
			s = strings.TrimSuffix(s, "0s")
		}
		if strings.HasSuffix(s, "h0m") {
			s = strings.TrimSuffix(s, "0m")
		}
		return s
	case []string:
		if len(v) == 0 {
			return "[]"
		}
		return strings.Join(v, ",")
	default:
		return fmt.Sprint(v)
	}
}

// markdownTable renders the key table: key, type, default, flag and
// environment variable, description (from the example file's comments).
func markdownTable() (string, error) {
	desc, err := exampleDescriptions()
	if err != nil {
		return "", err
	}
	d := Defaults()
	var b strings.Builder
	b.WriteString("| Key | Type | Default | Flag / environment | Description |\n")
	b.WriteString("|-----|------|---------|--------------------|-------------|\n")
	for _, f := range schema.fields {
		flagCol := ""
		if name, ok := flagForKey[f.Path]; ok {
			flagCol = fmt.Sprintf("`--%s` `%s`", name, EnvName(name))
		}
		text := strings.ReplaceAll(desc[f.Path], "|", `\|`)
		fmt.Fprintf(&b, "| `%s` | %s | `%s` | %s | %s |\n", f.Path, f.Kind, formatDefault(d.value(f.Path)), flagCol, text)
	}
	return b.String(), nil
}

// TestFormatDefault pins the duration spelling used in the table.
func TestFormatDefault(t *testing.T) {
	for v, want := range map[time.Duration]string{
		time.Minute: "1m", 5 * time.Minute: "5m", time.Hour: "1h", 90 * time.Second: "1m30s",
		2 * time.Second: "2s", 500 * time.Millisecond: "500ms", 0: "0s",
	} {
		if got := formatDefault(v); got != want {
			t.Errorf("formatDefault(%v) = %q, want %q", v, got, want)
		}
	}
	if got := formatDefault(filepath.Join("a", "b")); got != `"a/b"` {
		t.Errorf("string: %s", got)
	}
}
