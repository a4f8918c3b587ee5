package discovery

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// stateFileVersion is the format version written to the state file.
const stateFileVersion = 1

// stateDoc is the JSON document of the state file.
type stateDoc struct {
	Version   int       `json:"version"`
	Updated   time.Time `json:"updated"`
	Endpoints []string  `json:"endpoints"`
}

// loadStateFile reads the last-known-good list. A missing file is no error
// and yields nil.
func loadStateFile(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state file: %w", err)
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("parse state file %s: %w", path, err)
	}
	if doc.Version != stateFileVersion {
		return nil, fmt.Errorf("state file %s: version %d is not %d", path, doc.Version, stateFileVersion)
	}
	eps, err := normalizeList("endpoints", doc.Endpoints)
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	return eps, nil
}

// saveStateFile writes the list atomically: a temporary file in the same
// directory, synced, renamed over the old file, then the directory synced.
func saveStateFile(path string, eps []string, now time.Time) (err error) {
	b, err := json.MarshalIndent(stateDoc{Version: stateFileVersion, Updated: now.UTC(), Endpoints: eps}, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state file: %w", err)
	}
	b = append(b, '\n')
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("create temporary state file: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	if _, err := f.Write(b); err != nil {
		_ = f.Close()
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Chmod(0o644); err != nil {
		_ = f.Close()
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename state file: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open state directory: %w", err)
	}
	defer func() { _ = d.Close() }()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync state directory %s: %w", dir, err)
	}
	return nil
}
