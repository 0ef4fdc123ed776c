package manifests

import (
	"testing"

	"github.com/registry-proxy/registry-proxy/manifest"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// A tag record from a peer is taken only with a digest, a manifest's media
// type and a valid repository; it never panics.
func FuzzTagRecord(f *testing.F) {
	f.Add("reg.test", "team/app", "v1", "sha256:"+"a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90", indexType, int64(10), int64(1), true)
	f.Add("", "../x", "", "sha256:zz", "text/html", int64(-5), int64(0), false)
	f.Fuzz(func(t *testing.T, registry, repo, tag, d, mt string, size, at int64, public bool) {
		tg, err := fromProto(&pb.TagRecord{Registry: registry, Repository: repo, Tag: tag, Digest: d, MediaType: mt, Size: size, ResolvedAt: at, Public: public})
		if err != nil {
			return
		}
		if tg.Digest.Validate() != nil || !manifest.MediaTypeOK(tg.MediaType) || tg.Size < -1 || tg.Registry == "" || tg.Tag == "" {
			t.Fatalf("accepted %+v", tg)
		}
	})
}
