// Command image builds registry-proxy's container image (no base image, no
// daemon) for several platforms under one OCI image index, written as an OCI
// layout and a tarball of it: `make image`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/registry-proxy/registry-proxy/internal/image"
)

// pkg is the program the image runs.
const pkg = "github.com/registry-proxy/registry-proxy/cmd/registry-proxy"

type options struct {
	platforms, goCmd, ldflags, version, binDir, layoutDir, tarPath, dockerDir, ref string
}

func main() {
	var o options
	flag.StringVar(&o.platforms, "platforms", strings.Join(image.DefaultPlatforms(), ","), "comma-separated os/arch[/variant] to build for")
	flag.StringVar(&o.goCmd, "go", "go", "the go command that builds the binaries")
	flag.StringVar(&o.ldflags, "ldflags", "-s -w", "go build -ldflags")
	flag.StringVar(&o.version, "version", "dev", "image version label")
	flag.StringVar(&o.binDir, "bin-dir", "", "write the static binaries here, one per platform (registry-proxy-OS-ARCH[-VARIANT])")
	flag.StringVar(&o.layoutDir, "layout", "", "write an OCI image layout here")
	flag.StringVar(&o.tarPath, "tar", "", "write the OCI layout as a tarball here (ctr images import)")
	flag.StringVar(&o.dockerDir, "docker-tar-dir", "", "write a `docker save` tarball per platform here (registry-proxy-OS-ARCH[-VARIANT].tar, for docker load)")
	flag.StringVar(&o.ref, "ref", "registry-proxy:dev", "the image's name and tag")
	flag.Parse()
	if o.binDir == "" || (o.layoutDir == "" && o.tarPath == "") {
		fmt.Fprintln(os.Stderr, "usage: image -bin-dir DIR [-layout DIR] [-tar FILE] [-platforms P,...] [-ref NAME:TAG] [-ldflags FLAGS]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := build(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func build(ctx context.Context, o options) error {
	for _, d := range []string{o.binDir, o.dockerDir} {
		if d == "" {
			continue
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("image: %w", err)
		}
	}
	var imgs []v1.Image
	for _, s := range strings.Split(o.platforms, ",") {
		p, err := v1.ParsePlatform(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("image: platform %q: %w", s, err)
		}
		bin := filepath.Join(o.binDir, "registry-proxy-"+strings.ReplaceAll(p.String(), "/", "-"))
		if err := image.Compile(ctx, o.goCmd, pkg, *p, o.ldflags, bin); err != nil {
			return err
		}
		img, err := image.Build(image.Options{Binary: bin, Version: o.version, OS: p.OS, Arch: p.Architecture, Variant: p.Variant})
		if err != nil {
			return err
		}
		d, err := img.Digest()
		if err != nil {
			return fmt.Errorf("image: %w", err)
		}
		m, err := img.Manifest()
		if err != nil {
			return fmt.Errorf("image: %w", err)
		}
		var compressed int64
		for _, l := range m.Layers {
			compressed += l.Size
		}
		fmt.Printf("%s %s: one layer, %d bytes compressed\n", p, d, compressed)
		if o.dockerDir != "" {
			if err := image.WriteDockerTarball(filepath.Join(o.dockerDir, filepath.Base(bin)+".tar"), img, o.ref); err != nil {
				return err
			}
		}
		imgs = append(imgs, img)
	}
	idx, err := image.Index(imgs...)
	if err != nil {
		return err
	}
	if o.layoutDir != "" {
		if err := image.WriteLayout(o.layoutDir, idx, o.ref); err != nil {
			return err
		}
		fmt.Println("wrote OCI layout", o.layoutDir)
	}
	if o.tarPath != "" {
		if err := image.WriteArchive(o.tarPath, idx, o.ref); err != nil {
			return err
		}
		fmt.Println("wrote image tarball", o.tarPath)
	}
	d, err := idx.Digest()
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	fmt.Printf("%s %s: image index of %d platforms\n", o.ref, d, len(imgs))
	return nil
}
