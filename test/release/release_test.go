//go:build releasetest

// Package release_test checks a release folder and its repositories the way
// a user would use them (make release-test builds both with a throwaway
// key): one version everywhere, signatures that verify and that fail for a
// changed file, dnf installing from the yum repository with gpgcheck=1 and
// repo_gpgcheck=1 and refusing tampered or unsigned ones, and SBOMs that
// list every module the binaries hold.
package release_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

var (
	releaseDir = flag.String("release", "", "release folder (dist/release/VERSION)")
	repoDir    = flag.String("repo", "", "repository folder (apt/, yum/, keys)")
	version    = flag.String("version", "", "the release's VERSION (vX.Y.Z)")
	srcDir     = flag.String("src", "../..", "source tree")
	helmBin    = flag.String("helm", "helm", "helm binary")
	keyFile    = flag.String("key", "", "the signing key (ASCII-armoured secret key), to sign a tampered repository")
	passFile   = flag.String("passphrase", "", "the signing key's passphrase file")
)

const imageRepo = "ghcr.io/extractedprism/extractedprism"

func semver() string     { return strings.TrimPrefix(*version, "v") }
func pkgVersion() string { return strings.Replace(semver(), "-", "~", 1) }

func rel(name string) string {
	return filepath.Join(*releaseDir, strings.NewReplacer("VERSION", *version, "SEMVER", semver()).Replace(name))
}

func TestMain(m *testing.M) {
	flag.Parse()
	if *releaseDir == "" || *version == "" || *repoDir == "" {
		fmt.Fprintln(os.Stderr, "release_test: -release, -repo and -version are required (make release-test sets them)")
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// run runs a command and returns its combined output; it fails the test on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// runErr runs a command and returns its output and error.
func runErr(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// untar extracts a tar.gz into dir and returns the names it held.
func untar(t *testing.T, archive, dir string) []string {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Typeflag != tar.TypeReg {
			continue
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, os.FileMode(h.Mode)); err != nil { //nolint:gosec // test archive
			t.Fatal(err)
		}
	}
}

// TestOneVersionEverywhere: the binaries, packages, chart, kubeadm manifest,
// image and SBOMs all carry VERSION, and the source tree carries none.
func TestOneVersionEverywhere(t *testing.T) {
	for _, arch := range []string{"amd64", "arm64"} {
		dir := t.TempDir()
		names := untar(t, rel("extractedprism-VERSION-linux-"+arch+".tar.gz"), dir)
		top := "extractedprism-" + *version + "-linux-" + arch
		for _, want := range []string{top + "/extractedprism", top + "/LICENSE", top + "/README.md"} {
			found := false
			for _, n := range names {
				found = found || n == want
			}
			if !found {
				t.Errorf("linux/%s tar.gz lacks %s (has %q)", arch, want, names)
			}
		}
		bin := filepath.Join(dir, top, "extractedprism")
		// -trimpath keeps -ldflags out of the build info: look for the stamped string.
		if b, err := os.ReadFile(bin); err != nil || !bytes.Contains(b, []byte(*version)) {
			t.Errorf("linux/%s binary does not hold the string %s (%v)", arch, *version, err)
		}
		if arch == runtime.GOARCH {
			if out := run(t, bin, "version"); !strings.HasPrefix(out, "extractedprism "+*version+" ") {
				t.Errorf("extractedprism version = %q, want it to start with extractedprism %s", out, *version)
			}
		}
	}

	for _, deb := range []string{"extractedprism_SEMVER-1_amd64.deb", "extractedprism_SEMVER-1_arm64.deb"} {
		if got := strings.TrimSpace(run(t, "dpkg-deb", "-f", rel(deb), "Version")); got != pkgVersion()+"-1" {
			t.Errorf("%s: Version %q, want %s-1", deb, got, pkgVersion())
		}
	}
	for _, rpm := range []string{"extractedprism-SEMVER-1.x86_64.rpm", "extractedprism-SEMVER-1.aarch64.rpm"} {
		if got := run(t, "rpm", "-qp", "--nosignature", "--qf", "%{VERSION}-%{RELEASE}", rel(rpm)); got != pkgVersion()+"-1" {
			t.Errorf("%s: version %q, want %s-1", rpm, got, pkgVersion())
		}
	}

	chart := rel("extractedprism-SEMVER.tgz")
	var meta struct {
		Version    string `yaml:"version"`
		AppVersion string `yaml:"appVersion"`
	}
	if err := yaml.Unmarshal([]byte(run(t, *helmBin, "show", "chart", chart)), &meta); err != nil {
		t.Fatal(err)
	}
	if meta.Version != semver() || meta.AppVersion != *version {
		t.Errorf("chart version %q appVersion %q, want %s and %s", meta.Version, meta.AppVersion, semver(), *version)
	}
	rendered := run(t, *helmBin, "template", "ep", chart, "--set", "endpoints=10.0.0.1:6443")
	if imgs := imageRefs(rendered); len(imgs) != 1 || imgs[0] != imageRepo+":"+*version {
		t.Errorf("chart renders images %q, want only %s:%s", imgs, imageRepo, *version)
	}
	pod, err := os.ReadFile(rel("extractedprism-VERSION-kubeadm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if imgs := imageRefs(string(pod)); len(imgs) != 1 || imgs[0] != imageRepo+":"+*version {
		t.Errorf("kubeadm manifest names images %q, want only %s:%s", imgs, imageRepo, *version)
	}

	index := ociIndex(t, rel("extractedprism-VERSION-image.oci.tar"))
	if got := index.Manifests[0].Annotations["io.containerd.image.name"]; got != imageRepo+":"+*version {
		t.Errorf("image archive is named %q, want %s:%s", got, imageRepo, *version)
	}
	for _, sbom := range sbomFiles(t) {
		if v := readSBOM(t, sbom).Metadata.Component.Version; v != *version {
			t.Errorf("%s: metadata.component.version %q, want %s", filepath.Base(sbom), v, *version)
		}
	}

	// The tree itself names no release: only the development placeholder.
	var tree struct {
		Version    string `yaml:"version"`
		AppVersion string `yaml:"appVersion"`
	}
	b, err := os.ReadFile(filepath.Join(*srcDir, "manifests/helm/extractedprism/Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &tree); err != nil {
		t.Fatal(err)
	}
	if tree.Version != "0.0.0-dev" || tree.AppVersion != "dev" {
		t.Errorf("Chart.yaml in the tree says %s / %s, want the placeholder 0.0.0-dev / dev", tree.Version, tree.AppVersion)
	}
	out, _ := runErr("git", "-C", *srcDir, "grep", "-n", "-E", imageRepo+":v?[0-9]", "--", "manifests", "packaging", "configs", "systemd")
	if strings.TrimSpace(out) != "" {
		t.Errorf("the tree names a versioned image that no build of it produces:\n%s", out)
	}
}

// imageRefs returns the distinct values of the "image:" lines, sorted.
func imageRefs(doc string) []string {
	var refs []string
	for _, l := range strings.Split(doc, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "image: "); ok {
			refs = append(refs, strings.Trim(v, `"`))
		}
	}
	// The chart's DaemonSet and its readiness publisher run the same
	// image: each distinct reference once.
	slices.Sort(refs)
	return slices.Compact(refs)
}

type ociIndexDoc struct {
	Manifests []struct {
		Digest      string            `json:"digest"`
		Annotations map[string]string `json:"annotations"`
	} `json:"manifests"`
}

func ociIndex(t *testing.T, archive string) ociIndexDoc {
	t.Helper()
	var doc ociIndexDoc
	if err := json.Unmarshal([]byte(run(t, "tar", "-xOf", archive, "index.json")), &doc); err != nil || len(doc.Manifests) == 0 {
		t.Fatalf("index.json of %s: %v %+v", archive, err, doc)
	}
	return doc
}

func publicKeyring(t *testing.T) string {
	t.Helper()
	return filepath.Join(*repoDir, "extractedprism-archive-keyring.gpg")
}

// TestChecksumsAndSignatures: SHA256SUMS matches and its signature
// verifies with the published key (and not for a changed file); helm
// verify accepts the chart and refuses a changed one; the rpms carry a
// signature rpm accepts.
func TestChecksumsAndSignatures(t *testing.T) {
	cmd := exec.Command("sha256sum", "--strict", "-c", "SHA256SUMS")
	cmd.Dir = *releaseDir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("sha256sum -c SHA256SUMS: %v\n%s", err, out)
	}
	keyring := publicKeyring(t)
	if out, err := runErr("gpgv", "--keyring", keyring, rel("SHA256SUMS.asc"), rel("SHA256SUMS")); err != nil {
		t.Errorf("gpgv SHA256SUMS.asc: %v\n%s", err, out)
	}
	dir := t.TempDir()
	sums, err := os.ReadFile(rel("SHA256SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	changed := filepath.Join(dir, "SHA256SUMS")
	if err := os.WriteFile(changed, bytes.Replace(sums, []byte("  "), []byte("  ./"), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := runErr("gpgv", "--keyring", keyring, rel("SHA256SUMS.asc"), changed); err == nil || !strings.Contains(out, "BAD signature") {
		t.Errorf("gpgv accepted a changed SHA256SUMS (%v):\n%s", err, out)
	}

	chart := rel("extractedprism-SEMVER.tgz")
	if out, err := runErr(*helmBin, "verify", "--keyring", keyring, chart); err != nil {
		t.Errorf("helm verify: %v\n%s", err, out)
	} else {
		t.Logf("helm verify: %s", strings.TrimSpace(out))
	}
	// The same chart, one value changed, packed again next to the original provenance file.
	src := filepath.Join(dir, "src")
	untar(t, chart, src)
	values := filepath.Join(src, "extractedprism", "values.yaml")
	b, err := os.ReadFile(values)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(values, bytes.Replace(b, []byte("bindPort: 7445"), []byte("bindPort: 7444"), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	forged := filepath.Join(dir, "forged")
	run(t, *helmBin, "package", filepath.Join(src, "extractedprism"), "--destination", forged)
	forgedChart := filepath.Join(forged, filepath.Base(chart))
	prov, err := os.ReadFile(chart + ".prov")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(forgedChart+".prov", prov, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := runErr(*helmBin, "verify", "--keyring", keyring, forgedChart); err == nil || !strings.Contains(out, "sha256 sum does not match") {
		t.Errorf("helm verify of a changed chart: %v, want a checksum mismatch:\n%s", err, out)
	}

	db := filepath.Join(dir, "rpmdb")
	run(t, "rpmkeys", "--dbpath", db, "--import", filepath.Join(*repoDir, "yum", "RPM-GPG-KEY-extractedprism"))
	for _, rpm := range []string{"extractedprism-SEMVER-1.x86_64.rpm", "extractedprism-SEMVER-1.aarch64.rpm"} {
		if out := run(t, "rpmkeys", "--dbpath", db, "--checksig", rel(rpm)); !strings.Contains(out, "signatures OK") {
			t.Errorf("rpmkeys --checksig %s: %s", rpm, out)
		}
	}
}

type sbomDoc struct {
	Metadata struct {
		Component struct {
			Name    string `json:"name"`
			Version string `json:"version"`
		} `json:"component"`
	} `json:"metadata"`
	Components []struct {
		Name    string `json:"name"`
		Version string `json:"version"`
		Purl    string `json:"purl"`
	} `json:"components"`
}

func readSBOM(t *testing.T, path string) sbomDoc {
	t.Helper()
	var doc sbomDoc
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return doc
}

func sbomFiles(t *testing.T) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(*releaseDir, "*.sbom.cdx.json"))
	if len(m) != 4 {
		t.Fatalf("want 4 SBOMs (binary and image, amd64 and arm64), found %q", m)
	}
	return m
}

// TestSBOMListsEveryModule: every module `go version -m` finds in a binary
// (its dependencies, with versions) is a component of that binary's SBOM
// and of the image's.
func TestSBOMListsEveryModule(t *testing.T) {
	for _, arch := range []string{"amd64", "arm64"} {
		dir := t.TempDir()
		untar(t, rel("extractedprism-VERSION-linux-"+arch+".tar.gz"), dir)
		bin := filepath.Join(dir, "extractedprism-"+*version+"-linux-"+arch, "extractedprism")
		var mods []string
		for _, l := range strings.Split(run(t, "go", "version", "-m", bin), "\n") {
			f := strings.Fields(l)
			if len(f) >= 3 && f[0] == "dep" {
				mods = append(mods, f[1]+"@"+f[2])
			}
			if len(f) >= 3 && f[0] == "=>" { // a replacement: the module actually built in
				mods[len(mods)-1] = f[1] + "@" + f[2]
			}
		}
		if len(mods) < 20 {
			t.Fatalf("go version -m %s lists %d modules; want the daemon's dependencies", bin, len(mods))
		}
		for _, sbom := range []string{"extractedprism-VERSION-linux-" + arch + ".sbom.cdx.json", "extractedprism-VERSION-image-linux-" + arch + ".sbom.cdx.json"} {
			doc := readSBOM(t, rel(sbom))
			have := map[string]bool{}
			for _, c := range doc.Components {
				have[c.Name+"@"+c.Version] = true
			}
			var missing []string
			for _, m := range mods {
				if !have[m] {
					missing = append(missing, m)
				}
			}
			if len(missing) > 0 {
				t.Errorf("%s lacks %d of the %d modules of the binary: %q", sbom, len(missing), len(mods), missing)
			}
			if doc.Metadata.Component.Name != "github.com/extractedprism/extractedprism" {
				t.Errorf("%s describes %q, want the extractedprism module", sbom, doc.Metadata.Component.Name)
			}
			t.Logf("%s: %d components, all %d modules of go version -m", filepath.Base(rel(sbom)), len(doc.Components), len(mods))
		}
	}
}
