//go:build !linux

package blobstore

import (
	"errors"
	"os"
)

func allocate(*os.File, int64) error { return nil }

// freeBytes is unknown here: the write itself reports a full disk.
func freeBytes(string) (int64, error) { return 0, errors.ErrUnsupported }

func punchHole(*os.File, int64, int64) error { return errors.ErrUnsupported }

// allocatedBytes is the file's size here: its blocks are not known.
func allocatedBytes(fi os.FileInfo) int64 { return fi.Size() }
