// Package atomicfile replaces a file whole or not at all: a temporary file
// beside it, synced, renamed over it, the directory synced.
package atomicfile

import (
	"os"
	"path/filepath"
)

// TempPrefix starts the name of Write's temporary files; a crash can leave
// one behind, for its directory's owner to sweep.
const TempPrefix = ".tmp-"

// Write puts b at path with mode perm, through a temporary file in the same
// directory.
func Write(path string, b []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), TempPrefix+"*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SyncDir makes a rename or create in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
