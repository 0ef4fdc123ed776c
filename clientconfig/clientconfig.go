// Package clientconfig writes the configuration that points containerd
// (hosts.toml under its config_path) and dockerd (registry-mirrors in
// daemon.json) at this node's mirror, keeping what else is there.
package clientconfig

import (
	"bytes"
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

// DefaultHost is the hosts directory for every registry without its own.
const DefaultHost = "_default"

// HostsTOML is the hosts.toml of one registry with mirror as its first host
// and the registry itself as the fallback (server). For _default the
// server is left out: containerd then falls back to the image's own
// registry.
func HostsTOML(registry, mirror string) string {
	var b strings.Builder
	b.WriteString(header)
	if registry != DefaultHost {
		server := "https://" + registry
		if registry == "docker.io" {
			server = "https://registry-1.docker.io"
		}
		fmt.Fprintf(&b, "server = %q\n", server)
	}
	fmt.Fprintf(&b, "\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror)
	return b.String()
}

// MergeDaemonJSON adds mirror to dockerd's registry-mirrors, first, keeping
// every other key and mirror as they were. It reports whether it changed.
func MergeDaemonJSON(in []byte, mirror string) ([]byte, bool, error) {
	m := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(in)) > 0 {
		if err := json.Unmarshal(in, &m); err != nil {
			return nil, false, fmt.Errorf("clientconfig: daemon.json: %w", err)
		}
	}
	var mirrors []string
	if raw, ok := m["registry-mirrors"]; ok {
		if err := json.Unmarshal(raw, &mirrors); err != nil {
			return nil, false, fmt.Errorf("clientconfig: daemon.json registry-mirrors: %w", err)
		}
	}
	norm := func(s string) string { return strings.TrimSuffix(s, "/") }
	if slices.ContainsFunc(mirrors, func(s string) bool { return norm(s) == norm(mirror) }) {
		out, err := json.MarshalIndent(m, "", "  ")
		return append(out, '\n'), false, err
	}
	mirrors = append([]string{mirror}, mirrors...)
	raw, _ := json.Marshal(mirrors)
	m["registry-mirrors"] = raw
	out, err := json.MarshalIndent(m, "", "  ")
	return append(out, '\n'), true, err
}

// WriteDaemonJSON merges mirror into the daemon.json at path (created when
// missing); dryRun returns the result without writing it.
func WriteDaemonJSON(path, mirror string, dryRun bool) ([]byte, bool, error) {
	in, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("clientconfig: %w", err)
	}
	out, changed, err := MergeDaemonJSON(in, mirror)
	if err != nil || dryRun || !changed {
		return out, changed, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, false, fmt.Errorf("clientconfig: %w", err)
	}
	if err := atomicfile.Write(path, out, 0o644); err != nil {
		return nil, false, fmt.Errorf("clientconfig: %w", err)
	}
	return out, true, nil
}
