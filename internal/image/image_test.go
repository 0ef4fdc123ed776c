package image

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestRefAnnotations(t *testing.T) {
	for _, tc := range []struct {
		ref, name, tag string
	}{
		// Kubernetes asks containerd for the normalized name.
		{"registry-proxy:v1", "docker.io/library/registry-proxy:v1", "v1"},
		{"team/registry-proxy:v1", "docker.io/team/registry-proxy:v1", "v1"},
		{"registry.example.com/ops/registry-proxy:1.2-dirty", "registry.example.com/ops/registry-proxy:1.2-dirty", "1.2-dirty"},
		{"localhost:5000/registry-proxy:x", "localhost:5000/registry-proxy:x", "x"},
		{"registry-proxy", "docker.io/library/registry-proxy:latest", "latest"},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			ann, err := refAnnotations(tc.ref)
			if err != nil {
				t.Fatal(err)
			}
			if got := ann["io.containerd.image.name"]; got != tc.name {
				t.Errorf("io.containerd.image.name = %q, want %q", got, tc.name)
			}
			if got := ann["org.opencontainers.image.ref.name"]; got != tc.tag {
				t.Errorf("org.opencontainers.image.ref.name = %q, want %q", got, tc.tag)
			}
		})
	}
	if _, err := refAnnotations("Not A Ref"); err == nil {
		t.Error("an invalid reference was accepted")
	}
}

// The index carries each image's platform, and the tarball holds exactly
// the files of the layout, byte for byte, every blob under its digest.
func TestIndexLayoutAndArchive(t *testing.T) {
	dir := t.TempDir()
	var imgs []v1.Image
	for _, s := range DefaultPlatforms() {
		p, err := v1.ParsePlatform(s)
		if err != nil {
			t.Fatal(err)
		}
		bin := filepath.Join(dir, strings.ReplaceAll(s, "/", "-"))
		if err := os.WriteFile(bin, []byte("not really a binary for "+s), 0o755); err != nil {
			t.Fatal(err)
		}
		img, err := Build(Options{Binary: bin, Version: "test", OS: p.OS, Arch: p.Architecture, Variant: p.Variant})
		if err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, img)
	}
	idx, err := Index(imgs...)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != len(DefaultPlatforms()) {
		t.Fatalf("%d manifests in the index, want %d", len(im.Manifests), len(DefaultPlatforms()))
	}
	for i, d := range im.Manifests {
		if d.Platform == nil || d.Platform.String() != DefaultPlatforms()[i] {
			t.Errorf("manifest %d: platform %v, want %s", i, d.Platform, DefaultPlatforms()[i])
		}
	}

	const ref = "registry.example.com/registry-proxy:test"
	layoutDir := filepath.Join(dir, "oci")
	if err := WriteLayout(layoutDir, idx, ref); err != nil {
		t.Fatal(err)
	}
	tarPath := filepath.Join(dir, "image.tar")
	if err := WriteArchive(tarPath, idx, ref); err != nil {
		t.Fatal(err)
	}
	inLayout := map[string][]byte{}
	err = filepath.WalkDir(layoutDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(layoutDir, p)
		inLayout[filepath.ToSlash(rel)] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	inArchive := readTar(t, tarPath)
	// oci-layout, index.json, the image index, and per platform a manifest,
	// a config and a layer.
	if want := 3 + 3*len(DefaultPlatforms()); len(inArchive) != want {
		t.Errorf("%d files in the tarball, want %d", len(inArchive), want)
	}
	for n, b := range inArchive {
		if lb, ok := inLayout[n]; !ok {
			t.Errorf("%s in the tarball, not in the layout", n)
		} else if string(lb) != string(b) {
			t.Errorf("%s differs between the tarball and the layout:\n%s\n%s", n, b, lb)
		}
		if hexDigest, ok := strings.CutPrefix(n, "blobs/sha256/"); ok {
			if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != hexDigest {
				t.Errorf("%s: content's sha256 is %x", n, sum)
			}
		}
	}
	for n := range inLayout {
		if _, ok := inArchive[n]; !ok {
			t.Errorf("%s in the layout, not in the tarball", n)
		}
	}
}

func readTar(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
	}
}
