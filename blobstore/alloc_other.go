//go:build !linux

package blobstore

import "os"

func allocate(*os.File, int64) error { return nil }
