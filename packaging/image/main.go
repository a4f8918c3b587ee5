// Command image builds the extractedprism container image as an OCI image
// archive (an OCI image layout in a tar file, as `skopeo copy
// oci-archive:...`, `podman load` and `ctr images import` read it) from
// static binaries built beforehand, one per platform. The image has no base:
// its single layer holds the binary, an /etc/passwd and /etc/group naming
// UID/GID 65534, and the two directories the daemon uses. Nothing is
// downloaded. Every time stamp is the given epoch and every list is sorted,
// so the same inputs give the same bytes.
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Paths and identity inside the image; packaging/Containerfile uses the same.
const (
	BinaryPath = "/usr/bin/extractedprism"
	User       = "65534:65534"
	uid        = 65534
)

// Options says what to build.
type Options struct {
	// Binaries maps a platform ("linux/amd64") to the static binary for it.
	Binaries map[string]string
	// Ref is the image reference recorded in the archive (registry/repo:tag).
	Ref string
	// Version and Revision go into the OCI labels.
	Version  string
	Revision string
	// Source is the source repository URL label.
	Source string
	// Epoch is the time stamp of every file, the config and the history.
	Epoch time.Time
}

type binaryFlag map[string]string

func (b binaryFlag) String() string { return fmt.Sprint(map[string]string(b)) }

func (b binaryFlag) Set(v string) error {
	platform, path, ok := strings.Cut(v, "=")
	if !ok || !strings.Contains(platform, "/") || path == "" {
		return fmt.Errorf("-binary %q: want os/arch=path", v)
	}
	b[platform] = path
	return nil
}

func main() {
	bins := binaryFlag{}
	opts := Options{}
	out := flag.String("out", "", "output OCI archive (.tar)")
	epoch := flag.Int64("epoch", 0, "time stamp of every file and of the image, in Unix seconds")
	flag.Var(bins, "binary", "os/arch=path of a static binary (repeat per platform)")
	flag.StringVar(&opts.Ref, "ref", "ghcr.io/extractedprism/extractedprism:dev", "image reference recorded in the archive")
	flag.StringVar(&opts.Version, "version", "dev", "version label")
	flag.StringVar(&opts.Revision, "revision", "unknown", "source revision label")
	flag.StringVar(&opts.Source, "source", "https://github.com/extractedprism/extractedprism", "source repository label")
	flag.Parse()
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts.Binaries = bins
	opts.Epoch = time.Unix(*epoch, 0).UTC()
	if err := WriteArchive(*out, opts); err != nil {
		logger.Error("build image", "err", err)
		os.Exit(1)
	}
	info, err := os.Stat(*out)
	if err != nil {
		logger.Error("build image", "err", err)
		os.Exit(1)
	}
	logger.Info("image archive written", "path", *out, "bytes", info.Size(), "ref", opts.Ref)
}

// WriteArchive builds the image index and writes it as an OCI archive to out.
func WriteArchive(out string, opts Options) error {
	if out == "" {
		return errors.New("output path is empty")
	}
	idx, err := Build(opts)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "oci-layout-")
	if err != nil {
		return fmt.Errorf("temporary layout directory: %w", err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("create OCI layout: %w", err)
	}
	tag := opts.Ref
	if i := strings.LastIndex(tag, ":"); i > strings.LastIndex(tag, "/") {
		tag = tag[i+1:]
	}
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": tag,
		"io.containerd.image.name":          opts.Ref,
	})); err != nil {
		return fmt.Errorf("write OCI layout: %w", err)
	}
	if err := tarDir(dir, out, opts.Epoch); err != nil {
		return err
	}
	return nil
}

// Build returns the multi-platform image index.
func Build(opts Options) (v1.ImageIndex, error) {
	if len(opts.Binaries) == 0 {
		return nil, errors.New("no binaries: give -binary os/arch=path")
	}
	platforms := make([]string, 0, len(opts.Binaries))
	for p := range opts.Binaries {
		platforms = append(platforms, p)
	}
	sort.Strings(platforms)
	var idx v1.ImageIndex = empty.Index
	idx = mutate.IndexMediaType(idx, types.OCIImageIndex)
	for _, p := range platforms {
		img, platform, err := buildImage(p, opts.Binaries[p], opts)
		if err != nil {
			return nil, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: platform},
		})
	}
	return idx, nil
}

func buildImage(platform, binary string, opts Options) (v1.Image, *v1.Platform, error) {
	osName, arch, _ := strings.Cut(platform, "/")
	p := &v1.Platform{OS: osName, Architecture: arch}
	if arch == "arm64" {
		p.Variant = "v8"
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return nil, nil, fmt.Errorf("binary for %s: %w", platform, err)
	}
	layerTar, err := rootFS(bin, opts.Epoch)
	if err != nil {
		return nil, nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, nil, fmt.Errorf("layer for %s: %w", platform, err)
	}
	created := v1.Time{Time: opts.Epoch}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   created,
			CreatedBy: "extractedprism image builder: static binary " + BinaryPath,
			Comment:   "no base image",
		},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("append layer for %s: %w", platform, err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, nil, fmt.Errorf("config for %s: %w", platform, err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS = p.OS
	cfg.Architecture = p.Architecture
	cfg.Variant = p.Variant
	cfg.Created = created
	cfg.Author = "extractedprism"
	cfg.Config = v1.Config{
		Entrypoint: []string{BinaryPath},
		User:       User,
		WorkingDir: "/",
		ExposedPorts: map[string]struct{}{
			"7445/tcp": {},
			"7446/tcp": {},
		},
		Labels: map[string]string{
			"org.opencontainers.image.title":       "extractedprism",
			"org.opencontainers.image.description": "Per-node TCP load balancer for the Kubernetes API server",
			"org.opencontainers.image.version":     opts.Version,
			"org.opencontainers.image.revision":    opts.Revision,
			"org.opencontainers.image.source":      opts.Source,
			"org.opencontainers.image.created":     opts.Epoch.Format(time.RFC3339),
		},
	}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("set config for %s: %w", platform, err)
	}
	return img, p, nil
}

// entry is one file or directory of the root file system.
type entry struct {
	name string
	mode int64
	id   int
	body []byte
	dir  bool
}

// rootFS returns the uncompressed layer: the binary and the few files a
// non-root static program needs.
func rootFS(binary []byte, epoch time.Time) ([]byte, error) {
	entries := []entry{
		{name: "etc/", mode: 0o755, dir: true},
		{name: "etc/extractedprism/", mode: 0o755, dir: true},
		{name: "etc/group", mode: 0o644, body: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{name: "etc/passwd", mode: 0o644, body: []byte(
			"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")},
		{name: "usr/", mode: 0o755, dir: true},
		{name: "usr/bin/", mode: 0o755, dir: true},
		{name: strings.TrimPrefix(BinaryPath, "/"), mode: 0o755, body: binary},
		{name: "var/", mode: 0o755, dir: true},
		{name: "var/lib/", mode: 0o755, dir: true},
		{name: "var/lib/extractedprism/", mode: 0o750, id: uid, dir: true},
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name,
			Mode:    e.mode,
			Uid:     e.id,
			Gid:     e.id,
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		if e.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", e.name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close layer: %w", err)
	}
	return buf.Bytes(), nil
}

// tarDir writes the directory tree at dir as a tar file with sorted names,
// fixed owners and the given time stamp.
func tarDir(dir, out string, epoch time.Time) (err error) {
	var names []string
	if err := filepath.WalkDir(dir, func(path string, _ os.DirEntry, werr error) error {
		if werr != nil {
			return werr
		}
		if path != dir {
			names = append(names, path)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("walk layout: %w", err)
	}
	sort.Strings(names)
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return fmt.Errorf("output directory: %w", err)
	}
	tmp := out + ".tmp." + strconv.Itoa(os.Getpid())
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("create archive: %w", err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	tw := tar.NewWriter(f)
	for _, path := range names {
		info, err := os.Lstat(path)
		if err != nil {
			return fmt.Errorf("stat %s: %w", path, err)
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return fmt.Errorf("relative path of %s: %w", path, err)
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: epoch, Format: tar.FormatPAX}
		if info.IsDir() {
			h.Typeflag, h.Mode, h.Name = tar.TypeDir, 0o755, h.Name+"/"
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("archive %s: %w", rel, err)
			}
			continue
		}
		h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, info.Size()
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("archive %s: %w", rel, err)
		}
		if err := copyFile(tw, path); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("close archive: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close archive: %w", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("move archive into place: %w", err)
	}
	return nil
}

func copyFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	if _, err := io.Copy(w, f); err != nil {
		return fmt.Errorf("copy %s: %w", path, err)
	}
	return nil
}
