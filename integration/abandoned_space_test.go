package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

// usedBytes is what the file system under dir holds.
func usedBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

func freeBytesUnder(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// writtenPieces is the bytes of the pieces the partial blobs under dataDir
// record as written (1 MiB pieces).
func writtenPieces(t *testing.T, dataDir string) int64 {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(dataDir, "*", "ingest", "*", "pieces"))
	more, _ := filepath.Glob(filepath.Join(dataDir, "ingest", "*", "pieces"))
	var n int64
	for _, p := range append(dirs, more...) {
		b, _ := os.ReadFile(p)
		for i := 0; i+8 <= len(b); i += 8 {
			if b[i] == 1 {
				n += 1 << 20
			}
		}
	}
	return n
}

// Pulls of large blobs abandoned after a second each (the upstream is
// slow) reserve their whole blobs while they run; once limits.idle_download
// stops them the data dir holds what they wrote, and a blob that fits only
// once their partials are collected is served, not 507.
func TestAbandonedPullsGiveBackDisk(t *testing.T) {
	need(t, os.Geteuid() == 0, "root, to mount a tmpfs")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	reg := startRegistry(t)
	const pulls, size = 3, 24 << 20
	var ds []string
	for i := range pulls {
		d, err := reg.PushBlob(context.Background(), "space/blob", testregistry.RandomBytes(size, uint64(70+i)))
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	reg.SetPace(256 << 10) // a connection: the blobs take far longer than a second
	cfg := writeTOML(t, "[limits]\nidle_download = \"2s\"\n")
	px := startProxy(t, dir, "--config", cfg, "--upstream", "space.invalid="+reg.URL)
	url := func(d string) string { return "http://" + px.Addr + "/v2/space/blob/blobs/" + d + "?ns=space.invalid" }
	base := usedBytes(t, dir)

	// The pulls, each abandoned after a second.
	running, after := abandon(t, px, dir, base, ds, size, url)
	written := writtenPieces(t, dir)
	t.Logf("%d pulls of %d MiB abandoned after 1 s: %d bytes held while running, %d after they stopped, %d written in whole pieces",
		pulls, size>>20, running, after, written)
	if running < pulls*size*9/10 {
		t.Errorf("running downloads held %d bytes, want their %d reserved", running, pulls*size)
	}
	// What they wrote, the pieces being written when they stopped gone;
	// a little for the piece records and metadata.
	if after > written+256<<10 {
		t.Fatalf("stopped downloads hold %d bytes, want the %d they wrote", after, written)
	}
	if written == 0 {
		t.Fatal("the abandoned downloads wrote no whole piece: nothing to collect")
	}

	// A blob that fits only once the stopped partials go.
	free := freeBytesUnder(t, dir)
	bigSize := free + written/2
	reg.SetPace(0)
	big, err := reg.PushBlob(context.Background(), "space/blob", testregistry.RandomBytes(bigSize, 80))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fetchVerified(url(big), big); err != nil {
		t.Fatalf("a blob of %d bytes with %d free and %d held by stopped downloads: %v\n%s", bigSize, free, written, err, tail(px.proc.output(), 3000))
	}
	waitOutput(t, px.proc, "disk short: removed partial blobs no download was using", 5*time.Second)
	t.Logf("a %d-byte blob with %d bytes free was served; the data dir then held %d bytes, %d in stopped partials",
		bigSize, free, usedBytes(t, dir)-base, writtenPieces(t, dir))
}

// As many abandoned pulls as the node runs at once (limits.tasks, 256):
// while they run they reserve their blobs; once stopped the data dir holds
// what they wrote, and a new pull is served, not 507.
func TestManyAbandonedPullsGiveBackDisk(t *testing.T) {
	need(t, os.Geteuid() == 0, "root, to mount a tmpfs")
	const pulls, size = 256, 2 << 20
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=560m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	reg := startRegistry(t)
	var ds []string
	for i := range pulls {
		d, err := reg.PushBlob(context.Background(), "space/blob", testregistry.RandomBytes(size, uint64(1000+i)))
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	reg.SetPace(64 << 10) // a connection: no blob arrives within its second
	cfg := writeTOML(t, "[limits]\nidle_download = \"2s\"\ntasks_per_registry = 256\n")
	px := startProxy(t, dir, "--config", cfg, "--upstream", "space.invalid="+reg.URL)
	url := func(d string) string { return "http://" + px.Addr + "/v2/space/blob/blobs/" + d + "?ns=space.invalid" }
	base := usedBytes(t, dir)
	running, after := abandon(t, px, dir, base, ds, size, url)
	written := writtenPieces(t, dir)
	t.Logf("%d pulls of %d MiB abandoned after 1 s: %d bytes held while running, %d after they stopped, %d written in whole pieces",
		pulls, size>>20, running, after, written)
	started := int64(strings.Count(px.proc.output(), `"msg":"blob download started"`))
	if running < started*size/2 {
		t.Errorf("%d running downloads held %d bytes; want most of the %d they reserve", started, running, started*size)
	}
	if after > written+pulls*16<<10 {
		t.Fatalf("stopped downloads hold %d bytes, want about the %d they wrote", after, written)
	}
	reg.SetPace(0)
	if _, err := fetchVerified(url(ds[0]), ds[0]); err != nil {
		t.Fatalf("a pull after the abandoned ones: %v", err)
	}
}

// abandon starts a pull of each blob, each left after a second, and waits
// until the proxy stopped every download; it returns the most the data dir
// held above base while they ran, and what it holds once they stopped.
func abandon(t *testing.T, px *proxy, dir string, base int64, ds []string, size int64, url func(string) string) (running, after int64) {
	t.Helper()
	var wg sync.WaitGroup
	for _, d := range ds {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			getBlob(ctx, url(d))
		})
	}
	want := int64(len(ds)) * size * 9 / 10
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if running = max(running, usedBytes(t, dir)-base); running >= want {
			break
		}
	}
	wg.Wait()
	// Every download that started stops (one the node refused at
	// limits.tasks, 503, never started).
	count := func(msg string) int { return strings.Count(px.proc.output(), `"msg":"`+msg+`"`) }
	ended := func() int {
		return count("blob download stopped") + count("blob download failed") + count("blob complete")
	}
	for deadline := time.Now().Add(60 * time.Second); ended() < count("blob download started"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d abandoned downloads ended within 60 s:\n%s", ended(), count("blob download started"), tail(px.proc.output(), 3000))
		}
	}
	if n := count("blob download failed"); n > 0 {
		t.Logf("%d abandoned downloads failed rather than stopped", n)
	}
	// A pull the node had not opened a download for within its second
	// (a slow machine) leaves nothing behind; enough must have started
	// for the figure to mean something.
	if started := count("blob download started"); started < len(ds)/4 {
		t.Fatalf("%d of %d pulls started a download within their second", started, len(ds))
	}
	return running, usedBytes(t, dir) - base
}
