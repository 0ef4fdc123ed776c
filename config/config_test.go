package config

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// The documented config.toml must be exactly the built-in defaults.
func TestDocumentedDefaults(t *testing.T) {
	c, err := Load("../config.toml")
	if err != nil {
		t.Fatal(err)
	}
	if want := Default(); !reflect.DeepEqual(c, want) {
		t.Fatalf("config.toml differs from Default():\n got %+v\nwant %+v", c, want)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name, body, want string
	}{
		{"unknown key", "listn = \"x\"\n", "unknown keys: listn"},
		{"bad size", "[store]\nhigh_water = \"lots\"\n", "byte count"},
		{"bad duration", "[pieces]\ntimeout = \"soon\"\n", "timeout"},
		{"bad syntax", "listen = \n", "config"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.toml")
			os.WriteFile(p, []byte(tt.body), 0o644)
			_, err := Load(p)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Load = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		mut  func(*Config)
		want string
	}{
		{"log level", func(c *Config) { c.Log.Level = "loud" }, "log.level"},
		{"log format", func(c *Config) { c.Log.Format = "xml" }, "log.format"},
		{"registry url", func(c *Config) { c.Upstream.Registries["x"] = "ftp://x" }, "upstream.registries.x"},
		{"concurrency", func(c *Config) { c.Pieces.Concurrency = 0 }, "pieces.concurrency"},
		{"watermarks", func(c *Config) { c.Store.HighWater, c.Store.LowWater = 10, 20 }, "low_water"},
		{"timeout", func(c *Config) { c.Pieces.Timeout = 0 }, "pieces.timeout"},
		{"piece size", func(c *Config) { c.Pieces.MinSize = 3 << 20 }, "pieces.min_size"},
		{"piece size too small", func(c *Config) { c.Pieces.MinSize = 64 << 10 }, "pieces.min_size"},
		{"access mode", func(c *Config) { c.Access.Registries["r.test"] = RegistryAccess{Mode: "everyone"} }, `access.registries."r.test".mode`},
		{"access pattern", func(c *Config) {
			c.Access.Registries["r.test"] = RegistryAccess{Mode: "node", Repositories: []string{"org/[base"}}
		}, `access.registries."r.test".repositories`},
		{"access pattern absolute", func(c *Config) {
			c.Access.Registries["r.test"] = RegistryAccess{Mode: "node", Repositories: []string{"/org"}}
		}, "repository name pattern"},
		{"access pattern only **", func(c *Config) {
			c.Access.Registries["r.test"] = RegistryAccess{Mode: "node", Repositories: []string{"/**"}}
		}, "repository name pattern"},
		{"credential providers half set", func(c *Config) { c.Upstream.CredentialProviders.Config = "/etc/kubernetes/cp.yaml" }, "set config and bin_dir together"},
		{"credential providers timeout", func(c *Config) {
			c.Upstream.CredentialProviders = CredentialProviders{Config: "a", BinDir: "b"}
		}, "credential_providers.timeout"},
		{"peer_listen IPv6 without brackets", func(c *Config) { c.P2P.PeerListen, c.P2P.Insecure = "fd00::5:5002", true }, `p2p.peer_listen "fd00::5:5002": want HOST:PORT`},
		{"peer_listen without port", func(c *Config) { c.P2P.PeerListen, c.P2P.Insecure = "10.0.0.5", true }, "p2p.peer_listen"},
		{"peer_listen wildcard", func(c *Config) { c.P2P.PeerListen, c.P2P.Insecure = ":5002", true }, `p2p.peer_listen ":5002" is a wildcard: set p2p.advertise`},
		{"peer_listen IPv4 wildcard", func(c *Config) { c.P2P.PeerListen, c.P2P.Insecure = "0.0.0.0:5002", true }, "is a wildcard"},
		{"peer_listen IPv6 wildcard", func(c *Config) { c.P2P.PeerListen, c.P2P.Insecure = "[::]:5002", true }, "is a wildcard"},
		{"admin.listen IPv6 without brackets", func(c *Config) { c.Admin.Listen = "fd00::5:5001" }, `admin.listen "fd00::5:5001": want HOST:PORT`},
		{"listen without port", func(c *Config) { c.Listen = "127.0.0.1" }, "listen"},
		{"advertise IPv6 without brackets", func(c *Config) {
			c.P2P.PeerListen, c.P2P.Advertise, c.P2P.Insecure = ":5002", "fd00::5:5002", true
		}, "p2p.advertise"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.mut(&c)
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate = %v, want %q", err, tt.want)
			}
		})
	}
	// Addresses that work: IPv4 and IPv6 hosts, bracketed (as the chart
	// writes $(HOST_IP) for either family), a wildcard with advertise.
	for _, ok := range []struct{ listen, admin, peer, advertise string }{
		{"127.0.0.1:5000", "127.0.0.1:5001", "198.18.0.5:5002", ""},
		{"127.0.0.1:5000", "[198.18.0.5]:5001", "[198.18.0.5]:5002", ""},
		{"[::1]:5000", "[fd00::5]:5001", "[fd00::5]:5002", ""},
		{"localhost:5000", "", "node-1.example:5002", ""},
		{"127.0.0.1:5000", "127.0.0.1:5001", ":5002", "[fd00::5]:5002"},
		{"127.0.0.1:5000", "127.0.0.1:5001", "[::]:5002", "198.18.0.5:5002"},
	} {
		c := Default()
		c.Listen, c.Admin.Listen, c.P2P.PeerListen, c.P2P.Advertise, c.P2P.Insecure = ok.listen, ok.admin, ok.peer, ok.advertise, true
		if err := c.Validate(); err != nil {
			t.Errorf("%+v: %v", ok, err)
		}
	}
	c := Default()
	if err := c.SetUpstream("a.example=http://127.0.0.1:1"); err != nil || c.Upstream.Registries["a.example"] != "http://127.0.0.1:1" {
		t.Fatal(err)
	}
	for _, bad := range []string{"noequals", "=http://x", "x=notaurl"} {
		if err := c.SetUpstream(bad); err == nil {
			t.Errorf("SetUpstream(%q) accepted", bad)
		}
	}
}

func TestChanged(t *testing.T) {
	a := Default()
	for _, tc := range []struct {
		name string
		edit func(*Config)
		want []string
	}{
		{"nothing", func(*Config) {}, nil},
		{"nested and top level", func(c *Config) { c.Store.HighWater = 1; c.Log.Level = "debug"; c.Listen = ":1" }, []string{"listen", "log.level", "store.high_water"}},
		{"a map is one key", func(c *Config) { c.Upstream.Registries = map[string]string{"x": "http://x"} }, []string{"upstream.registries"}},
		{"two levels down", func(c *Config) { c.Upload.Syncer.Interval = time.Hour }, []string{"upload.syncer.interval"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := Default()
			tc.edit(&b)
			if got := Changed(a, b); !slices.Equal(got, tc.want) {
				t.Errorf("Changed = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLoadAccessAndCredentialProviders(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.toml")
	body := `[access.registries."ecr.test"]
mode = "node"
repositories = ["platform/**", "base-*"]

[upstream.credential_providers]
config = "/etc/kubernetes/credential-provider-config.yaml"
bin_dir = "/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec"
`
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Access.Registries["ecr.test"]; got.Mode != "node" || len(got.Repositories) != 2 || got.Repositories[0] != "platform/**" {
		t.Errorf("access.registries: %+v", c.Access.Registries)
	}
	if cp := c.Upstream.CredentialProviders; cp.BinDir == "" || cp.Timeout != 10*time.Second {
		t.Errorf("credential_providers: %+v, want the default timeout kept", cp)
	}
}
