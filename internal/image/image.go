// Package image builds registry-proxy's container image without a base
// image or a daemon: per platform, one layer holding the static binary (CA
// roots are compiled in); the platforms' images under one OCI image index,
// written as an OCI layout and as a tarball of that layout, which
// `ctr images import` and `docker load` (Docker 25 and later) read.
package image

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinaryPath is where the binary sits in the image.
const BinaryPath = "/usr/local/bin/registry-proxy"

// DefaultPlatforms are the platforms `make image` covers: a static Go
// build costs the same for each, so the 32-bit ARM boards come along.
func DefaultPlatforms() []string {
	return []string{"linux/amd64", "linux/arm64", "linux/arm/v7"}
}

// Compile builds the static binary of the Go package pkg for platform p
// (os/arch[/variant]) into out, with goCmd (go).
func Compile(ctx context.Context, goCmd, pkg string, p v1.Platform, ldflags, out string) error {
	env := append(os.Environ(), "CGO_ENABLED=0", "GOOS="+p.OS, "GOARCH="+p.Architecture)
	switch {
	case p.Variant == "":
	case p.Architecture == "arm" && strings.HasPrefix(p.Variant, "v"):
		env = append(env, "GOARM="+strings.TrimPrefix(p.Variant, "v"))
	default:
		return fmt.Errorf("image: platform %s: variant not supported", p.String())
	}
	cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath", "-ldflags", ldflags, "-o", out, pkg)
	cmd.Env = env
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("image: go build for %s: %w\n%s", p.String(), err, b)
	}
	return nil
}

// Options describe the image of one platform.
type Options struct {
	// Binary is the static registry-proxy binary for the platform.
	Binary string
	// Version labels the image (org.opencontainers.image.version).
	Version string
	// OS, Arch and Variant of the binary: linux, arm, v7 (Variant is empty
	// but for arm).
	OS, Arch, Variant string
	// Created is the image's creation time; the zero time keeps builds
	// reproducible.
	Created time.Time
}

// Build returns the image: the binary, /etc/registry-proxy and
// /var/lib/registry-proxy, entrypoint registry-proxy, command serve.
func Build(opts Options) (v1.Image, error) {
	bin, err := os.ReadFile(opts.Binary)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range []string{"etc/", "etc/registry-proxy/", "tmp/", "usr/", "usr/local/", "usr/local/bin/", "var/", "var/lib/", "var/lib/registry-proxy/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode, ModTime: opts.Created}); err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: BinaryPath[1:], Mode: 0o755, Size: int64(len(bin)), ModTime: opts.Created}); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("image: layer: %w", err)
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layer)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = opts.OS, opts.Arch, opts.Variant
	cf.Created = v1.Time{Time: opts.Created}
	cf.Config.Entrypoint = []string{BinaryPath}
	cf.Config.Cmd = []string{"serve"}
	cf.Config.WorkingDir = "/"
	cf.Config.Env = []string{"PATH=/usr/local/bin"}
	cf.Config.Volumes = map[string]struct{}{"/var/lib/registry-proxy": {}}
	cf.Config.ExposedPorts = map[string]struct{}{"5000/tcp": {}, "5002/tcp": {}, "5003/tcp": {}, "5003/udp": {}}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":   "registry-proxy",
		"org.opencontainers.image.version": opts.Version,
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return img, nil
}

// Index returns the image index of imgs, each entry carrying the platform
// of its image's config, so that a node pulls the image of its own.
func Index(imgs ...v1.Image) (v1.ImageIndex, error) {
	adds := make([]mutate.IndexAddendum, 0, len(imgs))
	for _, img := range imgs {
		cf, err := img.ConfigFile()
		if err != nil {
			return nil, fmt.Errorf("image: index: %w", err)
		}
		p := cf.Platform()
		if p == nil {
			return nil, fmt.Errorf("image: index: an image without a platform")
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: p}})
	}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...)
	return idx, nil
}

// refAnnotations name the index in a layout's index.json as `docker save`
// does: containerd and Docker take the full name from
// io.containerd.image.name (docker.io/library/… for a short name, as
// Kubernetes asks containerd for it), the OCI annotation holds the tag.
func refAnnotations(ref string) (map[string]string, error) {
	tag, err := name.NewTag(ref)
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	reg := tag.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return map[string]string{
		"io.containerd.image.name":          reg + "/" + tag.RepositoryStr() + ":" + tag.TagStr(),
		"org.opencontainers.image.ref.name": tag.TagStr(),
	}, nil
}

// WriteLayout writes idx as an OCI image layout in dir, named ref.
func WriteLayout(dir string, idx v1.ImageIndex, ref string) error {
	ann, err := refAnnotations(ref)
	if err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("image: layout %s: %w", dir, err)
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(ann)); err != nil {
		return fmt.Errorf("image: layout %s: %w", dir, err)
	}
	return nil
}

// WriteArchive writes idx as a tarball of the OCI layout WriteLayout
// writes, named ref: what `ctr images import` and `docker load` (Docker 25
// and later) read, every platform in one file. (The older `docker save`
// format holds one platform per name, so it cannot carry the index.)
func WriteArchive(path string, idx v1.ImageIndex, ref string) error {
	ann, err := refAnnotations(ref)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	if err := writeArchive(f, idx, ann); err != nil {
		f.Close()
		return fmt.Errorf("image: %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("image: %s: %w", path, err)
	}
	return nil
}

// WriteDockerTarball writes the image of one platform as a tarball named
// ref in the format of `docker save` before Docker 25, the one the docker
// of every version loads (and ctr imports).
func WriteDockerTarball(path string, img v1.Image, ref string) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	if err := tarball.WriteToFile(path, tag, img); err != nil {
		return fmt.Errorf("image: %s: %w", path, err)
	}
	return nil
}

func writeArchive(w io.Writer, idx v1.ImageIndex, ann map[string]string) error {
	// The epoch, not the zero time, which the tar header cannot hold.
	mtime := time.Unix(0, 0)
	tw := tar.NewWriter(w)
	file := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: mtime}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: mtime}); err != nil {
			return err
		}
	}
	seen := map[v1.Hash]bool{}
	blob := func(h v1.Hash, size int64, open func() (io.ReadCloser, error)) error {
		if seen[h] {
			return nil
		}
		seen[h] = true
		rc, err := open()
		if err != nil {
			return err
		}
		defer rc.Close()
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "blobs/" + h.Algorithm + "/" + h.Hex, Mode: 0o644, Size: size, ModTime: mtime}); err != nil {
			return err
		}
		_, err = io.Copy(tw, rc)
		return err
	}
	raw := func(b []byte) func() (io.ReadCloser, error) {
		return func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	for _, d := range im.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			return err
		}
		layers, err := img.Layers()
		if err != nil {
			return err
		}
		for _, l := range layers {
			h, err := l.Digest()
			if err != nil {
				return err
			}
			size, err := l.Size()
			if err != nil {
				return err
			}
			if err := blob(h, size, l.Compressed); err != nil {
				return err
			}
		}
		cfg, err := img.RawConfigFile()
		if err != nil {
			return err
		}
		ch, err := img.ConfigName()
		if err != nil {
			return err
		}
		if err := blob(ch, int64(len(cfg)), raw(cfg)); err != nil {
			return err
		}
		m, err := img.RawManifest()
		if err != nil {
			return err
		}
		if err := blob(d.Digest, int64(len(m)), raw(m)); err != nil {
			return err
		}
	}
	m, err := idx.RawManifest()
	if err != nil {
		return err
	}
	h, err := idx.Digest()
	if err != nil {
		return err
	}
	if err := blob(h, int64(len(m)), raw(m)); err != nil {
		return err
	}
	mt, err := idx.MediaType()
	if err != nil {
		return err
	}
	// Indented as the layout's index.json, the same bytes.
	top, err := json.MarshalIndent(v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests:     []v1.Descriptor{{MediaType: mt, Size: int64(len(m)), Digest: h, Annotations: ann}},
	}, "", "   ")
	if err != nil {
		return err
	}
	// As the layout's own file reads.
	if err := file("oci-layout", []byte("{\n    \"imageLayoutVersion\": \"1.0.0\"\n}")); err != nil {
		return err
	}
	if err := file("index.json", top); err != nil {
		return err
	}
	return tw.Close()
}
