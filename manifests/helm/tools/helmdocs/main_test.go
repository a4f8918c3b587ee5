package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"gopkg.in/yaml.v3"
)

const chartDir = "../../extractedprism"

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// seedValues is the values table of the seed chart: key, type, default.
var seedValues = []Row{
	{Key: "affinity", Type: "object", Default: "`{}`"},
	{Key: "bindAddress", Type: "string", Default: "`\"127.0.0.1\"`"},
	{Key: "bindPort", Type: "int", Default: "`7445`"},
	{Key: "dnsPolicy", Type: "string", Default: "`\"ClusterFirstWithHostNet\"`"},
	{Key: "enableDiscovery", Type: "bool", Default: "`true`"},
	{Key: "endpoints", Type: "string", Default: "`\"\"`"},
	{Key: "fullnameOverride", Type: "string", Default: "`\"\"`"},
	{Key: "healthInterval", Type: "string", Default: "`\"20s\"`"},
	{Key: "healthPort", Type: "int", Default: "`7446`"},
	{Key: "healthTimeout", Type: "string", Default: "`\"15s\"`"},
	{Key: "hostNetwork", Type: "bool", Default: "`true`"},
	{Key: "image.pullPolicy", Type: "string", Default: "`\"IfNotPresent\"`"},
	{Key: "image.repository", Type: "string", Default: "`\"ghcr.io/lexfrei/extractedprism\"`"},
	{Key: "image.tag", Type: "string", Default: "`\"\"`"},
	{Key: "imagePullSecrets", Type: "list", Default: "`[]`"},
	{Key: "livenessProbe", Type: "object", Default: "`{\"failureThreshold\":3,\"httpGet\":{\"host\":\"127.0.0.1\",\"path\":\"/healthz\",\"port\":7446},\"initialDelaySeconds\":10,\"periodSeconds\":10,\"timeoutSeconds\":5}`"},
	{Key: "logLevel", Type: "string", Default: "`\"info\"`"},
	{Key: "nameOverride", Type: "string", Default: "`\"\"`"},
	{Key: "nodeSelector", Type: "object", Default: "`{}`"},
	{Key: "podAnnotations", Type: "object", Default: "`{}`"},
	{Key: "podLabels", Type: "object", Default: "`{}`"},
	{Key: "podSecurityContext", Type: "object", Default: "`{\"seccompProfile\":{\"type\":\"RuntimeDefault\"}}`"},
	{Key: "priorityClassName", Type: "string", Default: "`\"system-node-critical\"`"},
	{Key: "readinessProbe", Type: "object", Default: "`{\"failureThreshold\":3,\"httpGet\":{\"host\":\"127.0.0.1\",\"path\":\"/readyz\",\"port\":7446},\"initialDelaySeconds\":5,\"periodSeconds\":10,\"timeoutSeconds\":5}`"},
	{Key: "resources", Type: "object", Default: "`{\"limits\":{\"cpu\":\"100m\",\"memory\":\"64Mi\"},\"requests\":{\"cpu\":\"10m\",\"memory\":\"16Mi\"}}`"},
	{Key: "securityContext", Type: "object", Default: "`{\"allowPrivilegeEscalation\":false,\"capabilities\":{\"drop\":[\"ALL\"]},\"readOnlyRootFilesystem\":true,\"runAsNonRoot\":true,\"runAsUser\":65534}`"},
	{Key: "serviceAccount.annotations", Type: "object", Default: "`{}`"},
	{Key: "serviceAccount.create", Type: "bool", Default: "`true`"},
	{Key: "serviceAccount.name", Type: "string", Default: "`\"\"`"},
	{Key: "tolerations", Type: "list", Default: "`[{\"operator\":\"Exists\"}]`"},
	{Key: "updateStrategy.maxUnavailable", Type: "int", Default: "`1`"},
	{Key: "updateStrategy.type", Type: "string", Default: "`\"RollingUpdate\"`"},
}

// changedDefaults are the seed defaults this chart changes on purpose; each
// one has a row in the README section "Defaults that differ from the seed chart".
var changedDefaults = map[string]bool{
	"healthInterval":   true,
	"healthTimeout":    true,
	"livenessProbe":    true,
	"readinessProbe":   true,
	"securityContext":  true,
	"image.repository": true,
	"resources":        true,
}

func chartRows(t *testing.T) map[string]Row {
	t.Helper()
	values, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := Parse(values)
	if err != nil {
		t.Fatal(err)
	}
	byKey := map[string]Row{}
	for _, r := range rows {
		byKey[r.Key] = r
	}
	return byKey
}

func TestREADMETableMatchesValues(t *testing.T) {
	if err := run(chartDir, true); err != nil {
		if errors.Is(err, ErrStale) {
			t.Fatalf("%v: the values table in %s/README.md differs from values.yaml", err, chartDir)
		}
		t.Fatal(err)
	}
}

func TestEveryValueIsDocumented(t *testing.T) {
	for key, r := range chartRows(t) {
		if r.Description == "" {
			t.Errorf("value %s has no \"# --\" description in values.yaml", key)
		}
	}
}

func TestSeedValuesKeepNameTypeAndDefault(t *testing.T) {
	rows := chartRows(t)
	readme, err := os.ReadFile(filepath.Join(chartDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	section := string(readme)
	if i := strings.Index(section, "## Defaults that differ from the seed chart"); i >= 0 {
		section = section[i:]
		if j := strings.Index(section[3:], "\n## "); j >= 0 {
			section = section[:j+3]
		}
	} else {
		t.Fatal("README has no section \"Defaults that differ from the seed chart\"")
	}
	for _, seed := range seedValues {
		got, ok := rows[seed.Key]
		if !ok {
			t.Errorf("seed value %s is missing from values.yaml", seed.Key)
			continue
		}
		if got.Type != seed.Type {
			t.Errorf("seed value %s: type %s, seed has %s", seed.Key, got.Type, seed.Type)
		}
		if changedDefaults[seed.Key] {
			if got.Default == seed.Default {
				t.Errorf("seed value %s is listed as changed but keeps the seed default %s", seed.Key, seed.Default)
			}
			if !strings.Contains(section, "| "+seed.Key) && !strings.Contains(section, ", "+seed.Key+" |") {
				t.Errorf("seed value %s changed its default but the README does not say why", seed.Key)
			}
			continue
		}
		if got.Default != seed.Default {
			t.Errorf("seed value %s: default %s, seed has %s (add it to the documented changes or restore it)",
				seed.Key, got.Default, seed.Default)
		}
	}
}

// setPaths flattens the keys a helm-unittest "set" block assigns, both
// nested maps and dotted keys, into dotted paths (with every prefix).
func setPaths(prefix string, v any, out map[string]bool) {
	m, ok := v.(map[string]any)
	if !ok {
		return
	}
	for k, child := range m {
		p := prefix + k
		for i := range strings.Split(p, ".") {
			out[strings.Join(strings.Split(p, ".")[:i+1], ".")] = true
		}
		setPaths(p+".", child, out)
	}
}

func TestEverySeedValueHasAUnitTest(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(chartDir, "tests", "*_test.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no unit test suites in %s/tests (err %v)", chartDir, err)
	}
	set := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var suite struct {
			Tests []struct {
				Set map[string]any `yaml:"set"`
			} `yaml:"tests"`
		}
		if err := yaml.Unmarshal(b, &suite); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, tc := range suite.Tests {
			setPaths("", tc.Set, set)
		}
	}
	for _, seed := range seedValues {
		if !set[seed.Key] {
			t.Errorf("seed value %s is not set by any unit test case", seed.Key)
		}
	}
}

func TestSchemaCoversEveryValue(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(chartDir, "values.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	type node struct {
		Properties           map[string]json.RawMessage `json:"properties"`
		AdditionalProperties json.RawMessage            `json:"additionalProperties"`
	}
	var root node
	if err := json.Unmarshal(b, &root); err != nil {
		t.Fatal(err)
	}
	if string(root.AdditionalProperties) != "false" {
		t.Error("values.schema.json must reject unknown top-level values")
	}
	keys := make([]string, 0)
	for k := range chartRows(t) {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, key := range keys {
		cur := root
		for _, part := range strings.Split(key, ".") {
			raw, ok := cur.Properties[part]
			if !ok {
				t.Errorf("values.schema.json has no schema for %s", key)
				break
			}
			cur = node{}
			if err := json.Unmarshal(raw, &cur); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestParseFollowsHelmDocsConventions(t *testing.T) {
	const values = `
# -- A documented map is one row
probe:
  path: /x
nested:
  # -- first line
  # continued here
  leaf: 3
  undocumented: true
# -- (int) typed null
grace: null
# -- shown default
# @default -- computed
name: ""
`
	rows, err := Parse([]byte(values))
	if err != nil {
		t.Fatal(err)
	}
	want := []Row{
		{Key: "grace", Type: "int", Default: "`nil`", Description: "typed null"},
		{Key: "name", Type: "string", Default: "computed", Description: "shown default"},
		{Key: "nested.leaf", Type: "int", Default: "`3`", Description: "first line continued here"},
		{Key: "nested.undocumented", Type: "bool", Default: "`true`", Description: ""},
		{Key: "probe", Type: "object", Default: "`{\"path\":\"/x\"}`", Description: "A documented map is one row"},
	}
	if len(rows) != len(want) {
		t.Fatalf("got %d rows %+v, want %d", len(rows), rows, len(want))
	}
	for i := range want {
		if rows[i] != want[i] {
			t.Errorf("row %d = %+v, want %+v", i, rows[i], want[i])
		}
	}
	table := Table(rows)
	if !strings.HasPrefix(table, "| Key | Type | Default | Description |\n|-----|------|---------|-------------|\n| grace | int | `nil` | typed null |\n") {
		t.Errorf("table not in helm-docs format:\n%s", table)
	}
}

func TestReplaceNeedsMarkers(t *testing.T) {
	if _, err := Replace([]byte("# no markers\n"), "| x |\n"); err == nil {
		t.Fatal("Replace without markers succeeded")
	}
	got, err := Replace([]byte("a\n"+startMarker+"\nold\n"+endMarker+"\nb\n"), "new\n")
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "a\n"+startMarker+"\nnew\n"+endMarker+"\nb\n" {
		t.Errorf("Replace = %q", got)
	}
}
