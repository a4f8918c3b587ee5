package config

import (
	"reflect"
	"sort"
	"strings"
	"time"
)

// kind is the value type of one configuration key.
type kind int

const (
	kindString kind = iota
	kindInt
	kindBool
	kindFloat
	kindDuration
	kindStrings
)

// String names the kind as the documentation does.
func (k kind) String() string {
	switch k {
	case kindString:
		return "string"
	case kindInt:
		return "int"
	case kindBool:
		return "bool"
	case kindFloat:
		return "float"
	case kindDuration:
		return "duration"
	case kindStrings:
		return "list of strings"
	}
	return "unknown"
}

// field is one leaf key of the schema.
type field struct {
	Path  string // dotted koanf path, e.g. "probe.interval"
	Kind  kind
	Index []int // reflect field index from Config
}

var durationType = reflect.TypeFor[time.Duration]()

// schema lists the leaf keys of Config in declaration order, and the
// section keys (nested structs) in sections.
type schemaInfo struct {
	fields   []field
	byPath   map[string]field
	sections map[string]bool
	all      []string // every known path (sections and leaves), sorted
}

var schema = buildSchema()

func buildSchema() *schemaInfo {
	s := &schemaInfo{byPath: map[string]field{}, sections: map[string]bool{}}
	var walk func(t reflect.Type, prefix string, index []int)
	walk = func(t reflect.Type, prefix string, index []int) {
		for i := range t.NumField() {
			sf := t.Field(i)
			tag := sf.Tag.Get("koanf")
			if tag == "" || tag == "-" {
				continue
			}
			path := prefix + tag
			idx := append(append([]int(nil), index...), i)
			ft := sf.Type
			var k kind
			switch {
			case ft == durationType:
				k = kindDuration
			case ft.Kind() == reflect.Struct:
				s.sections[path] = true
				walk(ft, path+".", idx)
				continue
			case ft.Kind() == reflect.String:
				k = kindString
			case ft.Kind() == reflect.Int:
				k = kindInt
			case ft.Kind() == reflect.Bool:
				k = kindBool
			case ft.Kind() == reflect.Float64:
				k = kindFloat
			case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.String:
				k = kindStrings
			default:
				panic("config: unsupported field type " + ft.String() + " at " + path)
			}
			f := field{Path: path, Kind: k, Index: idx}
			s.fields = append(s.fields, f)
			s.byPath[path] = f
		}
	}
	walk(reflect.TypeFor[Config](), "", nil)
	for p := range s.sections {
		s.all = append(s.all, p)
	}
	for _, f := range s.fields {
		s.all = append(s.all, f.Path)
	}
	sort.Strings(s.all)
	return s
}

// Keys returns every leaf key of the configuration as a dotted path
// ("listen.address", "proxy.rebalance.period", ...), in declaration order.
func Keys() []string {
	out := make([]string, len(schema.fields))
	for i, f := range schema.fields {
		out[i] = f.Path
	}
	return out
}

// value returns the value of the leaf key path in c.
func (c Config) value(path string) any {
	f, ok := schema.byPath[path]
	if !ok {
		return nil
	}
	return reflect.ValueOf(c).FieldByIndex(f.Index).Interface()
}

// suggest returns the known key closest to the unknown path, or "".
func suggest(path string) string {
	if len(path) > 256 {
		return ""
	}
	// A flag name used as a key: "bindPort", "bind_port", "health-port".
	last := path[strings.LastIndex(path, ".")+1:]
	if name, ok := flagByLoose[loose(last)]; ok {
		return flagByName[name].Key
	}
	// A key that exists under another section: "proxy.interval" -> "probe.interval".
	best, bestDist := "", -1
	for _, cand := range schema.all {
		d := levenshtein(path, cand)
		candLast := cand[strings.LastIndex(cand, ".")+1:]
		if candLast == last && d > 0 {
			d = min(d, 1+strings.Count(cand, "."))
		}
		if bestDist < 0 || d < bestDist {
			best, bestDist = cand, d
		}
	}
	limit := max(2, len(path)/3)
	if bestDist < 0 || bestDist > limit {
		return ""
	}
	return best
}

// levenshtein is the edit distance between a and b (bytes).
func levenshtein(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// loose normalises a name for comparison with flag names: lower case,
// without '-' and '_'.
func loose(s string) string {
	return strings.ToLower(strings.NewReplacer("-", "", "_", "").Replace(s))
}
