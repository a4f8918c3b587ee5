//go:build releasetest

package release_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

var rpmArch = map[string]string{"amd64": "x86_64", "arm64": "aarch64"}

// dnfInstall installs extractedprism from the yum repository at repo into
// a new, empty root, with the lines docs/install.md gives a user
// (gpgcheck=1, repo_gpgcheck=1, gpgkey=), and returns dnf's output, its
// error, and whether the package ended up installed. Scriptlets are not
// run: the root has no shell and no systemd.
func dnfInstall(t *testing.T, repo string) (string, error, bool) {
	t.Helper()
	root := t.TempDir()
	reposDir := filepath.Join(root, "etc/yum.repos.d")
	if err := os.MkdirAll(reposDir, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`[extractedprism]
name=extractedprism
baseurl=file://%s
enabled=1
gpgcheck=1
repo_gpgcheck=1
gpgkey=file://%s/RPM-GPG-KEY-extractedprism
`, repo, repo)
	if err := os.WriteFile(filepath.Join(reposDir, "extractedprism.repo"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("dnf", "-y", "--installroot="+root, "--setopt=reposdir="+reposDir,
		"--setopt=cachedir="+filepath.Join(root, "var/cache/dnf"), "--releasever=1",
		"--forcearch="+rpmArch[runtime.GOARCH], "--setopt=tsflags=noscripts", "--nodocs",
		"install", "extractedprism")
	out, err := cmd.CombinedOutput()
	q, qerr := exec.Command("rpm", "--root", root, "-q", "extractedprism").CombinedOutput()
	installed := qerr == nil && strings.HasPrefix(string(q), "extractedprism-"+pkgVersion()+"-1.")
	_, statErr := os.Stat(filepath.Join(root, "usr/bin/extractedprism"))
	return string(out), err, installed || statErr == nil
}

// copyDir copies a directory tree (regular files only).
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if out, err := exec.Command("cp", "-a", src+"/.", dst).CombinedOutput(); err != nil {
		t.Fatalf("cp -a %s %s: %v\n%s", src, dst, err, out)
	}
}

// signer signs files with the release key, as an attacker who rebuilt the
// repository metadata could not.
func signer(t *testing.T) func(file string) {
	t.Helper()
	if *keyFile == "" || *passFile == "" {
		t.Fatal("-key and -passphrase are required to sign a tampered repository")
	}
	home := t.TempDir()
	gpg := func(args ...string) {
		t.Helper()
		full := append([]string{"--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase-file", *passFile}, args...)
		if out, err := exec.Command("gpg", full...).CombinedOutput(); err != nil {
			t.Fatalf("gpg %v: %v\n%s", args, err, out)
		}
	}
	gpg("--import", *keyFile)
	t.Cleanup(func() { _ = exec.Command("gpgconf", "--homedir", home, "--kill", "gpg-agent").Run() })
	return func(file string) {
		_ = os.Remove(file + ".asc")
		gpg("--armor", "--detach-sign", "--output", file+".asc", file)
	}
}

// flipByte changes one byte near the end of a file (inside an rpm's payload).
func flipByte(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-100] ^= 0xff
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestYumRepository(t *testing.T) {
	good := filepath.Join(*repoDir, "yum")
	out, err, installed := dnfInstall(t, good)
	if err != nil || !installed {
		t.Fatalf("dnf install from %s: %v, installed %v\n%s", good, err, installed, out)
	}
	t.Logf("signed repository: installed")

	rpmName := "extractedprism-" + pkgVersion() + "-1." + rpmArch[runtime.GOARCH] + ".rpm"
	cases := []struct {
		name   string
		tamper func(t *testing.T, repo string)
		want   []string // any of these in dnf's output
	}{
		{
			name: "rpm changed after the metadata was made",
			tamper: func(t *testing.T, repo string) {
				flipByte(t, filepath.Join(repo, "Packages", rpmName))
			},
			want: []string{"has incorrect checksum"},
		},
		{
			name: "rpm changed and metadata made again and signed with the release key",
			tamper: func(t *testing.T, repo string) {
				flipByte(t, filepath.Join(repo, "Packages", rpmName))
				if out, err := exec.Command("createrepo_c", "--quiet", "--update", repo).CombinedOutput(); err != nil {
					t.Fatalf("createrepo_c: %v\n%s", err, out)
				}
				signer(t)(filepath.Join(repo, "repodata", "repomd.xml"))
			},
			want: []string{"GPG check FAILED"},
		},
		{
			name: "unsigned repository metadata",
			tamper: func(t *testing.T, repo string) {
				if err := os.Remove(filepath.Join(repo, "repodata", "repomd.xml.asc")); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"GPG verification is enabled, but GPG signature is not available"},
		},
		{
			name: "repository metadata changed after signing",
			tamper: func(t *testing.T, repo string) {
				if out, err := exec.Command("createrepo_c", "--quiet", "--update", "--revision", "tampered", repo).CombinedOutput(); err != nil {
					t.Fatalf("createrepo_c: %v\n%s", err, out)
				}
			},
			want: []string{"repomd.xml GPG signature verification error: Bad GPG signature"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			repo := t.TempDir()
			copyDir(t, good, repo)
			c.tamper(t, repo)
			out, err, installed := dnfInstall(t, repo)
			if err == nil || installed {
				t.Fatalf("dnf install from a repository with %s: error %v, installed %v; want a refusal and nothing installed:\n%s",
					c.name, err, installed, out)
			}
			matched := ""
			for _, w := range c.want {
				if strings.Contains(out, w) {
					matched = w
					break
				}
			}
			if matched == "" {
				t.Errorf("dnf refused, but its output names none of %q:\n%s", c.want, out)
			}
			t.Logf("refused (%q), nothing installed: %s", matched, lastLines(out, 3))
		})
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, " | ")
}
