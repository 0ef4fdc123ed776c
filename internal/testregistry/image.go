package testregistry

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Layer is one pushed layer.
type Layer struct {
	Digest string
	Size   int64
}

// Image is a pushed image.
type Image struct {
	Repo   string
	Tag    string
	Digest string // manifest digest
	Config string // config digest
	Layers []Layer
}

// RandomBytes returns n pseudo-random bytes from seed, cheaply.
func RandomBytes(n int64, seed uint64) []byte {
	var s [32]byte
	for i := range 4 {
		s[i*8] = byte(seed >> (8 * i))
	}
	b := make([]byte, n)
	rng := rand.NewChaCha8(s)
	rng.Read(b)
	return b
}

// LayerTar returns an uncompressed tar holding one file of n random bytes.
func LayerTar(n int64, seed uint64) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(int(n) + 4096)
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("data-%d", seed), Mode: 0o644, Size: n, ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(RandomBytes(n, seed)); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// PushImage pushes an OCI image for this machine's platform with one
// uncompressed layer per entry of layerFiles (each a file of that many random
// bytes; seed makes the content reproducible and distinct per image).
func (r *Registry) PushImage(ctx context.Context, repo, tag string, layerFiles []int64, seed uint64) (*Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var layers []v1.Layer
	for i, n := range layerFiles {
		b, err := LayerTar(n, seed*1000+uint64(i))
		if err != nil {
			return nil, fmt.Errorf("testregistry: layer %d: %w", i, err)
		}
		layers = append(layers, static.NewLayer(b, types.OCIUncompressedLayer))
	}
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		return nil, fmt.Errorf("testregistry: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Cmd = []string{"/bin/true"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, err
	}
	ref, err := name.ParseReference(fmt.Sprintf("%s/%s:%s", r.Host, repo, tag), name.Insecure)
	if err != nil {
		return nil, err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("testregistry: push %s: %w", ref, err)
	}
	out := &Image{Repo: repo, Tag: tag}
	d, _ := img.Digest()
	out.Digest = d.String()
	cd, _ := img.ConfigName()
	out.Config = cd.String()
	for _, l := range layers {
		ld, _ := l.Digest()
		sz, _ := l.Size()
		out.Layers = append(out.Layers, Layer{Digest: ld.String(), Size: sz})
	}
	return out, nil
}

// PushBlob uploads raw bytes as a blob of repo and returns its digest.
func (r *Registry) PushBlob(ctx context.Context, repo string, b []byte) (string, error) {
	l := static.NewLayer(b, types.OCIUncompressedLayer)
	ref, err := name.NewRepository(r.Host+"/"+repo, name.Insecure)
	if err != nil {
		return "", err
	}
	if err := remote.WriteLayer(ref, l, remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("testregistry: push blob: %w", err)
	}
	d, _ := l.Digest()
	return d.String(), nil
}
