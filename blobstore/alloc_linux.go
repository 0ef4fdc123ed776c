package blobstore

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// allocate reserves the file's blocks up front: a full disk fails the
// download at its start instead of halfway, and writes into allocated blocks
// cost a fraction of writes that allocate (ext4: about 10x).
func allocate(f *os.File, size int64) error {
	if size == 0 {
		return nil
	}
	err := unix.Fallocate(int(f.Fd()), 0, 0, size)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return nil
	}
	return err
}

// freeBytes is the space an unprivileged writer may still use under dir.
func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// punchHole gives back the blocks of [off, off+n) and keeps the file's size:
// the range reads as zeros afterwards. A file system that cannot punch
// holes keeps the blocks (errors.ErrUnsupported).
func punchHole(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return errors.ErrUnsupported
	}
	return err
}

// allocatedBytes is the disk space a file holds (its blocks), not its size:
// a partial blob whose unwritten pieces were punched out holds what was
// written.
func allocatedBytes(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
