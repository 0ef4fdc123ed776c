package blobstore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/atomicfile"
)

func (s *Store) manifestPath(d digest.Digest) string {
	return filepath.Join(s.root, "manifests", string(d.Algorithm()), d.Encoded())
}

// PutManifest stores a manifest by digest with its media type. The content
// must match the digest.
func (s *Store) PutManifest(d digest.Digest, mediaType string, content []byte) error {
	if d.Algorithm().FromBytes(content) != d {
		return fmt.Errorf("blobstore: put manifest %s: %w", d, ErrDigestMismatch)
	}
	path := s.manifestPath(d)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("blobstore: put manifest: %w", err)
	}
	// The type goes first: a manifest file present means its type is too.
	if err := atomicfile.Write(path+".type", []byte(mediaType), 0o644); err != nil {
		return fmt.Errorf("blobstore: put manifest %s: %w", d, err)
	}
	if err := atomicfile.Write(path, content, 0o644); err != nil {
		return fmt.Errorf("blobstore: put manifest %s: %w", d, err)
	}
	return nil
}

// GetManifest returns a stored manifest and its media type. Content that no
// longer matches its digest is reported as not found and removed.
func (s *Store) GetManifest(d digest.Digest) (mediaType string, content []byte, err error) {
	path := s.manifestPath(d)
	content, err = os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil, ErrNotFound
	}
	if err != nil {
		return "", nil, fmt.Errorf("blobstore: get manifest %s: %w", d, err)
	}
	// Its mtime is its last read, roughly, for GC: refreshed hourly.
	if fi, err := os.Stat(path); err == nil && s.opts.Now().Sub(fi.ModTime()) > time.Hour {
		now := s.opts.Now()
		os.Chtimes(path, now, now)
	}
	mt, err := os.ReadFile(path + ".type")
	if err != nil || d.Algorithm().FromBytes(content) != d {
		s.log.Warn("dropping damaged cached manifest", "digest", d)
		os.Remove(path)
		return "", nil, ErrNotFound
	}
	return string(mt), content, nil
}
