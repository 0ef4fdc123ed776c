package testregistry

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
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
	// Set by PushIndex and PushPlatformImage:
	Platform   string `json:",omitempty"` // os/arch[/variant]
	MediaType  string `json:",omitempty"` // the manifest's
	Size       int64  `json:",omitempty"` // the manifest's
	ConfigSize int64  `json:",omitempty"`
}

// LayerBytes is the sum of the image's layer sizes.
func (img *Image) LayerBytes() int64 {
	var n int64
	for _, l := range img.Layers {
		n += l.Size
	}
	return n
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

// Index is a pushed image index (or Docker manifest list).
type Index struct {
	Repo      string
	Tag       string
	Digest    string
	MediaType string
	Size      int64
	// Manifests are its platform images, in the order of its platforms.
	Manifests []*Image
}

// Platform returns the image for platform p ("linux/amd64"), or nil.
func (ix *Index) Platform(p string) *Image {
	for _, m := range ix.Manifests {
		if m.Platform == p {
			return m
		}
	}
	return nil
}

// Native is the image for linux on this machine's architecture: the one
// containerd here pulls.
func (ix *Index) Native() *Image {
	for _, m := range ix.Manifests {
		if strings.HasPrefix(m.Platform, "linux/"+runtime.GOARCH) {
			return m
		}
	}
	return nil
}

// IndexSpec says what PushIndexSpec pushes.
type IndexSpec struct {
	Repo, Tag string
	// Platforms as os/arch[/variant]; one must be linux/GOARCH, so that
	// containerd here can pull the index. Default: linux/GOARCH and one other.
	Platforms []string
	// Layers are the sizes of each platform image's layer files (each
	// platform its own layers); default two files, 1 MiB and 512 KiB.
	Layers []int64
	// Seed makes the content reproducible; another seed, other content.
	Seed uint64
	// Docker pushes a Docker manifest list of Docker schema 2 images instead
	// of an OCI index of OCI images.
	Docker bool
}

// NativePlatform is linux on this machine's architecture.
func NativePlatform() string { return "linux/" + runtime.GOARCH }

// PushIndex pushes an OCI image index with one image per platform (default:
// linux/GOARCH and one other), each with its own uncompressed layers of the
// sizes in layerFiles, and tags it. It goes to the registry directly, not
// over the network: it works whatever the knobs say (outage, limit,
// credentials), and counts nothing.
func (r *Registry) PushIndex(ctx context.Context, repo, tag string, layerFiles []int64, seed uint64, platforms ...string) (*Index, error) {
	return r.PushIndexSpec(ctx, IndexSpec{Repo: repo, Tag: tag, Platforms: platforms, Layers: layerFiles, Seed: seed})
}

// PushIndexSpec is PushIndex with every choice spelled out.
func (r *Registry) PushIndexSpec(ctx context.Context, sp IndexSpec) (*Index, error) {
	if len(sp.Platforms) == 0 {
		other := "linux/arm64"
		if runtime.GOARCH == "arm64" {
			other = "linux/amd64"
		}
		sp.Platforms = []string{NativePlatform(), other}
	}
	if !slices.ContainsFunc(sp.Platforms, func(p string) bool { return p == NativePlatform() || strings.HasPrefix(p, NativePlatform()+"/") }) {
		return nil, fmt.Errorf("testregistry: index platforms %v lack %s", sp.Platforms, NativePlatform())
	}
	if len(sp.Layers) == 0 {
		sp.Layers = []int64{1 << 20, 512 << 10}
	}
	idxType, imgType := types.OCIImageIndex, types.OCIManifestSchema1
	if sp.Docker {
		idxType, imgType = types.DockerManifestList, types.DockerManifestSchema2
	}
	var idx v1.ImageIndex = mutate.IndexMediaType(empty.Index, idxType)
	out := &Index{Repo: sp.Repo, Tag: sp.Tag, MediaType: string(idxType)}
	for k, p := range sp.Platforms {
		plat, err := v1.ParsePlatform(p)
		if err != nil {
			return nil, fmt.Errorf("testregistry: platform %q: %w", p, err)
		}
		img, info, err := buildImage(imgType, sp.Layers, sp.Seed*1_000_000+uint64(k)*1000, plat)
		if err != nil {
			return nil, err
		}
		info.Repo, info.Platform = sp.Repo, p
		out.Manifests = append(out.Manifests, info)
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{MediaType: imgType, Platform: plat}})
	}
	ref, err := name.ParseReference(fmt.Sprintf("%s/%s:%s", r.Host, sp.Repo, sp.Tag), name.Insecure)
	if err != nil {
		return nil, err
	}
	if err := remote.WriteIndex(ref, idx, r.local(ctx)...); err != nil {
		return nil, fmt.Errorf("testregistry: push %s: %w", ref, err)
	}
	d, _ := idx.Digest()
	out.Digest = d.String()
	out.Size, _ = idx.Size()
	return out, nil
}

// PushPlatformImage pushes a single image (no index) for linux/GOARCH,
// like PushImage, but directly (see PushIndex) and with the manifest's
// media type, size and config size filled in.
func (r *Registry) PushPlatformImage(ctx context.Context, repo, tag string, layerFiles []int64, seed uint64, docker bool) (*Image, error) {
	mt := types.OCIManifestSchema1
	if docker {
		mt = types.DockerManifestSchema2
	}
	plat, _ := v1.ParsePlatform(NativePlatform())
	img, info, err := buildImage(mt, layerFiles, seed*1_000_000+999_000, plat)
	if err != nil {
		return nil, err
	}
	info.Repo, info.Tag, info.Platform = repo, tag, NativePlatform()
	ref, err := name.ParseReference(fmt.Sprintf("%s/%s:%s", r.Host, repo, tag), name.Insecure)
	if err != nil {
		return nil, err
	}
	if err := remote.Write(ref, img, r.local(ctx)...); err != nil {
		return nil, fmt.Errorf("testregistry: push %s: %w", ref, err)
	}
	return info, nil
}

// buildImage makes an image of media type mt for plat with one uncompressed
// layer per entry of layerFiles, its contents from seed.
func buildImage(mt types.MediaType, layerFiles []int64, seed uint64, plat *v1.Platform) (v1.Image, *Image, error) {
	cfgType, layerType := types.OCIConfigJSON, types.OCIUncompressedLayer
	if mt == types.DockerManifestSchema2 {
		cfgType, layerType = types.DockerConfigJSON, types.DockerUncompressedLayer
	}
	img := mutate.MediaType(empty.Image, mt)
	img = mutate.ConfigMediaType(img, cfgType)
	var layers []v1.Layer
	for i, n := range layerFiles {
		b, err := LayerTar(n, seed+uint64(i))
		if err != nil {
			return nil, nil, fmt.Errorf("testregistry: layer %d: %w", i, err)
		}
		layers = append(layers, static.NewLayer(b, layerType))
	}
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		return nil, nil, fmt.Errorf("testregistry: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = plat.OS, plat.Architecture, plat.Variant
	cf.Config.Cmd = []string{"/bin/true"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, nil, err
	}
	info := &Image{MediaType: string(mt)}
	d, err := img.Digest()
	if err != nil {
		return nil, nil, err
	}
	info.Digest = d.String()
	info.Size, _ = img.Size()
	cd, _ := img.ConfigName()
	info.Config = cd.String()
	if raw, err := img.RawConfigFile(); err == nil {
		info.ConfigSize = int64(len(raw))
	}
	for _, l := range layers {
		ld, _ := l.Digest()
		sz, _ := l.Size()
		info.Layers = append(info.Layers, Layer{Digest: ld.String(), Size: sz})
	}
	return img, info, nil
}

// MoveTag points tag of repo at the manifest (or index) digest already in
// repo, as a re-push of the tag does. Directly, as PushIndex.
func (r *Registry) MoveTag(ctx context.Context, repo, tag, digest string) error {
	src, err := name.ParseReference(fmt.Sprintf("%s/%s@%s", r.Host, repo, digest), name.Insecure)
	if err != nil {
		return err
	}
	dst, err := name.NewTag(fmt.Sprintf("%s/%s:%s", r.Host, repo, tag), name.Insecure)
	if err != nil {
		return err
	}
	desc, err := remote.Get(src, r.local(ctx)...)
	if err != nil {
		return fmt.Errorf("testregistry: move tag %s: %w", dst, err)
	}
	if err := remote.Tag(dst, desc, r.local(ctx)...); err != nil {
		return fmt.Errorf("testregistry: move tag %s: %w", dst, err)
	}
	return nil
}

// local are the options that make go-containerregistry's client talk to
// the registry's handler in this process, past the knobs.
func (r *Registry) local(ctx context.Context) []remote.Option {
	return []remote.Option{remote.WithContext(ctx), remote.WithTransport(handlerTransport{r.inner})}
}

// handlerTransport answers requests with a handler, without a network.
type handlerTransport struct{ h http.Handler }

func (t handlerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body == nil {
		req.Body = http.NoBody
	}
	rec := httptest.NewRecorder()
	t.h.ServeHTTP(rec, req)
	resp := rec.Result()
	resp.Request = req
	return resp, nil
}
