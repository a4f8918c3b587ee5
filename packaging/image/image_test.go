package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// maxCompressedLayer bounds the image size (the daemon is one static binary).
const maxCompressedLayer = 40 << 20

// wantFiles is the whole file tree of the image: no shell, no package manager.
var wantFiles = []string{
	"etc/", "etc/extractedprism/", "etc/group", "etc/passwd",
	"usr/", "usr/bin/", "usr/bin/extractedprism",
	"var/", "var/lib/", "var/lib/extractedprism/",
}

// extract unpacks an OCI archive into a temporary directory.
func extract(t *testing.T, archive string) string {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	dir := t.TempDir()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read %s: %v", archive, err)
		}
		target := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(target, dir+string(os.PathSeparator)) {
			t.Fatalf("archive entry %q escapes the layout", h.Name)
		}
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(target, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(target)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, tr); err != nil {
			t.Fatal(err)
		}
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// imageFiles reads the single layer of img: names and file contents.
func imageFiles(t *testing.T, img v1.Image) ([]string, map[string][]byte, map[string]*tar.Header) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("image has %d layers, want 1 (no base image)", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = rc.Close() }()
	var names []string
	bodies := map[string][]byte{}
	headers := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		headers[h.Name] = h
		if h.Typeflag == tar.TypeReg {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			bodies[h.Name] = b
		}
	}
	sort.Strings(names)
	return names, bodies, headers
}

// inspect checks everything a user of the archive relies on and returns the
// binary found per platform.
func inspect(t *testing.T, archive string, platforms []string, epoch time.Time) map[string][]byte {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(extract(t, archive))
	if err != nil {
		t.Fatalf("%s is not an OCI layout archive: %v", archive, err)
	}
	top, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(top.Manifests) != 1 || top.Manifests[0].Annotations["org.opencontainers.image.ref.name"] == "" {
		t.Fatalf("index.json should name one image with a ref.name annotation: %+v", top.Manifests)
	}
	inner, err := idx.ImageIndex(top.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := inner.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string][]byte{}
	for _, d := range im.Manifests {
		if d.Platform == nil {
			t.Fatalf("manifest %s has no platform", d.Digest)
		}
		platform := d.Platform.OS + "/" + d.Platform.Architecture
		img, err := inner.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(cfg.Config.Entrypoint, " "); got != BinaryPath {
			t.Errorf("%s: entrypoint %q, want %q", platform, got, BinaryPath)
		}
		if len(cfg.Config.Cmd) != 0 {
			t.Errorf("%s: cmd %q, want none (flags come from the pod spec)", platform, cfg.Config.Cmd)
		}
		if cfg.Config.User != User {
			t.Errorf("%s: user %q, want %q", platform, cfg.Config.User, User)
		}
		if cfg.OS != d.Platform.OS || cfg.Architecture != d.Platform.Architecture {
			t.Errorf("%s: config says %s/%s", platform, cfg.OS, cfg.Architecture)
		}
		if !cfg.Created.Equal(epoch) {
			t.Errorf("%s: created %v, want %v", platform, cfg.Created.Time, epoch)
		}
		names, bodies, headers := imageFiles(t, img)
		if strings.Join(names, " ") != strings.Join(wantFiles, " ") {
			t.Errorf("%s: files %q, want exactly %q", platform, names, wantFiles)
		}
		for _, n := range names {
			if strings.HasSuffix(n, "/sh") || strings.HasPrefix(n, "bin/") {
				t.Errorf("%s: image contains %s", platform, n)
			}
			if !headers[n].ModTime.Equal(epoch) {
				t.Errorf("%s: %s has time %v, want %v", platform, n, headers[n].ModTime, epoch)
			}
		}
		if h := headers["var/lib/extractedprism/"]; h == nil || h.Uid != 65534 {
			t.Errorf("%s: /var/lib/extractedprism is not owned by 65534", platform)
		}
		if !bytes.Contains(bodies["etc/passwd"], []byte("nobody:x:65534:65534:")) {
			t.Errorf("%s: /etc/passwd does not name UID 65534", platform)
		}
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		size, err := layers[0].Size()
		if err != nil {
			t.Fatal(err)
		}
		if size > maxCompressedLayer {
			t.Errorf("%s: compressed layer is %d bytes, limit %d", platform, size, maxCompressedLayer)
		}
		t.Logf("%s: compressed layer %.1f MiB, binary %.1f MiB", platform,
			float64(size)/(1<<20), float64(len(bodies["usr/bin/extractedprism"]))/(1<<20))
		found[platform] = bodies["usr/bin/extractedprism"]
	}
	var got []string
	for p := range found {
		got = append(got, p)
	}
	sort.Strings(got)
	sort.Strings(platforms)
	if strings.Join(got, " ") != strings.Join(platforms, " ") {
		t.Errorf("platforms %q, want %q", got, platforms)
	}
	return found
}

func fakeBinaries(t *testing.T) map[string]string {
	t.Helper()
	dir := t.TempDir()
	bins := map[string]string{}
	for _, p := range []string{"linux/amd64", "linux/arm64"} {
		path := filepath.Join(dir, strings.ReplaceAll(p, "/", "-"))
		if err := os.WriteFile(path, []byte("binary for "+p), 0o755); err != nil {
			t.Fatal(err)
		}
		bins[p] = path
	}
	return bins
}

func sum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func TestBuildIsReproducible(t *testing.T) {
	bins := fakeBinaries(t)
	opts := Options{Binaries: bins, Ref: "example.com/ep:v1", Version: "v1", Revision: "abc", Epoch: time.Unix(1700000000, 0).UTC()}
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.tar"), filepath.Join(dir, "b.tar")
	if err := WriteArchive(a, opts); err != nil {
		t.Fatal(err)
	}
	if err := WriteArchive(b, opts); err != nil {
		t.Fatal(err)
	}
	if sum(t, a) != sum(t, b) {
		t.Fatal("two builds of the same inputs differ")
	}
	opts.Epoch = opts.Epoch.Add(time.Second)
	c := filepath.Join(dir, "c.tar")
	if err := WriteArchive(c, opts); err != nil {
		t.Fatal(err)
	}
	if sum(t, a) == sum(t, c) {
		t.Fatal("a different epoch gave the same archive")
	}
	found := inspect(t, a, []string{"linux/amd64", "linux/arm64"}, time.Unix(1700000000, 0).UTC())
	for p, body := range found {
		if string(body) != "binary for "+p {
			t.Errorf("%s: layer holds %q", p, body)
		}
	}
}

func TestBuildRejectsBadInput(t *testing.T) {
	if _, err := Build(Options{}); err == nil {
		t.Error("Build without binaries succeeded")
	}
	_, err := Build(Options{Binaries: map[string]string{"linux/amd64": filepath.Join(t.TempDir(), "missing")}})
	if err == nil || !strings.Contains(err.Error(), "binary for linux/amd64") {
		t.Errorf("Build with a missing binary: %v", err)
	}
	var b binaryFlag = map[string]string{}
	if err := b.Set("amd64"); err == nil {
		t.Error("-binary without os/arch=path accepted")
	}
}

// TestContainerfileMatchesBuilder keeps packaging/Containerfile and this
// builder in agreement on the entrypoint and the user.
func TestContainerfileMatchesBuilder(t *testing.T) {
	f, err := os.Open("../Containerfile")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	var user, entrypoint string
	var final bool
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "FROM "):
			final = strings.HasPrefix(line, "FROM scratch")
		case final && strings.HasPrefix(line, "USER "):
			user = strings.TrimSpace(strings.TrimPrefix(line, "USER "))
		case final && strings.HasPrefix(line, "ENTRYPOINT "):
			entrypoint = strings.TrimSpace(strings.TrimPrefix(line, "ENTRYPOINT "))
		}
	}
	if user != User {
		t.Errorf("Containerfile USER %q, builder %q", user, User)
	}
	if entrypoint != `["`+BinaryPath+`"]` {
		t.Errorf("Containerfile ENTRYPOINT %s, builder %q", entrypoint, BinaryPath)
	}
}

// TestImageArchive inspects the archive `make image` built from the real
// daemon (IMAGE_TAR), including that each binary is a static executable for
// its platform and is the one that was built.
func TestImageArchive(t *testing.T) {
	archive := os.Getenv("IMAGE_TAR")
	if archive == "" {
		t.Skip("IMAGE_TAR not set: run `make image-test`")
	}
	arches := strings.Fields(os.Getenv("IMAGE_ARCHES"))
	var platforms []string
	for _, a := range arches {
		platforms = append(platforms, "linux/"+a)
	}
	hdr, err := readEpoch(archive)
	if err != nil {
		t.Fatal(err)
	}
	found := inspect(t, archive, platforms, hdr)
	machines := map[string]elf.Machine{"linux/amd64": elf.EM_X86_64, "linux/arm64": elf.EM_AARCH64}
	for p, body := range found {
		ef, err := elf.NewFile(bytes.NewReader(body))
		if err != nil {
			t.Errorf("%s: binary is not ELF: %v", p, err)
			continue
		}
		if want, ok := machines[p]; ok && ef.Machine != want {
			t.Errorf("%s: binary is for %v", p, ef.Machine)
		}
		for _, prog := range ef.Progs {
			if prog.Type == elf.PT_INTERP {
				t.Errorf("%s: binary is dynamically linked (has an interpreter)", p)
			}
		}
		if dir := os.Getenv("IMAGE_BINARY_DIR"); dir != "" {
			want, err := os.ReadFile(filepath.Join(dir, "extractedprism-"+strings.ReplaceAll(p, "/", "-")))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(want, body) {
				t.Errorf("%s: the image holds another binary than the one built", p)
			}
		}
	}
}

// readEpoch returns the time stamp of the archive's first entry, which the
// builder sets to the image epoch.
func readEpoch(archive string) (time.Time, error) {
	f, err := os.Open(archive)
	if err != nil {
		return time.Time{}, err
	}
	defer func() { _ = f.Close() }()
	h, err := tar.NewReader(f).Next()
	if err != nil {
		return time.Time{}, err
	}
	return h.ModTime.UTC(), nil
}
