// Command image writes registry-proxy's container image (no base image, no
// daemon) as an OCI layout and a tarball: `make image`.
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"

	"github.com/registry-proxy/registry-proxy/internal/image"
)

func main() {
	binary := flag.String("binary", "", "static registry-proxy binary (CGO_ENABLED=0)")
	version := flag.String("version", "dev", "image version label")
	arch := flag.String("arch", runtime.GOARCH, "the binary's architecture")
	layoutDir := flag.String("layout", "", "write an OCI image layout here")
	tarPath := flag.String("tar", "", "write an image tarball (docker save format) here")
	ref := flag.String("ref", "registry-proxy:dev", "the image's name and tag")
	flag.Parse()
	if *binary == "" || (*layoutDir == "" && *tarPath == "") {
		fmt.Fprintln(os.Stderr, "usage: image -binary FILE [-layout DIR] [-tar FILE] [-ref NAME:TAG]")
		os.Exit(2)
	}
	if err := build(*binary, *version, *arch, *layoutDir, *tarPath, *ref); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func build(binary, version, arch, layoutDir, tarPath, ref string) error {
	img, err := image.Build(image.Options{Binary: binary, Version: version, OS: "linux", Arch: arch})
	if err != nil {
		return err
	}
	if layoutDir != "" {
		if err := image.WriteLayout(layoutDir, img, ref); err != nil {
			return err
		}
		fmt.Println("wrote OCI layout", layoutDir)
	}
	if tarPath != "" {
		if err := image.WriteTarball(tarPath, img, ref); err != nil {
			return err
		}
		fmt.Println("wrote image tarball", tarPath)
	}
	d, _ := img.Digest()
	size, _ := img.Manifest()
	var compressed int64
	for _, l := range size.Layers {
		compressed += l.Size
	}
	fmt.Printf("%s %s: one layer, %d bytes compressed\n", ref, d, compressed)
	return nil
}
