package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestContainerdConfigDistribution: --distribution picks the paths that
// are not given, and the decision is the output's last word.
func TestContainerdConfigDistribution(t *testing.T) {
	fixture := filepath.Join("..", "..", "clientconfig", "testdata", "k3s-v3.toml")
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"k3s paths", []string{"--distribution", "k3s", "--containerd-config", fixture},
			[]string{"--- /var/lib/rancher/k3s/agent/etc/containerd/certs.d/_default/hosts.toml",
				`decided: ` + fixture + ` sets config_path = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"`}},
		{"rke2 paths, no file", []string{"--distribution", "rke2", "--containerd-config", filepath.Join(t.TempDir(), "none.toml")},
			[]string{"--- /var/lib/rancher/rke2/agent/etc/containerd/certs.d/_default/hosts.toml", "written by rke2", "decided: containerd does not read"}},
		// The chart's defaults on a k3s node: detected from the file.
		{"auto, k3s file", []string{"--containerd-config", fixture, "--config-path", "/etc/containerd/certs.d"},
			[]string{"--- /etc/containerd/certs.d/_default/hosts.toml", "written by k3s", "use --config-path /var/lib/rancher/k3s/agent/etc/containerd/certs.d"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := containerdConfig(append([]string{"--dry-run"}, tt.args...), &out); err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
		})
	}
	if err := containerdConfig([]string{"--dry-run", "--distribution", "kind"}, &bytes.Buffer{}); !errors.Is(err, errUsage) {
		t.Errorf("unknown distribution: %v", err)
	}
	// A config file that is not TOML fails the command.
	bad := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(bad, []byte("[[["), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := containerdConfig([]string{"--dry-run", "--containerd-config", bad, "--config-path", "/x"}, &bytes.Buffer{}); err == nil {
		t.Error("a broken containerd config passed")
	}
}
