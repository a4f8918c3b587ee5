// Package packaging_test checks the files the deb and rpm packages ship and,
// with the "packaging" build tag (make package-test), the built packages
// themselves with dpkg and rpm.
package packaging_test

import (
	"bytes"
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestConfigIsReference keeps the packaged /etc/extractedprism/config.yaml
// equal to the reference configuration below its header comment.
func TestConfigIsReference(t *testing.T) {
	packaged, err := os.ReadFile("config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	reference, err := os.ReadFile("../configs/extractedprism.yaml")
	if err != nil {
		t.Fatal(err)
	}
	header, body, ok := bytes.Cut(packaged, []byte("#\n"))
	if !ok || !bytes.HasPrefix(header, []byte("# /etc/extractedprism/config.yaml")) {
		t.Fatalf("packaging/config.yaml does not start with its header comment ending in a lone \"#\" line")
	}
	if !bytes.Equal(body, reference) {
		t.Errorf("packaging/config.yaml below its header differs from configs/extractedprism.yaml; regenerate it:\n" +
			"  { sed -n '1,/^#$/p' packaging/config.yaml; cat configs/extractedprism.yaml; } > x && mv x packaging/config.yaml")
	}
}
