// Command k8sschema writes one standalone JSON schema per Kubernetes kind
// from the OpenAPI v2 document (api/openapi-spec/swagger.json) of the
// k8s.io/kubernetes module, in the file layout kubeconform reads with
// -schema-location 'DIR/{{ .ResourceKind }}{{ .KindSuffix }}.json'.
//
// The schemas are strict: every object that lists its properties rejects
// unknown ones, so a misspelt field fails validation. int-or-string and
// quantity fields accept both strings and numbers, as the API server does.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const refPrefix = "#/definitions/"

// gvk is one entry of a definition's x-kubernetes-group-version-kind list.
type gvk struct {
	Group   string `json:"group"`
	Version string `json:"version"`
	Kind    string `json:"kind"`
}

func main() {
	in := flag.String("in", "", "path of swagger.json")
	out := flag.String("out", "", "directory to write the schemas to")
	flag.Parse()
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	n, err := run(*in, *out)
	if err != nil {
		logger.Error("generate schemas", "err", err)
		os.Exit(1)
	}
	logger.Info("schemas written", "count", n, "dir", *out)
}

// run reads the OpenAPI document at in and writes the schemas to out,
// returning how many files it wrote.
func run(in, out string) (int, error) {
	if in == "" || out == "" {
		return 0, errors.New("both -in and -out are required")
	}
	raw, err := os.ReadFile(in)
	if err != nil {
		return 0, fmt.Errorf("read openapi document: %w", err)
	}
	var doc struct {
		Definitions map[string]map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return 0, fmt.Errorf("parse openapi document %s: %w", in, err)
	}
	if len(doc.Definitions) == 0 {
		return 0, fmt.Errorf("openapi document %s has no definitions", in)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return 0, fmt.Errorf("create output directory: %w", err)
	}
	defs := make(map[string]any, len(doc.Definitions))
	for name, def := range doc.Definitions {
		defs[name] = tighten(name, def)
	}
	names := make([]string, 0, len(doc.Definitions))
	for name := range doc.Definitions {
		names = append(names, name)
	}
	sort.Strings(names)
	written := 0
	for _, name := range names {
		for _, k := range kinds(doc.Definitions[name]) {
			file := filepath.Join(out, fileName(k))
			if err := writeSchema(file, name, defs); err != nil {
				return written, err
			}
			written++
		}
	}
	return written, nil
}

// kinds returns the group-version-kinds a definition is served as.
func kinds(def map[string]any) []gvk {
	raw, ok := def["x-kubernetes-group-version-kind"]
	if !ok {
		return nil
	}
	b, err := json.Marshal(raw)
	if err != nil {
		return nil
	}
	var out []gvk
	if err := json.Unmarshal(b, &out); err != nil {
		return nil
	}
	return out
}

// fileName is the name kubeconform derives from kind and apiVersion:
// lower-case kind, then "-" and the first label of the group (if any),
// then "-" and the version.
func fileName(k gvk) string {
	suffix := ""
	if k.Group != "" {
		suffix = "-" + strings.ToLower(strings.Split(k.Group, ".")[0])
	}
	return strings.ToLower(k.Kind) + suffix + "-" + strings.ToLower(k.Version) + ".json"
}

// writeSchema writes the definition root with every definition it reaches.
func writeSchema(file, root string, defs map[string]any) error {
	reached := map[string]any{}
	collect(defs[root], defs, reached)
	schema := map[string]any{}
	if m, ok := defs[root].(map[string]any); ok {
		for k, v := range m {
			schema[k] = v
		}
	}
	schema["$schema"] = "http://json-schema.org/draft-07/schema#"
	schema["definitions"] = reached
	b, err := json.MarshalIndent(schema, "", " ")
	if err != nil {
		return fmt.Errorf("encode schema %s: %w", root, err)
	}
	if err := os.WriteFile(file, b, 0o644); err != nil {
		return fmt.Errorf("write schema %s: %w", file, err)
	}
	return nil
}

// collect adds every definition that node refers to, transitively, to reached.
func collect(node any, defs, reached map[string]any) {
	switch n := node.(type) {
	case map[string]any:
		if ref, ok := n["$ref"].(string); ok && strings.HasPrefix(ref, refPrefix) {
			name := strings.TrimPrefix(ref, refPrefix)
			if _, seen := reached[name]; !seen {
				if def, ok := defs[name]; ok {
					reached[name] = def
					collect(def, defs, reached)
				}
			}
		}
		for _, v := range n {
			collect(v, defs, reached)
		}
	case []any:
		for _, v := range n {
			collect(v, defs, reached)
		}
	}
}

// tighten returns a copy of a schema node in which closed objects reject
// unknown properties and int-or-string or quantity values take both forms.
func tighten(name string, node any) any {
	switch n := node.(type) {
	case map[string]any:
		out := make(map[string]any, len(n))
		for k, v := range n {
			if k == "properties" {
				props := map[string]any{}
				if m, ok := v.(map[string]any); ok {
					for pk, pv := range m {
						props[pk] = tighten("", pv)
					}
				}
				out[k] = props
				continue
			}
			out[k] = tighten("", v)
		}
		if _, hasProps := n["properties"]; hasProps {
			if _, set := n["additionalProperties"]; !set {
				out["additionalProperties"] = false
			}
		}
		if n["format"] == "int-or-string" || name == "io.k8s.apimachinery.pkg.util.intstr.IntOrString" {
			delete(out, "type")
			delete(out, "format")
			out["oneOf"] = []any{map[string]any{"type": "string"}, map[string]any{"type": "integer"}}
		}
		if name == "io.k8s.apimachinery.pkg.api.resource.Quantity" {
			delete(out, "type")
			out["oneOf"] = []any{map[string]any{"type": "string"}, map[string]any{"type": "number"}}
		}
		return out
	case []any:
		out := make([]any, len(n))
		for i, v := range n {
			out[i] = tighten("", v)
		}
		return out
	default:
		return node
	}
}
