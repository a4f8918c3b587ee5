//go:build packaging

// Package packaging_test checks the built deb and rpm packages with dpkg and
// rpm: contents, metadata, and the maintainer scripts run for real against
// throwaway roots. Run by make package-test.
package packaging_test

import (
	"bytes"
	"debug/elf"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	flag.Parse()
	goleak.VerifyTestMain(m)
}

var distDir = flag.String("dist", "../dist", "directory holding the built .deb and .rpm files")

// shipped is every file the packages install, with its mode.
var shipped = map[string]string{
	"/usr/bin/extractedprism":                        "-rwxr-xr-x",
	"/usr/lib/systemd/system/extractedprism.service": "-rw-r--r--",
	"/usr/lib/systemd/system/extractedprism.socket":  "-rw-r--r--",
	"/etc/extractedprism/config.yaml":                "-rw-r--r--",
}

const confFile = "/etc/extractedprism/config.yaml"

var debArch = map[string]string{"amd64": "amd64", "arm64": "arm64"}
var rpmArch = map[string]string{"amd64": "x86_64", "arm64": "aarch64"}
var elfMachine = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// packageFile returns the single package of kind ("deb" or "rpm") for goarch.
func packageFile(t *testing.T, kind, goarch string) string {
	t.Helper()
	var pattern string
	if kind == "deb" {
		pattern = "extractedprism_*_" + debArch[goarch] + ".deb"
	} else {
		pattern = "extractedprism-*." + rpmArch[goarch] + ".rpm"
	}
	m, err := filepath.Glob(filepath.Join(*distDir, pattern))
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 {
		t.Fatalf("want exactly one %s in %s, found %q (run make packages)", pattern, *distDir, m)
	}
	return m[0]
}

// builtArches lists the architectures with packages in distDir; the host's must be there.
func builtArches(t *testing.T) []string {
	t.Helper()
	var arches []string
	for _, a := range []string{"amd64", "arm64"} {
		if m, _ := filepath.Glob(filepath.Join(*distDir, "extractedprism_*_"+debArch[a]+".deb")); len(m) > 0 {
			arches = append(arches, a)
		}
	}
	if !slices.Contains(arches, runtime.GOARCH) {
		t.Fatalf("no %s package in %s (run make packages)", runtime.GOARCH, *distDir)
	}
	return arches
}

var debListRE = regexp.MustCompile(`^(\S+) (\S+)\s+\d+ \S+ \S+ \.(/\S*)$`)

func TestDebContents(t *testing.T) {
	for _, arch := range builtArches(t) {
		t.Run(arch, func(t *testing.T) {
			deb := packageFile(t, "deb", arch)
			files := map[string]string{}
			for _, line := range strings.Split(strings.TrimSpace(run(t, "dpkg-deb", "-c", deb)), "\n") {
				m := debListRE.FindStringSubmatch(line)
				if m == nil {
					t.Fatalf("unexpected dpkg-deb -c line %q", line)
				}
				if m[2] != "root/root" {
					t.Errorf("%s owned by %s, want root/root", m[3], m[2])
				}
				if !strings.HasPrefix(m[1], "d") {
					files[m[3]] = m[1]
				}
			}
			for path, mode := range shipped {
				if files[path] != mode {
					t.Errorf("%s: %s has mode %q, want %q", filepath.Base(deb), path, files[path], mode)
				}
			}
			for path := range files {
				if _, ok := shipped[path]; !ok {
					t.Errorf("%s ships unexpected file %s", filepath.Base(deb), path)
				}
			}

			info := run(t, "dpkg-deb", "-I", deb)
			for _, want := range []string{
				"Package: extractedprism", "Architecture: " + debArch[arch],
				" postinst ", " prerm ", " postrm ",
			} {
				if !strings.Contains(info, want) {
					t.Errorf("dpkg-deb -I %s lacks %q:\n%s", filepath.Base(deb), want, info)
				}
			}
			if strings.Contains(info, "Depends:") {
				t.Errorf("dpkg-deb -I %s declares dependencies; the static binary and its unit need none:\n%s", filepath.Base(deb), info)
			}
			if got := run(t, "dpkg-deb", "-f", deb, "Version"); !regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*-1\n$`).MatchString(got) {
				t.Errorf("Version %q is not <upstream>-1 with a digit first", got)
			}
			dir := t.TempDir()
			run(t, "dpkg-deb", "-e", deb, dir)
			conffiles, err := os.ReadFile(filepath.Join(dir, "conffiles"))
			if err != nil || strings.TrimSpace(string(conffiles)) != confFile {
				t.Errorf("conffiles = %q (%v), want %s", conffiles, err, confFile)
			}
			for script, src := range map[string]string{"postinst": "postinstall.sh", "prerm": "preremove.sh", "postrm": "postremove.sh"} {
				got, err := os.ReadFile(filepath.Join(dir, script))
				want, _ := os.ReadFile(filepath.Join("scripts", src))
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("%s differs from packaging/scripts/%s (%v)", script, src, err)
				}
			}

			root := t.TempDir()
			run(t, "dpkg-deb", "-x", deb, root)
			f, err := elf.Open(filepath.Join(root, "usr/bin/extractedprism"))
			if err != nil {
				t.Fatalf("/usr/bin/extractedprism: %v", err)
			}
			defer func() { _ = f.Close() }()
			if f.Machine != elfMachine[arch] {
				t.Errorf("/usr/bin/extractedprism is for %v, want %v", f.Machine, elfMachine[arch])
			}
		})
	}
}

// dpkgRoot is a throwaway root for dpkg --root.
func dpkgRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"var/lib/dpkg/status", "var/lib/dpkg/available"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func dpkg(t *testing.T, root string, args ...string) string {
	t.Helper()
	// The throwaway root has no dpkg database of the host's packages.
	base := []string{"--root=" + root, "--force-script-chrootless", "--force-depends", "--log=/dev/null"}
	return run(t, "dpkg", append(base, args...)...)
}

func exists(root, path string) bool {
	_, err := os.Lstat(filepath.Join(root, path))
	return err == nil
}

var enableLinks = []string{
	"etc/systemd/system/multi-user.target.wants/extractedprism.service",
	"etc/systemd/system/sockets.target.wants/extractedprism.socket",
}

// hostLinks lists extractedprism links in the host's /etc/systemd/system.
func hostLinks(t *testing.T) []string {
	t.Helper()
	m, err := filepath.Glob("/etc/systemd/system/*/extractedprism.*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestDebLifecycle installs, upgrades, removes and purges the host's .deb in
// a throwaway root, with the maintainer scripts run by dpkg (DPKG_ROOT set).
func TestDebLifecycle(t *testing.T) {
	deb := packageFile(t, "deb", runtime.GOARCH)
	root := dpkgRoot(t)
	hostBefore := hostLinks(t)

	dpkg(t, root, "-i", deb)
	for path := range shipped {
		if !exists(root, path) {
			t.Errorf("after install: %s missing", path)
		}
	}
	for _, l := range enableLinks {
		target, err := os.Readlink(filepath.Join(root, l))
		if err != nil || !strings.HasPrefix(target, "/usr/lib/systemd/system/extractedprism.") {
			t.Errorf("after install: %s -> %q (%v), want a link to the unit (enabled)", l, target, err)
		}
	}
	conf, _ := os.ReadFile(filepath.Join(root, confFile))
	header, _ := os.ReadFile("config-header.yaml")
	reference, _ := os.ReadFile("../configs/extractedprism.yaml")
	want := append(header, reference...)
	if !bytes.Equal(conf, want) {
		t.Errorf("installed %s is not packaging/config-header.yaml + configs/extractedprism.yaml", confFile)
	}
	out, err := exec.Command(filepath.Join(root, "usr/bin/extractedprism"), "validate", "--config", filepath.Join(root, confFile)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "endpoints") {
		t.Errorf("validate of the shipped config = %v, %s; want it rejected for lacking endpoints (the service must not run unconfigured)", err, out)
	}

	// The administrator configures it and disables the socket; an upgrade keeps both.
	edited := append(bytes.Clone(want), []byte("# edited by the administrator\n")...)
	if err := os.WriteFile(filepath.Join(root, confFile), edited, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(root, enableLinks[1])); err != nil {
		t.Fatal(err)
	}
	dpkg(t, root, "-i", deb)
	if conf, _ := os.ReadFile(filepath.Join(root, confFile)); !bytes.Equal(conf, edited) {
		t.Errorf("upgrade replaced the edited %s", confFile)
	}
	if !exists(root, enableLinks[0]) || exists(root, enableLinks[1]) {
		t.Errorf("upgrade changed what the administrator enabled: service link %v (want true), socket link %v (want false)",
			exists(root, enableLinks[0]), exists(root, enableLinks[1]))
	}

	// Remove: units disabled, configuration and state kept.
	state := filepath.Join(root, "var/lib/private/extractedprism")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "endpoints.json"), []byte("[]"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("private/extractedprism", filepath.Join(root, "var/lib/extractedprism")); err != nil {
		t.Fatal(err)
	}
	dpkg(t, root, "--remove", "extractedprism")
	for _, l := range enableLinks {
		if exists(root, l) {
			t.Errorf("after remove: %s still there", l)
		}
	}
	if !exists(root, confFile) || !exists(root, "var/lib/private/extractedprism/endpoints.json") {
		t.Errorf("remove deleted the configuration or the state; only purge may")
	}
	if exists(root, "usr/bin/extractedprism") {
		t.Errorf("after remove: /usr/bin/extractedprism still there")
	}

	// Purge: nothing of the package is left.
	dpkg(t, root, "--purge", "extractedprism")
	var left []string
	_ = filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err == nil && strings.Contains(p, "extractedprism") && !strings.Contains(p, "/var/lib/dpkg/") {
			left = append(left, strings.TrimPrefix(p, root))
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("after purge, left behind: %q", left)
	}
	if got := hostLinks(t); !slices.Equal(got, hostBefore) {
		t.Errorf("installing into a throwaway root changed the host's /etc/systemd/system: %q -> %q", hostBefore, got)
	}
}

func rpmQuery(t *testing.T, rpm string, args ...string) string {
	t.Helper()
	return run(t, "rpm", append([]string{"--dbpath", t.TempDir(), "-qp"}, append(args, rpm)...)...)
}

func TestRPMContents(t *testing.T) {
	for _, arch := range builtArches(t) {
		t.Run(arch, func(t *testing.T) {
			rpm := packageFile(t, "rpm", arch)
			var files []string
			for _, l := range strings.Split(strings.TrimSpace(rpmQuery(t, rpm, "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]")), "\n") {
				f := strings.Fields(l)
				if len(f) == 3 { // no flags
					f = []string{f[0], f[1], "", f[2]}
				}
				if len(f) != 4 {
					t.Fatalf("unexpected rpm file line %q", l)
				}
				if f[1] != "root:root" {
					t.Errorf("%s owned by %s, want root:root", f[3], f[1])
				}
				if strings.HasPrefix(f[0], "d") {
					continue
				}
				files = append(files, f[3])
				if f[0] != shipped[f[3]] {
					t.Errorf("%s: %s has mode %q, want %q", filepath.Base(rpm), f[3], f[0], shipped[f[3]])
				}
				if f[3] == confFile && f[2] != "cn" {
					t.Errorf("%s has flags %q, want cn (%%config(noreplace))", confFile, f[2])
				}
			}
			var want []string
			for p := range shipped {
				want = append(want, p)
			}
			slices.Sort(want)
			slices.Sort(files)
			if !slices.Equal(files, want) {
				t.Errorf("rpm -qlp %s = %q, want %q", filepath.Base(rpm), files, want)
			}
			if got := strings.TrimSpace(rpmQuery(t, rpm, "--configfiles")); got != confFile {
				t.Errorf("rpm --configfiles = %q, want %s", got, confFile)
			}
			if got := rpmQuery(t, rpm, "--qf", "%{ARCH}"); got != rpmArch[arch] {
				t.Errorf("rpm arch %q, want %s", got, rpmArch[arch])
			}
			if got := rpmQuery(t, rpm, "-R"); strings.Contains(got, "kill") {
				t.Errorf("rpm requires %q; the unit runs no kill command", got)
			}
			scripts := rpmQuery(t, rpm, "--scripts")
			for _, s := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"} {
				if !strings.Contains(scripts, s) {
					t.Errorf("rpm --scripts lacks the %s:\n%s", s, scripts)
				}
			}
		})
	}
}

// TestRPMScripts runs the rpm's own scriptlets with rpm's arguments against a
// root the package was unpacked into, with the real systemctl working on
// that root (DPKG_ROOT, which the scripts honour for any offline root).
func TestRPMScripts(t *testing.T) {
	rpm := packageFile(t, "rpm", runtime.GOARCH)
	root := t.TempDir()
	run(t, "rpm", "--root", root, "--dbpath", filepath.Join(root, "rpmdb"), "-i", "--noscripts", "--nodeps", "--ignorearch", rpm)
	for path := range shipped {
		if !exists(root, path) {
			t.Errorf("rpm -i: %s missing", path)
		}
	}
	scriptlet := func(tag, arg string) {
		t.Helper()
		body := rpmQuery(t, rpm, "--qf", "%{"+tag+"}")
		cmd := exec.Command("/bin/sh", "-c", body, "scriptlet", arg)
		cmd.Env = append(os.Environ(), "DPKG_ROOT="+root)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", tag, arg, err, out)
		}
	}
	linked := func() (svc, sock bool) { return exists(root, enableLinks[0]), exists(root, enableLinks[1]) }

	scriptlet("POSTIN", "1") // install
	if svc, sock := linked(); !svc || !sock {
		t.Fatalf("after %%post 1: service enabled %v, socket enabled %v; want both", svc, sock)
	}
	_ = os.Remove(filepath.Join(root, enableLinks[1]))
	scriptlet("POSTIN", "2") // upgrade: enablement untouched
	scriptlet("PREUN", "1")
	scriptlet("POSTUN", "1")
	if svc, sock := linked(); !svc || sock {
		t.Errorf("upgrade scriptlets changed enablement: service %v (want true), socket %v (want false)", svc, sock)
	}
	state := filepath.Join(root, "var/lib/private/extractedprism")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	scriptlet("PREUN", "0") // erase
	if svc, sock := linked(); svc || sock {
		t.Errorf("after %%preun 0: service enabled %v, socket enabled %v; want neither", svc, sock)
	}
	scriptlet("POSTUN", "0")
	if exists(root, "var/lib/private/extractedprism") {
		t.Errorf("after %%postun 0: state directory still there")
	}
}
