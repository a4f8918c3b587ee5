package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// position is a line and column in the YAML file (1-based).
type position struct {
	Line, Column int
}

// fileLayer is the content of one YAML file: typed values by dotted key,
// and where each value (and each endpoints[i]) sits in the file.
type fileLayer struct {
	values map[string]any
	pos    map[string]position
}

// yamlDecoder walks a yaml.Node tree against the schema.
type yamlDecoder struct {
	name  string
	layer *fileLayer
	errs  errorList
}

// parseYAML decodes data strictly: unknown keys, wrong types and
// duplicate keys are errors with file:line:col. A YAML syntax error is
// returned alone, as yaml.v3 reports it (with its line). An empty
// document yields no values.
func parseYAML(name string, data []byte) (layer *fileLayer, err error) {
	// yaml.v3 is not expected to panic, but a config loader must never
	// take the daemon down on a bad file.
	defer func() {
		if r := recover(); r != nil {
			layer, err = nil, fmt.Errorf("%s: invalid YAML: %v", name, r)
		}
	}()
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, &FieldError{File: name, Line: extra.Line, Column: extra.Column,
			Msg: "a second YAML document (\"---\"); the config file holds one document"}
	} else if !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%s: %w", name, err)
	}

	d := &yamlDecoder{name: name, layer: &fileLayer{values: map[string]any{}, pos: map[string]position{}}}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return d.layer, nil
		}
		root = root.Content[0]
	}
	if root.Kind == 0 { // empty file
		return d.layer, nil
	}
	if r := resolve(root); r == nil || r.Kind != yaml.MappingNode && (r.Kind != yaml.ScalarNode || r.Tag != "!!null") {
		// Nothing in the file is usable: report this alone.
		d.at(root, "", nil, "the top level must be a mapping of keys, got %s", describe(root))
		return nil, d.errs.err()
	}
	d.mapping(root, "")
	return d.layer, d.errs.err()
}

// at records a problem located at node n.
func (d *yamlDecoder) at(n *yaml.Node, path string, value any, format string, args ...any) {
	fe := newFieldError(path, value, format, args...)
	d.errs.push(fe)
	fe.File = d.name
	if n != nil {
		fe.Line, fe.Column = n.Line, n.Column
	}
}

// resolve follows aliases (bounded, to survive alias cycles).
func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; n != nil && n.Kind == yaml.AliasNode && i < 16; i++ {
		n = n.Alias
	}
	if n != nil && n.Kind == yaml.AliasNode {
		return nil
	}
	return n
}

// describe names a node's kind for error messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "nothing (null)"
		}
		return strconv.Quote(n.Value)
	}
	return "an unsupported YAML node"
}

// mapping decodes a section (prefix "" is the top level).
func (d *yamlDecoder) mapping(n *yaml.Node, prefix string) {
	section := strings.TrimSuffix(prefix, ".")
	orig := n
	if n = resolve(n); n == nil {
		d.at(orig, section, nil, "alias cycle")
		return
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // "probe:" with nothing below: keep defaults
	}
	if n.Kind != yaml.MappingNode {
		if section == "" {
			d.at(n, "", nil, "the top level must be a mapping of keys, got %s", describe(n))
		} else {
			d.at(n, section, nil, "expected a mapping of keys, got %s", describe(n))
		}
		return
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn, vn := resolve(n.Content[i]), n.Content[i+1]
		if kn == nil || kn.Kind != yaml.ScalarNode {
			d.at(n.Content[i], section, nil, "keys must be plain strings")
			continue
		}
		path := prefix + kn.Value
		if line, dup := seen[kn.Value]; dup {
			d.at(kn, path, nil, "duplicate key (first set on line %d)", line)
			continue
		}
		seen[kn.Value] = kn.Line
		if f, ok := schema.byPath[path]; ok {
			d.leaf(f, vn)
			continue
		}
		if schema.sections[path] {
			d.mapping(vn, path+".")
			continue
		}
		if s := suggest(path); s != "" {
			d.at(kn, path, nil, "unknown key (did you mean %s?)", s)
		} else {
			d.at(kn, path, nil, "unknown key")
		}
	}
}

// leaf decodes the value of one schema key.
func (d *yamlDecoder) leaf(f field, orig *yaml.Node) {
	n := resolve(orig)
	if n == nil {
		d.at(orig, f.Path, nil, "alias cycle")
		return
	}
	d.layer.pos[f.Path] = position{n.Line, n.Column}
	if f.Kind == kindStrings {
		d.list(f, n)
		return
	}
	if n.Kind != yaml.ScalarNode {
		d.at(n, f.Path, nil, "expected a %s, got %s", f.Kind, describe(n))
		return
	}
	if n.Tag == "!!null" {
		if f.Kind == kindString {
			d.layer.values[f.Path] = ""
			return
		}
		d.at(n, f.Path, nil, "missing value (expected a %s)", f.Kind)
		return
	}
	v, err := parseScalar(f.Kind, n.Value, n.Tag)
	if err != nil {
		d.at(n, f.Path, n.Value, "%s", err.Error())
		return
	}
	d.layer.values[f.Path] = v
}

// list decodes a list of strings: a YAML sequence of scalars, or one
// comma-separated string (as in --endpoints).
func (d *yamlDecoder) list(f field, n *yaml.Node) {
	switch n.Kind {
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			d.layer.values[f.Path] = []string{}
			return
		}
		d.layer.values[f.Path] = splitList(n.Value)
	case yaml.SequenceNode:
		out := make([]string, 0, len(n.Content))
		for i, el := range n.Content {
			p := fmt.Sprintf("%s[%d]", f.Path, i)
			e := resolve(el)
			if e == nil {
				d.at(el, p, nil, "alias cycle")
				continue
			}
			d.layer.pos[p] = position{e.Line, e.Column}
			if e.Kind != yaml.ScalarNode || e.Tag == "!!null" {
				d.at(e, p, nil, "expected a string, got %s", describe(e))
				continue
			}
			out = append(out, e.Value)
		}
		d.layer.values[f.Path] = out
	default:
		d.at(n, f.Path, nil, "expected a list of strings, got %s", describe(n))
	}
}

// splitList splits a comma-separated list, trimming blanks and dropping
// empty items.
func splitList(s string) []string {
	out := []string{}
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// parseScalar converts the text of a scalar to the key's type. tag is the
// YAML tag ("" for environment variables).
func parseScalar(k kind, s, tag string) (any, error) {
	switch k {
	case kindString:
		return s, nil
	case kindInt:
		if tag == "!!float" {
			return nil, fmt.Errorf("invalid integer %q (no fractions)", s)
		}
		n, err := strconv.ParseInt(strings.ReplaceAll(s, "_", ""), 10, 64)
		if err != nil || n != int64(int(n)) {
			return nil, fmt.Errorf("invalid integer %q", s)
		}
		return int(n), nil
	case kindBool:
		switch strings.ToLower(s) {
		case "true", "yes", "on", "1":
			return true, nil
		case "false", "no", "off", "0":
			return false, nil
		}
		return nil, fmt.Errorf("invalid boolean %q (use true or false)", s)
	case kindFloat:
		f, err := strconv.ParseFloat(strings.ReplaceAll(s, "_", ""), 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, fmt.Errorf("invalid number %q", s)
		}
		return f, nil
	case kindDuration:
		dur, err := time.ParseDuration(strings.TrimSpace(s))
		if err != nil {
			if _, nerr := strconv.ParseFloat(s, 64); nerr == nil {
				return nil, fmt.Errorf("invalid duration %q (a number needs a unit, e.g. \"%ss\")", s, s)
			}
			return nil, fmt.Errorf("invalid duration %q (use Go syntax, e.g. \"500ms\", \"2s\", \"5m\")", s)
		}
		return dur, nil
	case kindStrings:
		return splitList(s), nil
	}
	return nil, fmt.Errorf("unsupported value %q", s)
}
