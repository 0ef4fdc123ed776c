package hoststate

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// SysCounters reads Linux's counters from /sys and statfs.
type SysCounters struct {
	Iface   string // network interface; the default route's when empty
	DataDir string
	// Root is prepended to /sys and /proc paths (tests).
	Root string
}

func (c SysCounters) path(p string) string { return filepath.Join(c.Root, p) }

func (c SysCounters) iface() (string, error) {
	if c.Iface != "" {
		return c.Iface, nil
	}
	f, err := os.Open(c.path("/proc/net/route"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 2 && fields[1] == "00000000" {
			return fields[0], nil
		}
	}
	return "", fmt.Errorf("no default route to name the peer interface; set it")
}

func (c SysCounters) readUint(p string) (uint64, error) {
	b, err := os.ReadFile(c.path(p))
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", p, err)
	}
	return uint64(max(v, 0)), nil
}

// Net implements Counters.
func (c SysCounters) Net(context.Context) (rx, tx uint64, err error) {
	ifc, err := c.iface()
	if err != nil {
		return 0, 0, err
	}
	if rx, err = c.readUint("/sys/class/net/" + ifc + "/statistics/rx_bytes"); err != nil {
		return 0, 0, err
	}
	tx, err = c.readUint("/sys/class/net/" + ifc + "/statistics/tx_bytes")
	return rx, tx, err
}

// LinkSpeed implements Counters: /sys/class/net/<if>/speed is in Mbit/s, and
// -1 or unreadable for virtual interfaces.
func (c SysCounters) LinkSpeed(context.Context) (uint64, error) {
	ifc, err := c.iface()
	if err != nil {
		return 0, err
	}
	mbps, err := c.readUint("/sys/class/net/" + ifc + "/speed")
	if err != nil {
		return 0, nil
	}
	return mbps * 1_000_000 / 8, nil
}

// DiskRead implements Counters from the block device's stat (sectors read,
// the third field, in 512-byte units).
func (c SysCounters) DiskRead(context.Context) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(c.DataDir, &st); err != nil {
		return 0, err
	}
	p := fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(st.Dev), unix.Minor(st.Dev))
	b, err := os.ReadFile(c.path(p))
	if err != nil {
		return 0, nil // overlay, tmpfs: no block device to read
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return 0, fmt.Errorf("%s: short", p)
	}
	sectors, err := strconv.ParseUint(f[2], 10, 64)
	return sectors * 512, err
}

// Free implements Counters.
func (c SysCounters) Free(context.Context) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(c.DataDir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}
