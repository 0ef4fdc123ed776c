package clientconfig

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/registry-proxy/registry-proxy/internal/atomicfile"
)

// The files containerd-config keeps beside each hosts.toml it writes, so
// that --uninstall removes exactly what it wrote and puts back what it
// replaced. containerd reads only hosts.toml in a registry's directory
// (and, without one, *.crt, *.cert and *.key): these names are never read.
const (
	StateFile  = "registry-proxy-state.json"
	BackupFile = "hosts.toml.registry-proxy-backup"
)

// header starts every hosts.toml containerd-config writes. A file that
// starts with it and has no StateFile beside it was written by a version
// that kept no state: it is ours, never backed up as someone else's.
const header = "# Written by registry-proxy containerd-config.\n"

// state is StateFile: what containerd-config did to one registry's
// directory.
type state struct {
	About string `json:"about"`
	// SHA256 is the digest of the hosts.toml written: a file that differs
	// was changed by someone else since.
	SHA256 string `json:"sha256"`
	// CreatedDir: the directory did not exist before; --uninstall removes
	// it when nothing else is left in it.
	CreatedDir bool `json:"created_dir"`
	// Backup: BackupFile holds the hosts.toml that ours replaced.
	Backup bool `json:"backup"`
}

const stateAbout = "written by registry-proxy containerd-config; `registry-proxy containerd-config --uninstall` undoes it"

// Action is what containerd-config did, or with dry-run would do, to a path.
type Action string

const (
	Wrote     Action = "wrote"
	Unchanged Action = "unchanged"
	// BackedUp: a hosts.toml containerd-config did not write was kept as
	// Step.Path (BackupFile) before ours replaced it.
	BackedUp Action = "backed up"
	Removed  Action = "removed"
	// Restored: the backup was put back as hosts.toml.
	Restored Action = "restored"
	// Kept: left as it is; Step.Note says why.
	Kept Action = "kept"
)

// Step is one thing done to one path.
type Step struct {
	Action Action
	Path   string
	Note   string
}

func (s Step) String() string {
	if s.Note == "" {
		return string(s.Action) + " " + s.Path
	}
	return fmt.Sprintf("%s %s (%s)", s.Action, s.Path, s.Note)
}

// CheckRegistry refuses a registry name that is not one directory name
// under config_path.
func CheckRegistry(r string) error {
	if r == "" || strings.ContainsAny(r, "/\\") || r == "." || r == ".." {
		return fmt.Errorf("clientconfig: registry %q: want a host[:port] or %s", r, DefaultHost)
	}
	return nil
}

// WriteHosts writes hosts.toml for each registry under configPath and
// records, beside each, what it wrote and whether it created the
// directory; a hosts.toml it did not write is kept as BackupFile first.
// Run again it changes nothing that is as it wrote it.
func WriteHosts(configPath, mirror string, registries []string) ([]Step, error) {
	var out []Step
	for _, r := range registries {
		if err := CheckRegistry(r); err != nil {
			return out, err
		}
		steps, err := writeHost(filepath.Join(configPath, r), HostsTOML(r, mirror))
		out = append(out, steps...)
		if err != nil {
			return out, fmt.Errorf("clientconfig: %s: %w", r, err)
		}
	}
	return out, nil
}

func writeHost(dir, content string) ([]Step, error) {
	hosts, backup := filepath.Join(dir, "hosts.toml"), filepath.Join(dir, BackupFile)
	st, hasState, err := readState(dir)
	if err != nil {
		return nil, err
	}
	cur, present, err := readOptional(hosts)
	if err != nil {
		return nil, err
	}
	sum := digest([]byte(content))
	if present && hasState && st.SHA256 == sum && string(cur) == content {
		return []Step{{Action: Unchanged, Path: hosts}}, nil
	}
	if !hasState {
		_, err := os.Stat(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		st = state{CreatedDir: err != nil}
		// A backup without a state: a run stopped between the two. The
		// backup's name is ours, so it holds what we replaced.
		if _, err := os.Lstat(backup); err == nil {
			st.Backup = true
		}
	}
	var steps []Step
	if present && !ours(cur, st, hasState) && !strings.HasPrefix(string(cur), header) {
		note := "the hosts.toml it replaces"
		switch {
		case hasState && st.Backup:
			// Changed since we wrote it, by the operator or another
			// tool: the newer file is what the node wants without the
			// mirror, so it becomes what --uninstall puts back.
			note = "hosts.toml was changed since containerd-config wrote it; it replaces the earlier backup"
		case hasState:
			note = "hosts.toml was changed since containerd-config wrote it"
		}
		if err := keepBackup(hosts, backup); err != nil {
			return nil, err
		}
		st.Backup = true
		steps = append(steps, Step{Action: BackedUp, Path: backup, Note: note})
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return steps, err
	}
	// The state first: a run stopped after it leaves a hosts.toml that
	// differs from the digest, which the next run writes again and
	// --uninstall reports as changed and never removes; the backup stays.
	st.About, st.SHA256 = stateAbout, sum
	if err := writeState(dir, st); err != nil {
		return steps, err
	}
	if present && string(cur) == content {
		return append(steps, Step{Action: Unchanged, Path: hosts}), nil
	}
	if err := atomicfile.Write(hosts, []byte(content), 0o644); err != nil {
		return steps, err
	}
	return append(steps, Step{Action: Wrote, Path: hosts}), nil
}

// ours reports whether cur is the hosts.toml st says we wrote.
func ours(cur []byte, st state, hasState bool) bool {
	return hasState && digest(cur) == st.SHA256
}

// keepBackup makes backup the file hosts is now: a hard link, so owner,
// mode and bytes stay those of the original and hosts.toml is never
// missing; a copy where links are not possible.
func keepBackup(hosts, backup string) error {
	tmp := filepath.Join(filepath.Dir(hosts), atomicfile.TempPrefix+BackupFile)
	os.Remove(tmp)
	if err := os.Link(hosts, tmp); err == nil {
		if err := os.Rename(tmp, backup); err != nil {
			os.Remove(tmp)
			return err
		}
		return atomicfile.SyncDir(filepath.Dir(hosts))
	}
	b, err := os.ReadFile(hosts)
	if err != nil {
		return err
	}
	fi, err := os.Stat(hosts)
	if err != nil {
		return err
	}
	return atomicfile.Write(backup, b, fi.Mode().Perm())
}

// Uninstall undoes WriteHosts for each registry, or for every registry
// directory under configPath it recorded when registries is empty: it
// removes each hosts.toml as it wrote it, puts back the one it replaced,
// and removes the directories it created once they are empty. A hosts.toml
// changed since it was written is left as it is (Kept), with its backup.
// dryRun reports the steps without taking them. It goes on past a
// directory it cannot undo and returns every error.
func Uninstall(configPath string, registries []string, dryRun bool) ([]Step, error) {
	if len(registries) == 0 {
		entries, err := os.ReadDir(configPath)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("clientconfig: %w", err)
		}
		for _, e := range entries {
			if e.IsDir() {
				registries = append(registries, e.Name())
			}
		}
	}
	var out []Step
	var errs []error
	for _, r := range registries {
		if err := CheckRegistry(r); err != nil {
			return out, err
		}
		steps, err := uninstallDir(filepath.Join(configPath, r), dryRun)
		out = append(out, steps...)
		if err != nil {
			errs = append(errs, fmt.Errorf("clientconfig: %s: %w", r, err))
		}
	}
	return out, errors.Join(errs...)
}

func uninstallDir(dir string, dryRun bool) ([]Step, error) {
	hosts, backup := filepath.Join(dir, "hosts.toml"), filepath.Join(dir, BackupFile)
	st, hasState, err := readState(dir)
	if err != nil {
		return nil, err
	}
	cur, present, err := readOptional(hosts)
	if err != nil {
		return nil, err
	}
	bak, hasBackup, err := readOptional(backup)
	if err != nil {
		return nil, err
	}
	legacy := !hasState && present && strings.HasPrefix(string(cur), header)
	if !hasState && !hasBackup && !legacy {
		return nil, nil // not ours
	}
	do := func(f func() error) error {
		if dryRun {
			return nil
		}
		return f()
	}
	var steps []Step
	gone := map[string]bool{} // names this run removes from dir
	restored := false
	switch {
	case (ours(cur, st, hasState) || legacy || !present) && hasBackup:
		if err := do(func() error { return os.Rename(backup, hosts) }); err != nil {
			return steps, err
		}
		gone[BackupFile], restored = true, true
		steps = append(steps, Step{Action: Restored, Path: hosts, Note: "from " + BackupFile})
	case ours(cur, st, hasState) || legacy:
		if err := do(func() error { return os.Remove(hosts) }); err != nil {
			return steps, err
		}
		gone["hosts.toml"] = true
		steps = append(steps, Step{Action: Removed, Path: hosts})
	case present && hasBackup && bytes.Equal(cur, bak):
		// Put back by hand already.
		if err := do(func() error { return os.Remove(backup) }); err != nil {
			return steps, err
		}
		gone[BackupFile] = true
		steps = append(steps, Step{Action: Removed, Path: backup, Note: "hosts.toml is the file it holds already"})
	case present:
		// Someone changed it after we wrote it: theirs now. Replacing
		// it with the backup would undo their change, removing it would
		// drop their settings; the backup stays for them to compare.
		note := "changed since containerd-config wrote it: left as it is"
		if hasBackup {
			note += "; the hosts.toml it had replaced is " + backup
		}
		steps = append(steps, Step{Action: Kept, Path: hosts, Note: note})
	}
	if hasState {
		if err := do(func() error { return os.Remove(filepath.Join(dir, StateFile)) }); err != nil {
			return steps, err
		}
		gone[StateFile] = true
		steps = append(steps, Step{Action: Removed, Path: filepath.Join(dir, StateFile)})
	}
	if st.CreatedDir {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return steps, err
		}
		left := slices.DeleteFunc(entries, func(e fs.DirEntry) bool { return gone[e.Name()] })
		if len(left) == 0 && !restored {
			if err := do(func() error { return os.Remove(dir) }); err != nil {
				return steps, err
			}
			steps = append(steps, Step{Action: Removed, Path: dir, Note: "the directory containerd-config created"})
		}
	}
	if !dryRun {
		if err := atomicfile.SyncDir(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return steps, err
		}
	}
	return steps, nil
}

func readOptional(path string) ([]byte, bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return b, true, nil
}

func readState(dir string) (state, bool, error) {
	var st state
	b, ok, err := readOptional(filepath.Join(dir, StateFile))
	if err != nil || !ok {
		return st, false, err
	}
	if err := json.Unmarshal(b, &st); err != nil || st.SHA256 == "" {
		return st, false, fmt.Errorf("%s: not a state file containerd-config wrote (%v); remove it to start afresh", filepath.Join(dir, StateFile), err)
	}
	return st, true, nil
}

func writeState(dir string, st state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, StateFile), append(b, '\n'), 0o644)
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
