package staticpod

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"
)

// SlotSuffix names the second slot: a static pod named NAME (the
// manifest's metadata.name, "extractedprism" as shipped) lives either as
// NAME or as NAME+SlotSuffix, and an upgrade starts the new version in the
// slot that is free. The kubelet runs two static pods of different names
// side by side, while it starts a changed pod of the same name only after
// the old one has exited.
const SlotSuffix = "-b"

// manifest is a parsed static pod manifest: its YAML tree, kept with its
// comments, and the fields the upgrade reads.
type manifest struct {
	doc  *yaml.Node
	name string // metadata.name
	path string // the file it was read from ("" for the new one)
}

// parseManifest parses a Pod manifest; what names the source in errors.
func parseManifest(data []byte, what string) (*manifest, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: not YAML: %w", what, err)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s: not a single YAML mapping", what)
	}
	root := doc.Content[0]
	if k := scalar(lookup(root, "kind")); k != "Pod" {
		return nil, fmt.Errorf("%s: kind %q, want Pod (a static pod manifest)", what, k)
	}
	name := scalar(lookup(lookup(root, "metadata"), "name"))
	if name == "" {
		return nil, fmt.Errorf("%s: metadata.name is empty", what)
	}
	return &manifest{doc: &doc, name: name}, nil
}

// baseName is the pod's name without the second slot's suffix.
func (m *manifest) baseName() string { return strings.TrimSuffix(m.name, SlotSuffix) }

// withName returns the manifest's YAML with metadata.name set to name.
func (m *manifest) withName(name string) ([]byte, error) {
	var cp yaml.Node
	if err := copyNode(&cp, m.doc); err != nil {
		return nil, err
	}
	n := lookup(lookup(cp.Content[0], "metadata"), "name")
	n.Value, n.Style, n.Tag = name, 0, "!!str"
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&cp); err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return buf.Bytes(), nil
}

// sameAs reports whether m and o are the same pod but for metadata.name.
func (m *manifest) sameAs(o *manifest) bool {
	a, errA := m.plain()
	b, errB := o.plain()
	return errA == nil && errB == nil && reflect.DeepEqual(a, b)
}

// plain decodes the manifest into maps without metadata.name.
func (m *manifest) plain() (map[string]any, error) {
	var v map[string]any
	if err := m.doc.Decode(&v); err != nil {
		return nil, err
	}
	if md, ok := v["metadata"].(map[string]any); ok {
		delete(md, "name")
	}
	return v, nil
}

// reusePort reports whether a container of the pod turns listen.reuse_port
// on with its arguments (--reuse-port, --reuse-port=true) or environment
// (EP_REUSE_PORT=true), and explains what it found otherwise.
func (m *manifest) reusePort() (bool, string) {
	containers := lookup(lookup(m.doc.Content[0], "spec"), "containers")
	if containers == nil || containers.Kind != yaml.SequenceNode || len(containers.Content) == 0 {
		return false, "spec.containers is empty"
	}
	for i, c := range containers.Content {
		for _, a := range seq(lookup(c, "args")) {
			switch a {
			case "--reuse-port", "--reuse-port=true":
				return true, ""
			case "--reuse-port=false":
				return false, fmt.Sprintf("spec.containers[%d].args has %q", i, a)
			}
		}
		if env := lookup(c, "env"); env != nil && env.Kind == yaml.SequenceNode {
			for _, e := range env.Content {
				if scalar(lookup(e, "name")) == "EP_REUSE_PORT" && scalar(lookup(e, "value")) == "true" {
					return true, ""
				}
			}
		}
	}
	return false, "no container has --reuse-port=true in its args (or EP_REUSE_PORT=true)"
}

// slotFile is the file the upgrade writes a slot's pod to.
func slotFile(dir, name string) string { return filepath.Join(dir, name+".yaml") }

// findSlots reads the manifests in dir and returns those of the pods
// named base or base+SlotSuffix (whatever their file names), in that
// order of names. Files the kubelet ignores (names starting with a dot)
// and files that are no Pod are skipped.
func findSlots(dir, base string) ([]*manifest, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("static pod directory: %w", err)
	}
	var a, b []*manifest
	for _, e := range entries {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("static pod directory: %w", err)
		}
		m, err := parseManifest(data, path)
		if err != nil {
			continue // another component's file, or not ours to judge
		}
		m.path = path
		switch m.name {
		case base:
			a = append(a, m)
		case base + SlotSuffix:
			b = append(b, m)
		}
	}
	if len(a) > 1 || len(b) > 1 {
		return nil, fmt.Errorf("static pod directory %s: more than one file holds a pod named %s or %s%s: keep one each", dir, base, base, SlotSuffix)
	}
	return append(a, b...), nil
}

// writeFile writes data to path atomically: a dot file beside it (the
// kubelet ignores those) renamed over it, so the kubelet never reads half
// a manifest.
func writeFile(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// lookup returns the value of key in mapping node n (nil if none).
func lookup(n *yaml.Node, key string) *yaml.Node {
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

// scalar returns a scalar node's value ("" for nil or another kind).
func scalar(n *yaml.Node) string {
	if n == nil || n.Kind != yaml.ScalarNode {
		return ""
	}
	return n.Value
}

// seq returns the scalar values of a sequence node.
func seq(n *yaml.Node) []string {
	if n == nil || n.Kind != yaml.SequenceNode {
		return nil
	}
	out := make([]string, 0, len(n.Content))
	for _, c := range n.Content {
		out = append(out, scalar(c))
	}
	return out
}

// copyNode deep-copies src into dst.
func copyNode(dst, src *yaml.Node) error {
	if src == nil {
		return errors.New("no manifest")
	}
	*dst = *src
	dst.Content = make([]*yaml.Node, len(src.Content))
	for i, c := range src.Content {
		dst.Content[i] = new(yaml.Node)
		if err := copyNode(dst.Content[i], c); err != nil {
			return err
		}
	}
	return nil
}
