// Package netlab builds a small network of test hosts on this machine: one
// network namespace per host, each joined by a veth pair to a bridge in the
// root namespace, addresses in 198.18.0.0/15 (the benchmarking range), and
// tc limits on each host's upload and download. Everything it creates carries
// the lab's random id in its name and is removed by Close.
package netlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Host is one namespace.
type Host struct {
	Name string // namespace name
	IP   string // address on the lab network
	veth string // root-side interface
}

// Lab is a set of hosts on one bridge.
type Lab struct {
	ID     string
	Bridge string
	// GatewayIP is the root namespace's address on the bridge: the test
	// process reaches the hosts through it.
	GatewayIP string

	mu    sync.Mutex
	hosts []*Host
}

// Limits are a host's rates in bytes/s (0: none) and added latency (which
// needs the kernel's sch_netem module).
type Limits struct {
	Up, Down int64
	Delay    time.Duration
}

func run(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// New creates the bridge, with 198.18.0.1/15 for the root namespace.
func New(ctx context.Context) (*Lab, error) {
	b := make([]byte, 3)
	rand.Read(b)
	id := hex.EncodeToString(b)
	l := &Lab{ID: id, Bridge: "rpbr" + id, GatewayIP: "198.18.0.1"}
	for _, c := range [][]string{
		{"ip", "link", "add", l.Bridge, "type", "bridge"},
		{"ip", "addr", "add", l.GatewayIP + "/15", "dev", l.Bridge},
		{"ip", "link", "set", l.Bridge, "up"},
	} {
		if err := run(ctx, c...); err != nil {
			l.Close()
			return nil, fmt.Errorf("netlab: %w", err)
		}
	}
	return l, nil
}

// AddHost creates host number i (from 1) with the given limits.
func (l *Lab) AddHost(ctx context.Context, i int, lim Limits) (*Host, error) {
	if i < 1 || i > 500 {
		return nil, fmt.Errorf("netlab: host number %d out of 1..500", i)
	}
	h := &Host{
		Name: fmt.Sprintf("rp-%s-%d", l.ID, i),
		IP:   fmt.Sprintf("198.18.%d.%d", 1+i/250, 1+i%250),
		veth: fmt.Sprintf("rv%s%d", l.ID, i),
	}
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	peer := h.veth + "p"
	cmds := [][]string{
		{"ip", "netns", "add", h.Name},
		{"ip", "link", "add", h.veth, "type", "veth", "peer", "name", peer},
		{"ip", "link", "set", peer, "netns", h.Name},
		{"ip", "link", "set", h.veth, "master", l.Bridge},
		{"ip", "link", "set", h.veth, "up"},
		{"ip", "-n", h.Name, "link", "set", peer, "name", "eth0"},
		{"ip", "-n", h.Name, "addr", "add", h.IP + "/15", "dev", "eth0"},
		{"ip", "-n", h.Name, "link", "set", "eth0", "up"},
		{"ip", "-n", h.Name, "link", "set", "lo", "up"},
	}
	// Upload: shaped on the host's eth0 egress. Download: shaped on the
	// root-side veth's egress, which is traffic towards the host.
	cmds = append(cmds, shape([]string{"ip", "netns", "exec", h.Name}, "eth0", lim.Up, lim.Delay)...)
	cmds = append(cmds, shape(nil, h.veth, lim.Down, 0)...)
	for _, c := range cmds {
		if err := run(ctx, c...); err != nil {
			return nil, fmt.Errorf("netlab: host %d: %w", i, err)
		}
	}
	return h, nil
}

// shape returns tc commands limiting dev's egress to rate bytes/s with an
// added delay.
func shape(prefix []string, dev string, rate int64, delay time.Duration) [][]string {
	if rate <= 0 && delay <= 0 {
		return nil
	}
	var cmds [][]string
	parent := "root"
	if delay > 0 {
		cmds = append(cmds, append(append([]string{}, prefix...), "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", fmt.Sprintf("%dus", delay.Microseconds())))
		parent = "parent 1:"
	}
	if rate > 0 {
		bits := rate * 8
		burst := max(rate/100, 32<<10) // 10 ms of traffic, at least 32 KiB
		args := append(append([]string{}, prefix...), "tc", "qdisc", "add", "dev", dev)
		args = append(args, strings.Fields(parent)...)
		args = append(args, "handle", "2:", "tbf", "rate", fmt.Sprintf("%dbit", bits), "burst", fmt.Sprint(burst), "latency", "50ms")
		cmds = append(cmds, args)
	}
	return cmds
}

// Command returns a command running inside host h.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.Name, name}, args...)...)
}

// Close deletes every namespace, veth and the bridge the lab made.
func (l *Lab) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l.mu.Lock()
	hosts := l.hosts
	l.hosts = nil
	l.mu.Unlock()
	var errs []error
	for _, h := range hosts {
		// Deleting the namespace deletes its end of the veth, and so the pair.
		if err := run(ctx, "ip", "netns", "del", h.Name); err != nil && !strings.Contains(err.Error(), "No such file") {
			errs = append(errs, err)
		}
		run(ctx, "ip", "link", "del", h.veth) // gone already in the usual case
	}
	if err := run(ctx, "ip", "link", "del", l.Bridge); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Leftovers lists namespaces and links of any lab still on the machine.
func Leftovers(ctx context.Context) ([]string, error) {
	var out []string
	for _, c := range [][]string{{"ip", "netns", "list"}, {"ip", "-o", "link", "show"}} {
		b, err := exec.CommandContext(ctx, c[0], c[1:]...).Output()
		if err != nil {
			return nil, err
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			for _, w := range f {
				w = strings.TrimSuffix(strings.Split(w, "@")[0], ":")
				if strings.HasPrefix(w, "rp-") || strings.HasPrefix(w, "rpbr") || strings.HasPrefix(w, "rv") && len(w) > 8 {
					out = append(out, w)
				}
			}
		}
	}
	return out, nil
}

// Do runs f on an OS thread moved into h's network namespace, so that the
// sockets f makes are the host's (and stay so, whichever thread uses them
// later); the thread moves back before it serves any other goroutine.
func (h *Host) Do(f func() error) error {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netlab: %w", err)
	}
	defer self.Close()
	ns, err := os.Open(filepath.Join("/run/netns", h.Name))
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netlab: host %s: %w", h.Name, err)
	}
	defer ns.Close()
	if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netlab: enter %s: %w", h.Name, err)
	}
	ferr := f()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread stays locked, and ends with this goroutine: it must
		// not run anything else in the host's namespace.
		return errors.Join(ferr, fmt.Errorf("netlab: leave %s: %w", h.Name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}
