//go:build systemdtest

package systemd_test

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// make release-test sets these: the folder holding the throwaway key, the
// release of -release-version published into repo/, and the release of
// -release-next built into next/ but not yet published.
var (
	releaseTest    = flag.String("release-test", "", "release-test folder (key/, release/, next/, repo/); empty skips TestReleaseRepositories")
	releaseVersion = flag.String("release-version", "", "version published into the repository")
	releaseNext    = flag.String("release-next", "", "version the test publishes into the same repository, then upgrades to")
)

// The lines docs/install.md gives a user, with the repository at file:///repo.
const (
	aptKeyring = "/etc/apt/keyrings/extractedprism.gpg"
	aptList    = "/etc/apt/sources.list.d/extractedprism.list"
)

func aptSource(url string) string {
	return "deb [signed-by=" + aptKeyring + "] " + url + " stable main\n"
}

// TestReleaseRepositories installs extractedprism from the signed apt
// repository of a release into a Debian system booted with systemd, the way
// docs/install.md tells a user to; starts it with a configuration and gets
// an answer through it; publishes the next release into the same
// repository and upgrades under a client loop without a refused connect.
// Before that, repositories whose Packages index, package file or
// signature were changed after signing must be refused with nothing
// installed.
func TestReleaseRepositories(t *testing.T) {
	if *releaseTest == "" {
		t.Skip("run by make release-test (needs -release-test)")
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root (systemd-nspawn)")
	}
	repo, err := filepath.Abs(*repoDir)
	if err != nil {
		t.Fatal(err)
	}
	if *standinBin == "" {
		*standinBin = filepath.Join(repo, "bin/standin")
	}
	pub := filepath.Join(*releaseTest, "repo")
	pkgVer := func(v string) string { return strings.Replace(strings.TrimPrefix(v, "v"), "-", "~", 1) + "-1" }

	// Tampered copies of the repository, each changed after signing.
	tampered := t.TempDir()
	if err := os.Chmod(tampered, 0o755); err != nil {
		t.Fatal(err)
	}
	variant := func(name string, change func(dir string)) {
		dir := filepath.Join(tampered, name)
		if out, err := exec.Command("cp", "-a", filepath.Join(pub, "apt"), dir).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v\n%s", err, out)
		}
		change(dir)
	}
	hostArchDeb := func(dir string) string {
		m, _ := filepath.Glob(filepath.Join(dir, "pool/main/e/extractedprism/extractedprism_"+pkgVer(*releaseVersion)+"_"+debArch[runtime.GOARCH]+".deb"))
		if len(m) != 1 {
			t.Fatalf("no %s .deb for %s in %s", *releaseVersion, runtime.GOARCH, dir)
		}
		return m[0]
	}
	variant("packages", func(dir string) {
		// An index that points at another package, compressed as apt fetches it.
		p := filepath.Join(dir, "dists/stable/main/binary-"+debArch[runtime.GOARCH]+"/Packages")
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b = []byte(strings.Replace(string(b), "Version: "+pkgVer(*releaseVersion), "Version: "+pkgVer(*releaseVersion)+"+evil", 1))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("sh", "-c", `gzip -9nc "$1" > "$1.gz"`, "sh", p).CombinedOutput(); err != nil {
			t.Fatalf("gzip: %v\n%s", err, out)
		}
	})
	variant("deb", func(dir string) {
		p := hostArchDeb(dir)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)-100] ^= 0xff
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	})
	variant("unsigned", func(dir string) {
		for _, f := range []string{"InRelease", "Release.gpg"} {
			if err := os.Remove(filepath.Join(dir, "dists/stable", f)); err != nil {
				t.Fatal(err)
			}
		}
	})

	a := startStandin(t, *standinBin, "a")
	b := startStandin(t, *standinBin, "b")
	rootfs := ensureRootfs(t, filepath.Join(repo, ".cache/systemd-test"))
	step(t, "boot %s with the repository at /repo and tampered copies at /pkgs", rootfs)
	c := bootContainer(t, rootfs, tampered, pub+":/repo")
	e := &env{t: t, c: c, http: &http.Client{Timeout: 10 * time.Second}, proxyPort: freePort(t), adminPort: freePort(t)}
	e.proxy = fmt.Sprintf("127.0.0.1:%d", e.proxyPort)
	e.admin = fmt.Sprintf("127.0.0.1:%d", e.adminPort)

	// Only our repository: the container has no network access to Debian's.
	c.must("rm", "-f", "/etc/apt/sources.list")
	c.must("install", "-d", "-m", "0755", "/etc/apt/keyrings")
	c.must("cp", "/repo/extractedprism-archive-keyring.gpg", aptKeyring)
	notInstalled := func(what string) {
		t.Helper()
		if out, err := c.exec(time.Minute, "dpkg-query", "-W", "-f", "${Status}", "extractedprism"); err == nil && strings.Contains(out, "installed") {
			t.Fatalf("%s: extractedprism is installed (%s)", what, out)
		}
		if _, err := c.exec(time.Minute, "test", "-e", "/usr/bin/extractedprism"); err == nil {
			t.Fatalf("%s: /usr/bin/extractedprism exists", what)
		}
	}
	refused := []struct {
		name, dir  string
		updateFail bool
		want       string
	}{
		{"Packages changed after signing", "packages", true, "Hash Sum mismatch"},
		{"package file changed after signing", "deb", false, "Hash Sum mismatch"},
		{"repository without signature", "unsigned", true, "is not signed"},
	}
	for _, r := range refused {
		step(t, "apt from a repository with its %s", r.name)
		c.writeFile(aptList, aptSource("file:///pkgs/"+r.dir))
		upOut, upErr := c.exec(3*time.Minute, "apt-get", "update")
		inOut, inErr := c.exec(3*time.Minute, "apt-get", "install", "-y", "-q", "extractedprism")
		if inErr == nil {
			t.Fatalf("apt-get install from a repository with its %s succeeded:\n%s", r.name, inOut)
		}
		if (upErr != nil) != r.updateFail {
			t.Errorf("apt-get update with its %s: error %v, want failure %v", r.name, upErr, r.updateFail)
		}
		all := fmt.Sprint(upOut, upErr, inOut, inErr)
		if !strings.Contains(all, r.want) {
			t.Errorf("apt with its %s: output lacks %q:\n%s", r.name, r.want, all)
		}
		notInstalled(r.name)
		t.Logf("RESULT %s: refused (%q), nothing installed", r.name, r.want)
	}

	step(t, "apt-get update && apt-get install extractedprism from the signed repository")
	c.writeFile(aptList, aptSource("file:///repo/apt"))
	c.must("apt-get", "update")
	c.must("apt-get", "install", "-y", "-q", "extractedprism")
	if got := strings.TrimSpace(c.must("dpkg-query", "-W", "-f", "${Version}", "extractedprism")); got != pkgVer(*releaseVersion) {
		t.Fatalf("installed version %q, want %s", got, pkgVer(*releaseVersion))
	}
	if out := c.must("extractedprism", "version"); !strings.HasPrefix(out, "extractedprism "+*releaseVersion+" ") {
		t.Errorf("extractedprism version = %q, want %s", out, *releaseVersion)
	}
	c.writeFile("/etc/extractedprism/config.yaml", e.config(a, b))
	c.writeFile("/etc/systemd/system/extractedprism.socket.d/ports.conf", fmt.Sprintf(
		"[Socket]\nListenStream=\nListenStream=%s\nListenStream=%s\n", e.proxy, e.admin))
	c.must("systemctl", "daemon-reload")
	c.must("systemctl", "start", "extractedprism")
	if code, err := e.readyz(); err != nil || code != http.StatusOK {
		t.Fatalf("after systemctl start: /readyz = %d, %v; want 200", code, err)
	}
	name, err := requestThrough(context.Background(), e.proxy)
	if err != nil || (name != "a" && name != "b") {
		t.Fatalf("request through %s: %q, %v; want an answer from a or b", e.proxy, name, err)
	}
	t.Logf("RESULT installed %s from the apt repository; %s answered through %s", *releaseVersion, name, e.proxy)

	step(t, "publish %s into the same repository, apt-get upgrade under a client loop", *releaseNext)
	publish := exec.Command("make", "--no-print-directory", "release-publish", "VERSION="+*releaseNext,
		"RELEASE_DIR="+filepath.Join(*releaseTest, "next"), "REPO_DIR="+pub,
		"RELEASE_GPG_KEY_FILE="+filepath.Join(*releaseTest, "key/secret.asc"),
		"RELEASE_GPG_PASSPHRASE_FILE="+filepath.Join(*releaseTest, "key/passphrase"))
	publish.Dir = repo
	if out, err := publish.CombinedOutput(); err != nil {
		t.Fatalf("make release-publish %s: %v\n%s", *releaseNext, err, out)
	}
	l := startLoad(e.proxy, 4)
	if err := l.waitOK(40, 60*time.Second); err != nil {
		t.Fatalf("client loop before the upgrade: %v: %v", err, l.stop())
	}
	before := e.mainPID()
	c.must("apt-get", "update")
	c.must("apt-get", "upgrade", "-y", "-q")
	err = l.waitOK(100, 60*time.Second)
	res := l.stop()
	if err != nil {
		t.Fatalf("client loop after the upgrade: %v: %v", err, res)
	}
	if got := strings.TrimSpace(c.must("dpkg-query", "-W", "-f", "${Version}", "extractedprism")); got != pkgVer(*releaseNext) {
		t.Fatalf("after apt-get upgrade the installed version is %q, want %s", got, pkgVer(*releaseNext))
	}
	if after := e.mainPID(); after == before {
		t.Errorf("the upgrade did not restart the daemon (main pid still %s)", before)
	}
	if doc, err := e.status(); err != nil || doc.Version != *releaseNext {
		t.Errorf("after the upgrade /status says version %q (%v), want %s", doc.Version, err, *releaseNext)
	}
	t.Logf("RESULT apt-get upgrade %s -> %s: %v", *releaseVersion, *releaseNext, res)
	if res.Refused != 0 || res.Other != 0 {
		t.Errorf("apt-get upgrade: %d connects refused and %d other failures; want none: %v", res.Refused, res.Other, res)
	}
}
