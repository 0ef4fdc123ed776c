package clientconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	etcHosts  = "/etc/containerd/certs.d"
	k3sHosts  = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
	rke2Hosts = "/var/lib/rancher/rke2/agent/etc/containerd/certs.d"
)

// TestCheckContainerdAsWritten runs the check on each distribution's
// config.toml as it writes it (testdata/*.toml, each citing its source).
func TestCheckContainerdAsWritten(t *testing.T) {
	tests := []struct {
		file, hostsDir string
		dist           Distribution
		version        int
		v3             bool
		configPath     string
		verdict        Verdict
		use            string
		// in: a line of Explain's output that must appear.
		in []string
	}{
		// containerd 2.x's default: config_path unset. 2.2 and later
		// default it to a list that the transfer service, which CRI
		// pulls use unless an option forces the local client, reads as
		// one directory.
		{file: "containerd-2.4.2-default.toml", hostsDir: etcHosts, dist: Containerd, version: 4, v3: true,
			verdict: NeedsConfigPath, in: []string{
				`containerd 2.0 to 2.1 does not read them: config_path is unset`,
				`containerd 2.2 and later does not read them: config_path defaults to "/etc/containerd/certs.d:/etc/docker/certs.d", a list: containerd 2.1 and later pull through the transfer service`,
				`[plugins."io.containerd.cri.v1.images".registry]`,
				`note: testdata/containerd-2.4.2-default.toml imports /etc/containerd/conf.d/*.toml`}},
		{file: "containerd-1.7.35-default.toml", hostsDir: etcHosts, dist: Containerd, version: 2,
			verdict: NeedsConfigPath, in: []string{
				`containerd 1.x to 2.1 does not read them: config_path is unset`,
				`[plugins."io.containerd.grpc.v1.cri".registry]`}},
		// kubeadm: `containerd config default` with config_path set, as
		// containerd's docs/hosts.md says.
		{file: "kubeadm-containerd-1.7.35-certs.d.toml", hostsDir: etcHosts, dist: Containerd, version: 2,
			configPath: etcHosts, verdict: Reads, in: []string{`sets config_path = "/etc/containerd/certs.d": containerd reads these files`}},
		{file: "k3s-v3.toml", hostsDir: k3sHosts, dist: K3s, version: 3, v3: true, configPath: k3sHosts, verdict: Reads,
			in: []string{`written by k3s at every start, version 3`, `note: k3s removes at each start`}},
		// The chart's defaults on a k3s node: the files would go where
		// k3s's containerd never looks.
		{file: "k3s-v3.toml", hostsDir: etcHosts, dist: K3s, version: 3, v3: true, configPath: k3sHosts,
			verdict: OtherPath, use: k3sHosts, in: []string{`use --config-path ` + k3sHosts}},
		{file: "k3s-v2.toml", hostsDir: k3sHosts, dist: K3s, version: 2, configPath: k3sHosts, verdict: Reads},
		{file: "rke2-v3.toml", hostsDir: rke2Hosts, dist: RKE2, version: 3, v3: true, configPath: rke2Hosts, verdict: Reads},
		// EKS: a list, read because discard_unpacked_layers = true makes
		// every version pull through the local client.
		{file: "eks-al2023-v3.toml", hostsDir: etcHosts, dist: Containerd, version: 3, v3: true,
			configPath: "/etc/containerd/certs.d:/etc/docker/certs.d", verdict: Reads},
		{file: "eks-al2023-v2.toml", hostsDir: etcHosts, dist: Containerd, version: 2,
			configPath: "/etc/containerd/certs.d:/etc/docker/certs.d", verdict: Reads},
		{file: "aks-containerd2.toml", hostsDir: etcHosts, dist: Containerd, version: 2, v3: true, configPath: etcHosts, verdict: Reads},
		{file: "aks-containerd1.toml", hostsDir: etcHosts, dist: Containerd, version: 2, configPath: etcHosts, verdict: Reads},
		{file: "bottlerocket-k8s-containerd2.toml", hostsDir: etcHosts, dist: Containerd, version: 3, v3: true, verdict: NeedsConfigPath},
	}
	for _, tt := range tests {
		t.Run(tt.file+"@"+tt.hostsDir, func(t *testing.T) {
			path := filepath.Join("testdata", tt.file)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			// The file's path as the chart's init container sees it: the
			// distribution comes from the content.
			r, err := CheckContainerd(b, true, path, tt.hostsDir, "")
			if err != nil {
				t.Fatal(err)
			}
			if r.Distribution != tt.dist || r.Version != tt.version || r.V3 != tt.v3 || r.ConfigPath != tt.configPath ||
				r.Verdict != tt.verdict || r.Use != tt.use {
				t.Errorf("got %s version %d v3 %v config_path %q: %s %q\nwant %s version %d v3 %v config_path %q: %s %q",
					r.Distribution, r.Version, r.V3, r.ConfigPath, r.Verdict, r.Use,
					tt.dist, tt.version, tt.v3, tt.configPath, tt.verdict, tt.use)
			}
			out := strings.Join(r.Explain(path, tt.hostsDir), "\n")
			if !strings.Contains(out, "decided: ") {
				t.Errorf("no decision:\n%s", out)
			}
			for _, want := range tt.in {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}
		})
	}
}

// TestCheckContainerdModes covers what decides the pull mode and the
// version ranges, on small configs.
func TestCheckContainerdModes(t *testing.T) {
	const list = `"/etc/containerd/certs.d:/etc/docker/certs.d"`
	tests := []struct {
		name, config string
		found        bool
		verdict      Verdict
		use          string
		in           []string
	}{
		{name: "no config file", verdict: NeedsConfigPath, in: []string{
			"cannot read", `config_path is unset`, `or (1.x, version 2):`}},
		{name: "2.x, one directory", found: true, verdict: Reads,
			config: "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d/'\n"},
		{name: "2.x, a list, transfer service", found: true, verdict: Partly, in: []string{
			"containerd 2.0 reads them", "containerd 2.1 and later does not read them", "issue #12808"},
			config: "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = " + list + "\n"},
		{name: "2.x, a list, local client", found: true, verdict: Reads,
			config: "version = 3\n[plugins.'io.containerd.cri.v1.images']\nuse_local_image_pull = true\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = " + list + "\n"},
		// EKS with discard_unpacked_layers turned off, as Spegel's docs
		// ask: the list is then read by the transfer service.
		{name: "2.x, a list, layers kept", found: true, verdict: Partly,
			config: "version = 3\n[plugins.'io.containerd.cri.v1.images']\ndiscard_unpacked_layers = false\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = " + list + "\n"},
		{name: "2.x default, local client", found: true, verdict: Partly, in: []string{
			"containerd 2.0 to 2.1 does not read them", "containerd 2.2 and later reads them: config_path defaults to"},
			config: "version = 3\n[plugins.'io.containerd.cri.v1.images']\nmax_concurrent_downloads = 10\n"},
		{name: "list naming it second", found: true, verdict: Reads, in: nil,
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/docker/certs.d:/etc/containerd/certs.d\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndiscard_unpacked_layers = true\n"},
		{name: "another directory", found: true, verdict: OtherPath, use: "/etc/other",
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/other\"\n"},
		{name: "another list", found: true, verdict: OtherPath, use: "/etc/a",
			config: "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/a:/etc/b'\n"},
		// Bottlerocket's way: mirrors in config.toml, no config_path.
		{name: "mirrors", found: true, verdict: NeedsConfigPath, in: []string{"registry.mirrors is set", "moving what registry.mirrors holds"},
			config: "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry.mirrors.\"docker.io\"]\nendpoint = [\"http://127.0.0.1:5000\"]\n"},
		// A 1.x key 2.x migrates: the 1.x registry section wins.
		{name: "version 2 migrated", found: true, verdict: Reads,
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/x\"\n"},
		{name: "version 1", found: true, verdict: Reads,
			config: "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n"},
		// A plugin's keys of other types do not matter.
		{name: "odd plugin keys", found: true, verdict: NeedsConfigPath,
			config: "version = 3\n[plugins.'io.containerd.other']\nregistry = 3\ncontainerd = 'x'\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := CheckContainerd([]byte(tt.config), tt.found, "/etc/containerd/config.toml", etcHosts, "")
			if err != nil {
				t.Fatal(err)
			}
			out := strings.Join(r.Explain("/etc/containerd/config.toml", etcHosts), "\n")
			if r.Verdict != tt.verdict || r.Use != tt.use {
				t.Errorf("%s %q, want %s %q\n%s", r.Verdict, r.Use, tt.verdict, tt.use, out)
			}
			for _, want := range tt.in {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}
		})
	}
	if _, err := CheckContainerd([]byte("[[["), true, "x", etcHosts, ""); err == nil {
		t.Error("a broken config parsed")
	}
	if _, err := CheckContainerd([]byte("[plugins.'io.containerd.cri.v1.images']\nuse_local_image_pull = 'yes'\n"), true, "x", etcHosts, ""); err == nil {
		t.Error("a CRI key of the wrong type was accepted")
	}
}

// TestCheckContainerdDistribution: detection from the header, the paths,
// or the caller; the advice for k3s names its template.
func TestCheckContainerdDistribution(t *testing.T) {
	tests := []struct {
		name, config, file string
		force, want        Distribution
	}{
		{"header", "# File generated by rke2. DO NOT EDIT. Use config.toml.tmpl instead.\nversion = 3\n", "/host/containerd/config.toml", "", RKE2},
		{"file path", "version = 3\n", "/var/lib/rancher/k3s/agent/etc/containerd/config.toml", "", K3s},
		{"config_path", "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '" + rke2Hosts + "'\n", "/host/containerd/config.toml", "", RKE2},
		{"forced", "version = 3\n", "/host/containerd/config.toml", K3s, K3s},
		{"plain", "version = 3\n", "/etc/containerd/config.toml", "", Containerd},
	}
	for _, tt := range tests {
		r, err := CheckContainerd([]byte(tt.config), true, tt.file, k3sHosts, tt.force)
		if err != nil || r.Distribution != tt.want {
			t.Errorf("%s: %s, %v; want %s", tt.name, r.Distribution, err, tt.want)
		}
	}
	// A custom k3s template without config_path: edit the template,
	// not config.toml.
	r, _ := CheckContainerd([]byte("# File generated by k3s. DO NOT EDIT.\nversion = 3\n"), true, "/host/containerd/config.toml", k3sHosts, "")
	out := strings.Join(r.Explain("/host/containerd/config.toml", k3sHosts), "\n")
	if r.Verdict != NeedsConfigPath || !strings.Contains(out, "config-v3.toml.tmpl") || !strings.Contains(out, "restart k3s") {
		t.Errorf("k3s advice (%s):\n%s", r.Verdict, out)
	}
	for _, l := range Layouts() {
		if got, ok := LayoutOf(l.Distribution); !ok || got != l {
			t.Errorf("LayoutOf(%s) = %v, %v", l.Distribution, got, ok)
		}
		if filepath.Dir(l.HostsDir) != filepath.Dir(l.ConfigFile) {
			t.Errorf("%s: certs.d %s not beside %s", l.Distribution, l.HostsDir, l.ConfigFile)
		}
	}
}

func TestConfigPathAdvice(t *testing.T) {
	if a := ConfigPathAdvice(3, "/x"); !strings.Contains(a, "io.containerd.cri.v1.images") {
		t.Errorf("2.x advice %q", a)
	}
	if a := ConfigPathAdvice(2, "/x"); !strings.Contains(a, "io.containerd.grpc.v1.cri") {
		t.Errorf("1.x advice %q", a)
	}
}

// FuzzCheckContainerd: any file parses or fails cleanly, and a parsed one
// gets a decision.
func FuzzCheckContainerd(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.toml")
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = ':::'\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := CheckContainerd(b, true, "/etc/containerd/config.toml", etcHosts, "")
		if err != nil {
			return
		}
		if r.Verdict == "" || len(r.Explain("/etc/containerd/config.toml", etcHosts)) < 2 {
			t.Fatalf("no decision for %q: %+v", b, r)
		}
		if r.Verdict == OtherPath && (r.Use == "" || strings.ContainsRune(r.Use, filepath.ListSeparator)) {
			t.Fatalf("other path %q for %q", r.Use, b)
		}
	})
}
