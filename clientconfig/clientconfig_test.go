package clientconfig

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

func TestHostsTOML(t *testing.T) {
	tests := []struct{ registry, server string }{
		{"docker.io", "https://registry-1.docker.io"},
		{"ghcr.io", "https://ghcr.io"},
		{"registry.local:5000", "https://registry.local:5000"},
		{DefaultHost, ""},
	}
	for _, tt := range tests {
		var h struct {
			Server string `toml:"server"`
			Host   map[string]struct {
				Capabilities []string `toml:"capabilities"`
			} `toml:"host"`
		}
		if _, err := toml.Decode(HostsTOML(tt.registry, "http://127.0.0.1:5000"), &h); err != nil {
			t.Fatalf("%s: %v", tt.registry, err)
		}
		if h.Server != tt.server {
			t.Errorf("%s: server %q, want %q", tt.registry, h.Server, tt.server)
		}
		if c := h.Host["http://127.0.0.1:5000"].Capabilities; strings.Join(c, ",") != "pull,resolve" {
			t.Errorf("%s: capabilities %v", tt.registry, c)
		}
	}
}

func TestWriteHostsRefusesPaths(t *testing.T) {
	dir := t.TempDir()
	for _, bad := range []string{"../etc", "a/b", "", ".."} {
		if _, err := WriteHosts(dir, "http://m", []string{bad}); err == nil {
			t.Errorf("registry %q accepted", bad)
		}
	}
	steps, err := WriteHosts(dir, "http://m", []string{"docker.io", DefaultHost})
	if err != nil || len(steps) != 2 {
		t.Fatalf("WriteHosts = %v, %v", steps, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "docker.io", "hosts.toml")); err != nil {
		t.Fatal(err)
	}
}

func TestMergeDaemonJSON(t *testing.T) {
	tests := []struct {
		name, in string
		changed  bool
		mirrors  []string
	}{
		{"empty", "", true, []string{"http://m:5000"}},
		{"other keys kept", `{"log-level":"warn","insecure-registries":["r:5000"]}`, true, []string{"http://m:5000"}},
		{"existing mirrors kept, ours first", `{"registry-mirrors":["https://mirror.gcr.io"]}`, true, []string{"http://m:5000", "https://mirror.gcr.io"}},
		{"already there", `{"registry-mirrors":["http://m:5000/"]}`, false, []string{"http://m:5000/"}},
	}
	for _, tt := range tests {
		out, changed, err := MergeDaemonJSON([]byte(tt.in), "http://m:5000")
		if err != nil || changed != tt.changed {
			t.Fatalf("%s: changed %v, %v", tt.name, changed, err)
		}
		var m map[string]any
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		var got []string
		for _, v := range m["registry-mirrors"].([]any) {
			got = append(got, v.(string))
		}
		if strings.Join(got, ",") != strings.Join(tt.mirrors, ",") {
			t.Errorf("%s: mirrors %v, want %v", tt.name, got, tt.mirrors)
		}
		if strings.Contains(tt.in, "log-level") && m["log-level"] != "warn" {
			t.Errorf("%s: other keys lost: %s", tt.name, out)
		}
	}
	if _, _, err := MergeDaemonJSON([]byte("{"), "http://m"); err == nil {
		t.Error("broken JSON merged")
	}
}
