package clientconfig

import (
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// tree is every file under root with its content, and every directory as
// "<dir>".
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if e.IsDir() {
			out[rel] = "<dir>"
			return nil
		}
		b, err := os.ReadFile(p)
		out[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func writeFile(t *testing.T, p, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

func actions(steps []Step) string {
	var out []string
	for _, s := range steps {
		out = append(out, string(s.Action)+" "+filepath.Base(s.Path))
	}
	return strings.Join(out, ", ")
}

func TestInstallUninstall(t *testing.T) {
	const (
		reg     = "docker.io"
		mirror  = "http://127.0.0.1:5000"
		theirs  = "# the node's own\nserver = \"https://registry-1.docker.io\"\n\n[host.\"https://cache.example\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n"
		changed = "# changed by the operator after the install\nserver = \"https://registry-1.docker.io\"\n"
		other   = "server = \"https://ghcr.io\"\n"
	)
	hosts := filepath.Join(reg, "hosts.toml")
	backup := filepath.Join(reg, BackupFile)
	stateFile := filepath.Join(reg, StateFile)
	ourFile := HostsTOML(reg, mirror)
	// A node with a hosts.toml for another registry that is never ours.
	foreignOnly := map[string]string{"ghcr.io": "<dir>", "ghcr.io/hosts.toml": other}
	with := func(m map[string]string, kv ...string) map[string]string {
		out := maps.Clone(m)
		for i := 0; i < len(kv); i += 2 {
			out[kv[i]] = kv[i+1]
		}
		return out
	}

	type op struct {
		name string // install, uninstall, uninstall-dry, or a change: modify, delete
		arg  string // install: the mirror; modify: the new content
		// want: the actions taken, as "action base-name, ..."
		want string
	}
	tests := []struct {
		name  string
		setup map[string]string // files before, under the config path
		ops   []op
		after map[string]string // the config path at the end
	}{
		{
			name: "fresh directory",
			ops: []op{
				{name: "install", arg: mirror, want: "wrote hosts.toml"},
				{name: "uninstall", want: "removed hosts.toml, removed " + StateFile + ", removed docker.io"},
			},
			after: map[string]string{},
		},
		{
			name:  "existing foreign file",
			setup: with(foreignOnly, reg, "<dir>", hosts, theirs),
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "check", want: "hosts=ours backup=theirs"},
				{name: "uninstall", want: "restored hosts.toml, removed " + StateFile},
			},
			after: with(foreignOnly, reg, "<dir>", hosts, theirs),
		},
		{
			name:  "re-run keeps the original backup",
			setup: with(foreignOnly, reg, "<dir>", hosts, theirs),
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "install", arg: mirror, want: "unchanged hosts.toml"},
				{name: "install", arg: "http://127.0.0.1:6000", want: "wrote hosts.toml"},
				{name: "check", want: "backup=theirs"},
				{name: "uninstall", want: "restored hosts.toml, removed " + StateFile},
			},
			after: with(foreignOnly, reg, "<dir>", hosts, theirs),
		},
		{
			name:  "modified after write is left, with its backup",
			setup: map[string]string{reg: "<dir>", hosts: theirs},
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "modify", arg: changed},
				{name: "uninstall", want: "kept hosts.toml, removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>", hosts: changed, backup: theirs},
		},
		{
			name: "modified in a directory we created: the directory stays",
			ops: []op{
				{name: "install", arg: mirror, want: "wrote hosts.toml"},
				{name: "modify", arg: changed},
				{name: "uninstall", want: "kept hosts.toml, removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>", hosts: changed},
		},
		{
			name:  "modified after write, then installed again: the newer file is the backup",
			setup: map[string]string{reg: "<dir>", hosts: theirs},
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "modify", arg: changed},
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "uninstall", want: "restored hosts.toml, removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>", hosts: changed},
		},
		{
			name:  "put back by hand: the backup goes",
			setup: map[string]string{reg: "<dir>", hosts: theirs},
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "modify", arg: theirs},
				{name: "uninstall", want: "removed " + BackupFile + ", removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>", hosts: theirs},
		},
		{
			name:  "ours deleted: the original comes back",
			setup: map[string]string{reg: "<dir>", hosts: theirs},
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "delete"},
				{name: "uninstall", want: "restored hosts.toml, removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>", hosts: theirs},
		},
		{
			name:  "uninstall twice",
			setup: with(foreignOnly, reg, "<dir>", hosts, theirs),
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "uninstall", want: "restored hosts.toml, removed " + StateFile},
				{name: "uninstall", want: ""},
			},
			after: with(foreignOnly, reg, "<dir>", hosts, theirs),
		},
		{
			name:  "written by a version without state: ours, removed",
			setup: map[string]string{reg: "<dir>", hosts: ourFile},
			ops: []op{
				{name: "uninstall", want: "removed hosts.toml"},
			},
			after: map[string]string{reg: "<dir>"},
		},
		{
			name:  "written by a version without state, then installed: never backed up",
			setup: map[string]string{reg: "<dir>", hosts: HostsTOML(reg, "http://127.0.0.1:7000")},
			ops: []op{
				{name: "install", arg: mirror, want: "wrote hosts.toml"},
				{name: "uninstall", want: "removed hosts.toml, removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>"},
		},
		{
			name:  "dry run changes nothing",
			setup: map[string]string{reg: "<dir>", hosts: theirs},
			ops: []op{
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "uninstall-dry", want: "restored hosts.toml, removed " + StateFile},
				{name: "check", want: "hosts=ours backup=theirs"},
			},
			after: map[string]string{reg: "<dir>", hosts: ourFile, backup: theirs, stateFile: "<state>"},
		},
		{
			name: "a directory we created holding a backup is not removed",
			ops: []op{
				{name: "install", arg: mirror, want: "wrote hosts.toml"},
				{name: "modify", arg: changed},
				{name: "install", arg: mirror, want: "backed up " + BackupFile + ", wrote hosts.toml"},
				{name: "delete"},
				{name: "uninstall-dry", want: "restored hosts.toml, removed " + StateFile},
				{name: "uninstall", want: "restored hosts.toml, removed " + StateFile},
			},
			after: map[string]string{reg: "<dir>", hosts: changed},
		},
		{
			name: "dry run of a fresh directory names the directory",
			ops: []op{
				{name: "install", arg: mirror, want: "wrote hosts.toml"},
				{name: "uninstall-dry", want: "removed hosts.toml, removed " + StateFile + ", removed docker.io"},
			},
			after: map[string]string{reg: "<dir>", hosts: ourFile, stateFile: "<state>"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, p := range slices.Sorted(maps.Keys(tt.setup)) {
				if v := tt.setup[p]; v == "<dir>" {
					os.MkdirAll(filepath.Join(dir, p), 0o755)
				} else {
					writeFile(t, filepath.Join(dir, p), v, 0o600)
				}
			}
			for i, o := range tt.ops {
				var steps []Step
				var err error
				switch o.name {
				case "install":
					steps, err = WriteHosts(dir, o.arg, []string{reg})
				case "uninstall", "uninstall-dry":
					steps, err = Uninstall(dir, nil, o.name == "uninstall-dry")
				case "modify":
					writeFile(t, filepath.Join(dir, hosts), o.arg, 0o644)
					continue
				case "delete":
					if err := os.Remove(filepath.Join(dir, hosts)); err != nil {
						t.Fatal(err)
					}
					continue
				case "check":
					files := tree(t, dir)
					for _, w := range strings.Fields(o.want) {
						k, v, _ := strings.Cut(w, "=")
						want := map[string]string{"ours": ourFile, "theirs": theirs}[v]
						if got := files[map[string]string{"hosts": hosts, "backup": backup}[k]]; got != want {
							t.Errorf("op %d: %s is %q, want %s", i, k, got, v)
						}
					}
					continue
				}
				if err != nil {
					t.Fatalf("op %d %s: %v", i, o.name, err)
				}
				if got := actions(steps); got != o.want {
					t.Errorf("op %d %s: %q, want %q", i, o.name, got, o.want)
				}
			}
			got := tree(t, dir)
			if _, ok := got[stateFile]; ok {
				got[stateFile] = "<state>"
			}
			if !maps.Equal(got, tt.after) {
				t.Errorf("config path at the end:\n got %q\nwant %q", got, tt.after)
			}
		})
	}
}

// A restored hosts.toml is the original file: its mode too.
func TestUninstallRestoresMode(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "r.example", "hosts.toml")
	writeFile(t, p, "server = \"https://r.example\"\n", 0o600)
	if _, err := WriteHosts(dir, "http://m", []string{"r.example"}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o644 {
		t.Fatalf("ours has mode %v", fi.Mode())
	}
	if _, err := Uninstall(dir, []string{"r.example"}, false); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o600 {
		t.Errorf("restored with mode %v, want 0600", fi.Mode())
	}
}

// Uninstall with registries touches only those; a broken state file is an
// error for its directory, the others are still undone; a missing config
// path is nothing to do.
func TestUninstallRegistriesAndErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := WriteHosts(dir, "http://m", []string{"a.example", "b.example", "c.example"}); err != nil {
		t.Fatal(err)
	}
	steps, err := Uninstall(dir, []string{"a.example"}, false)
	if err != nil || actions(steps) != "removed hosts.toml, removed "+StateFile+", removed a.example" {
		t.Fatalf("Uninstall(a.example) = %s, %v", actions(steps), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "b.example", "hosts.toml")); err != nil {
		t.Fatalf("b.example undone too: %v", err)
	}
	writeFile(t, filepath.Join(dir, "b.example", StateFile), "{", 0o644)
	steps, err = Uninstall(dir, nil, false)
	if err == nil || !strings.Contains(err.Error(), StateFile) {
		t.Errorf("a broken state file: %v", err)
	}
	if actions(steps) != "removed hosts.toml, removed "+StateFile+", removed c.example" {
		t.Errorf("c.example not undone past b.example's error: %s", actions(steps))
	}
	if _, err := WriteHosts(dir, "http://m", []string{"b.example"}); err == nil {
		t.Error("installed over a broken state file")
	}
	if steps, err := Uninstall(filepath.Join(dir, "missing"), nil, false); err != nil || len(steps) != 0 {
		t.Errorf("missing config path: %v, %v", steps, err)
	}
	if _, err := Uninstall(dir, []string{"../x"}, false); err == nil {
		t.Error("a path accepted as a registry")
	}
}
