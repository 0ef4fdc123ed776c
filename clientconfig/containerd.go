package clientconfig

import (
	"bytes"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"
)

// Distribution names who writes containerd's config.toml on a node.
type Distribution string

const (
	// Containerd: the operator or the node image writes it (kubeadm,
	// EKS, AKS, GKE).
	Containerd Distribution = "containerd"
	// K3s and RKE2 render it from their template at every start.
	K3s  Distribution = "k3s"
	RKE2 Distribution = "rke2"
)

// Layout is where a distribution keeps containerd's files on a node, as it
// sets them by default.
type Layout struct {
	Distribution Distribution
	// ConfigFile is containerd's config.toml.
	ConfigFile string
	// HostsDir is the registry config_path ConfigFile sets, or the one
	// to set.
	HostsDir   string
	Socket     string
	ContentDir string
	// Template is what to edit instead of ConfigFile, which the
	// distribution writes again at every start; "" for Containerd.
	Template string
}

// Layouts lists the layouts in the order auto-detection tries them: a
// k3s or RKE2 node may also carry an unused /etc/containerd.
func Layouts() []Layout {
	// k3s and RKE2 share the agent code: k3s-io/k3s pkg/agent/config
	// (config.go and config_linux.go) sets these under the data dir,
	// /var/lib/rancher/<program>, and the state dir /run/k3s/containerd.
	rancher := func(d Distribution) Layout {
		dir := "/var/lib/rancher/" + string(d) + "/agent"
		return Layout{
			Distribution: d,
			ConfigFile:   dir + "/etc/containerd/config.toml",
			HostsDir:     dir + "/etc/containerd/certs.d",
			Socket:       "/run/k3s/containerd/containerd.sock",
			ContentDir:   dir + "/containerd/io.containerd.content.v1.content",
			Template:     dir + "/etc/containerd/config-v3.toml.tmpl",
		}
	}
	return []Layout{rancher(K3s), rancher(RKE2), {
		Distribution: Containerd,
		ConfigFile:   "/etc/containerd/config.toml",
		HostsDir:     "/etc/containerd/certs.d",
		Socket:       "/run/containerd/containerd.sock",
		ContentDir:   "/var/lib/containerd/io.containerd.content.v1.content",
	}}
}

// LayoutOf returns d's layout.
func LayoutOf(d Distribution) (Layout, bool) {
	for _, l := range Layouts() {
		if l.Distribution == d {
			return l, true
		}
	}
	return Layout{}, false
}

// Verdict is whether containerd's CRI plugin (kubelet's and crictl's
// pulls) reads the hosts files under a directory.
type Verdict string

const (
	// Reads: it reads them for its next pull, without a restart.
	Reads Verdict = "reads"
	// Partly: some containerd versions that can read this config.toml
	// read them, others do not (Report.ByVersion says which).
	Partly Verdict = "partly"
	// NeedsConfigPath: it does not; config_path must name the directory,
	// and containerd be restarted.
	NeedsConfigPath Verdict = "needs config_path"
	// OtherPath: config_path names another directory (Report.Use).
	OtherPath Verdict = "other path"
)

// VersionReads is whether one range of containerd versions reads the
// directory with this config.toml.
type VersionReads struct {
	Versions string
	Reads    bool
	Why      string
}

// Report is what CheckContainerd decided, and why.
type Report struct {
	Distribution Distribution
	// Found: the config file was read; otherwise containerd runs on its
	// defaults (when the file is missing) or the file is elsewhere.
	Found bool
	// Version is the file's version key (1 when absent, 0 when !Found).
	Version int
	// V3 reports containerd 2.x plugin names (version 3, or a version 2
	// file already written with io.containerd.cri.v1.* sections).
	V3 bool
	// ConfigPath is config_path as the file sets it; "" when unset.
	ConfigPath string
	Verdict    Verdict
	// Use is the directory to pass as --config-path (OtherPath).
	Use       string
	ByVersion []VersionReads
	// Imports are the file's imports: drop-ins there may change
	// config_path and are not read here.
	Imports []string
}

// The CRI registry section, by plugin, with what decides whether CRI pulls
// go through the transfer service (containerd 2.1 and later) or the local
// client: internal/cri/config CheckLocalImagePullConfigs in containerd 2.x.
const (
	criImages = "io.containerd.cri.v1.images" // 2.x
	criGRPC   = "io.containerd.grpc.v1.cri"   // 1.x, and 2.x before migration
	criV1     = "cri"                         // version 1 files
)

// criSettings are the keys of one CRI plugin section that matter here.
type criSettings struct {
	Registry *struct {
		ConfigPath *string        `toml:"config_path"`
		Mirrors    map[string]any `toml:"mirrors"`
		Configs    map[string]any `toml:"configs"`
		Auths      map[string]any `toml:"auths"`
	} `toml:"registry"`
	UseLocalImagePull          *bool `toml:"use_local_image_pull"`
	DisableSnapshotAnnotations *bool `toml:"disable_snapshot_annotations"`
	DiscardUnpackedLayers      *bool `toml:"discard_unpacked_layers"`
	MaxConcurrentDownloads     *int  `toml:"max_concurrent_downloads"`
	ImagePullWithSyncFs        *bool `toml:"image_pull_with_sync_fs"`
	// Containerd is 1.x's [plugins."io.containerd.grpc.v1.cri".containerd],
	// whose snapshotter keys 2.x migrates into cri.v1.images.
	Containerd *struct {
		DisableSnapshotAnnotations *bool `toml:"disable_snapshot_annotations"`
		DiscardUnpackedLayers      *bool `toml:"discard_unpacked_layers"`
	} `toml:"containerd"`
}

// parseContainerd decodes the keys of containerd's config.toml that decide
// where CRI reads hosts files. Plugin sections are decoded one by one, so
// a plugin's keys of other types never fail the whole file.
func parseContainerd(b []byte) (version int, v3names bool, imports []string, plugins map[string]criSettings, err error) {
	var f struct {
		Version int                       `toml:"version"`
		Imports []string                  `toml:"imports"`
		Plugins map[string]toml.Primitive `toml:"plugins"`
	}
	md, err := toml.Decode(string(b), &f)
	if err != nil {
		return 0, false, nil, nil, fmt.Errorf("clientconfig: containerd config: %w", err)
	}
	plugins = map[string]criSettings{}
	for _, name := range []string{criImages, criGRPC, criV1} {
		p, ok := f.Plugins[name]
		if !ok {
			continue
		}
		var s criSettings
		if err := md.PrimitiveDecode(p, &s); err != nil {
			return 0, false, nil, nil, fmt.Errorf("clientconfig: containerd config: plugins.%q: %w", name, err)
		}
		plugins[name] = s
	}
	if f.Version == 0 {
		f.Version = 1
	}
	// 2.x plugin names: only 2.x reads the file, whatever its version
	// (AKS writes version 2 files with them for containerd 2).
	_, v3names = f.Plugins[criImages]
	if _, ok := f.Plugins["io.containerd.cri.v1.runtime"]; ok {
		v3names = true
	}
	return f.Version, v3names, f.Imports, plugins, nil
}

// pullMode is how one containerd version range resolves config_path.
type pullMode struct {
	configPath string // "" unset
	explicit   bool
	// split: config_path is a list (filepath.SplitList); false: one
	// directory, however many colons it holds.
	split   bool
	mirrors bool
	why     string
}

// view2x is containerd 2.x's CRI image settings after its migration of a
// version 1 or 2 file (plugins/cri/images/plugin.go migrateConfig: the
// registry and max_concurrent_downloads from grpc.v1.cri, the snapshotter
// keys from grpc.v1.cri.containerd, over cri.v1.images).
func view2x(version int, plugins map[string]criSettings) criSettings {
	s := plugins[criImages]
	if version >= 3 {
		return s
	}
	old, ok := plugins[criGRPC]
	if !ok {
		old, ok = plugins[criV1]
	}
	if !ok {
		return s
	}
	if old.Registry != nil {
		s.Registry = old.Registry
	}
	if old.MaxConcurrentDownloads != nil {
		s.MaxConcurrentDownloads = old.MaxConcurrentDownloads
	}
	if old.ImagePullWithSyncFs != nil {
		s.ImagePullWithSyncFs = old.ImagePullWithSyncFs
	}
	if old.Containerd != nil {
		if old.Containerd.DisableSnapshotAnnotations != nil {
			s.DisableSnapshotAnnotations = old.Containerd.DisableSnapshotAnnotations
		}
		if old.Containerd.DiscardUnpackedLayers != nil {
			s.DiscardUnpackedLayers = old.Containerd.DiscardUnpackedLayers
		}
	}
	return s
}

// localPull says why containerd 2.1 and later pull through the local
// client rather than the transfer service, "" when they use the transfer
// service (containerd 2.x internal/cri/config CheckLocalImagePullConfigs).
func localPull(s criSettings) string {
	switch {
	case s.UseLocalImagePull != nil && *s.UseLocalImagePull:
		return "use_local_image_pull = true"
	case s.DisableSnapshotAnnotations != nil && !*s.DisableSnapshotAnnotations:
		return "disable_snapshot_annotations = false"
	case s.DiscardUnpackedLayers != nil && *s.DiscardUnpackedLayers:
		return "discard_unpacked_layers = true"
	case s.Registry != nil && len(s.Registry.Mirrors) > 0:
		return "registry.mirrors"
	case s.Registry != nil && len(s.Registry.Configs) > 0:
		return "registry.configs"
	case s.Registry != nil && len(s.Registry.Auths) > 0:
		return "registry.auths"
	case s.MaxConcurrentDownloads != nil && *s.MaxConcurrentDownloads != 3:
		return "max_concurrent_downloads"
	case s.ImagePullWithSyncFs != nil && *s.ImagePullWithSyncFs:
		return "image_pull_with_sync_fs = true"
	}
	return ""
}

// defaultConfigPath is containerd 2.2's and later's config_path on Linux
// when neither config_path nor mirrors are set (plugins/cri/images).
const defaultConfigPath = "/etc/containerd/certs.d:/etc/docker/certs.d"

// CheckContainerd decides whether containerd's CRI plugin reads the hosts
// files under hostsDir, given its config.toml (found: false when it could
// not be read). dist forces the distribution; "" detects it from the
// file (k3s's and RKE2's header, or their paths).
func CheckContainerd(config []byte, found bool, file, hostsDir string, dist Distribution) (Report, error) {
	r := Report{Distribution: dist, Found: found}
	hostsDir = filepath.Clean(hostsDir)
	plugins := map[string]criSettings{}
	if found {
		var err error
		var v3names bool
		r.Version, v3names, r.Imports, plugins, err = parseContainerd(config)
		if err != nil {
			return r, err
		}
		r.V3 = v3names || r.Version >= 3
	}
	s2 := view2x(r.Version, plugins)
	if s2.Registry != nil && s2.Registry.ConfigPath != nil {
		r.ConfigPath = *s2.Registry.ConfigPath
	}
	s1, ok := plugins[criGRPC]
	if !ok {
		s1 = plugins[criV1]
	}
	if !r.V3 && s1.Registry != nil && s1.Registry.ConfigPath != nil {
		r.ConfigPath = *s1.Registry.ConfigPath
	}
	if r.Distribution == "" {
		r.Distribution = detect(config, file, r.ConfigPath)
	}

	// Each containerd version range that can load this file, and how
	// it resolves config_path.
	type versionMode struct {
		versions string
		mode     pullMode
	}
	var modes []versionMode
	mirrors2 := s2.Registry != nil && len(s2.Registry.Mirrors) > 0
	cp2, set2 := "", false
	if s2.Registry != nil && s2.Registry.ConfigPath != nil {
		cp2, set2 = *s2.Registry.ConfigPath, *s2.Registry.ConfigPath != ""
	}
	if !r.V3 {
		// 1.x pulls through its local client, splitting the list
		// (pkg/cri/server/image_pull.go registryHosts, 1.7).
		m := pullMode{split: true, why: "containerd 1.x splits config_path into a list"}
		if s1.Registry != nil && s1.Registry.ConfigPath != nil {
			m.configPath, m.explicit = *s1.Registry.ConfigPath, *s1.Registry.ConfigPath != ""
		}
		m.mirrors = s1.Registry != nil && len(s1.Registry.Mirrors) > 0
		modes = append(modes, versionMode{"1.x", m})
	}
	// 2.0 pulls through its local client, as 1.x.
	modes = append(modes, versionMode{"2.0", pullMode{configPath: cp2, explicit: set2, split: true, mirrors: mirrors2,
		why: "containerd 2.0 pulls through its local client, which splits config_path into a list"}})
	why := localPull(s2)
	transfer := pullMode{configPath: cp2, explicit: set2, split: why != "", mirrors: mirrors2}
	if why != "" {
		transfer.why = "this config sets " + why + ", so containerd 2.1 and later pull through their local client, which splits config_path into a list"
	} else {
		transfer.why = "containerd 2.1 and later pull through the transfer service, which takes config_path as one directory, not a list (containerd issue #12808)"
	}
	modes = append(modes, versionMode{"2.1", transfer})
	latest := transfer
	if !set2 && !mirrors2 {
		latest.configPath = defaultConfigPath
	}
	modes = append(modes, versionMode{"2.2 and later", latest})

	reads, other := 0, ""
	for _, vm := range modes {
		ok, why := readsDir(vm.mode, hostsDir)
		if ok {
			reads++
		} else if other == "" && vm.mode.explicit && !names(vm.mode.configPath, hostsDir) {
			other = firstDir(vm.mode)
		}
		r.ByVersion = append(r.ByVersion, VersionReads{Versions: vm.versions, Reads: ok, Why: why})
	}
	// Merge neighbouring ranges that agree, for shorter output.
	r.ByVersion = mergeVersions(r.ByVersion)
	switch {
	case reads == len(modes):
		r.Verdict = Reads
	case reads > 0:
		r.Verdict = Partly
	case other != "" && !strings.ContainsRune(other, filepath.ListSeparator):
		r.Verdict, r.Use = OtherPath, other
	default:
		r.Verdict = NeedsConfigPath
	}
	return r, nil
}

// readsDir says whether a pull in mode m reads hosts files under dir.
func readsDir(m pullMode, dir string) (bool, string) {
	cp := fmt.Sprintf("config_path = %q", m.configPath)
	if !m.explicit {
		cp = fmt.Sprintf("config_path defaults to %q", m.configPath)
	}
	switch {
	case m.configPath == "" && m.mirrors:
		return false, "config_path is unset and registry.mirrors is set: containerd uses those mirrors, not hosts files"
	case m.configPath == "":
		return false, "config_path is unset: containerd reads no hosts files"
	case !m.split:
		if filepath.Clean(m.configPath) == dir {
			return true, cp
		}
		if strings.ContainsRune(m.configPath, filepath.ListSeparator) {
			return false, fmt.Sprintf("%s, a list: %s", cp, m.why)
		}
		return false, cp + ", another directory"
	}
	dirs := filepath.SplitList(m.configPath)
	i := slices.IndexFunc(dirs, func(d string) bool { return filepath.Clean(d) == dir })
	switch {
	case i < 0:
		return false, cp + ", which does not name it"
	case len(dirs) == 1:
		return true, cp
	case i == 0:
		return true, fmt.Sprintf("%s, which names it first: %s", cp, m.why)
	}
	return true, fmt.Sprintf("%s, which names it after others (a registry with its own directory in an earlier one uses that): %s", cp, m.why)
}

// names reports whether config_path, one directory or a list, names dir.
func names(configPath, dir string) bool {
	return slices.ContainsFunc(filepath.SplitList(configPath), func(d string) bool { return filepath.Clean(d) == dir })
}

// firstDir is the directory containerd uses for hosts files in mode m.
func firstDir(m pullMode) string {
	if !m.split {
		return m.configPath
	}
	return filepath.SplitList(m.configPath)[0]
}

func mergeVersions(vs []VersionReads) []VersionReads {
	var out []VersionReads
	for _, v := range vs {
		if n := len(out); n > 0 && out[n-1].Reads == v.Reads && out[n-1].Why == v.Why {
			out[n-1].Versions = mergeRange(out[n-1].Versions, v.Versions)
			continue
		}
		out = append(out, v)
	}
	return out
}

// mergeRange joins "2.0" and "2.1" as "2.0 to 2.1", and "2.1" and "2.2
// and later" as "2.1 and later".
func mergeRange(a, b string) string {
	from, _, _ := strings.Cut(a, " to ")
	if to, ok := strings.CutSuffix(b, " and later"); ok && to != "" {
		return from + " and later"
	}
	return from + " to " + b
}

// detect names the distribution that wrote a config file: k3s and RKE2
// start it with "# File generated by <program>." (k3s-io/k3s
// pkg/agent/templates), and keep their files under /var/lib/rancher.
func detect(config []byte, file, configPath string) Distribution {
	line, _, _ := bytes.Cut(config, []byte("\n"))
	for _, d := range []Distribution{K3s, RKE2} {
		if strings.HasPrefix(string(line), "# File generated by "+string(d)+".") ||
			strings.HasPrefix(file, "/var/lib/rancher/"+string(d)+"/") ||
			strings.HasPrefix(configPath, "/var/lib/rancher/"+string(d)+"/") {
			return d
		}
	}
	return Containerd
}

// Explain is the report as the lines containerd-config prints: the
// decision first, then why, then what to do.
func (r Report) Explain(file, hostsDir string) []string {
	var out []string
	name := string(r.Distribution)
	by := "containerd's own configuration"
	if r.Distribution != Containerd {
		by = "written by " + name + " at every start"
	}
	switch {
	case !r.Found:
		out = append(out, fmt.Sprintf("cannot read %s (%s): containerd runs on its defaults if it has no config file", file, by))
	default:
		gen := "1.x or 2.x"
		if r.V3 {
			gen = "2.x"
		}
		out = append(out, fmt.Sprintf("%s: %s, version %d (containerd %s)", file, by, r.Version, gen))
	}
	switch r.Verdict {
	case Reads:
		out = append(out, fmt.Sprintf("decided: %s sets config_path = %q: containerd reads these files for its next pull; no restart needed", file, r.ConfigPath))
	case Partly:
		out = append(out, fmt.Sprintf("decided: only some containerd versions read %s with this config: set config_path = %q and restart containerd to be sure", hostsDir, hostsDir))
	case OtherPath:
		out = append(out, fmt.Sprintf("decided: %s sets config_path = %q, not %q: containerd will not read these files; use --config-path %s", file, r.ConfigPath, hostsDir, r.Use))
	case NeedsConfigPath:
		out = append(out, fmt.Sprintf("decided: containerd does not read %s: it needs config_path = %q and a restart", hostsDir, hostsDir))
	}
	// Why, by version, unless one reason holds for all.
	if r.Verdict != Reads || len(r.ByVersion) > 1 {
		for _, v := range r.ByVersion {
			word := "does not read"
			if v.Reads {
				word = "reads"
			}
			out = append(out, fmt.Sprintf("  containerd %s %s them: %s", v.Versions, word, v.Why))
		}
	}
	if r.Verdict == Partly || r.Verdict == NeedsConfigPath {
		out = append(out, r.advice(file, hostsDir)...)
	}
	for _, imp := range r.Imports {
		out = append(out, fmt.Sprintf("note: %s imports %s: a file there may set config_path too; it was not read here", file, imp))
	}
	if r.Distribution == K3s || r.Distribution == RKE2 {
		out = append(out, fmt.Sprintf("note: %s removes at each start the hosts directories it writes itself (those of registries.yaml, \"*\" being %s)"+
			" and those whose hosts.toml starts with its own header; ours are kept unless registries.yaml names the same registry", name, DefaultHost))
	}
	return out
}

func (r Report) advice(file, hostsDir string) []string {
	switch {
	case r.Distribution == K3s || r.Distribution == RKE2:
		l, _ := LayoutOf(r.Distribution)
		tmpl := filepath.Join(filepath.Dir(file), filepath.Base(l.Template))
		if r.Found && !r.V3 {
			tmpl = filepath.Join(filepath.Dir(file), "config.toml.tmpl")
		}
		return []string{
			fmt.Sprintf("%s writes %s from its template at every start: edits there are lost.", r.Distribution, file),
			fmt.Sprintf("Its own template sets config_path to its certs.d; a custom %s must keep that (extend the base template: {{ template \"base\" . }}),", tmpl),
			fmt.Sprintf("then restart %s. Add the mirror through registries.yaml instead if you cannot.", r.Distribution),
		}
	case !r.Found:
		return []string{
			"make sure containerd's config sets it (2.x, version 3):",
			ConfigPathAdvice(3, hostsDir),
			"or (1.x, version 2):",
			ConfigPathAdvice(2, hostsDir),
			"and restart containerd",
		}
	}
	v := 2
	if r.V3 {
		v = 3
	}
	lines := []string{fmt.Sprintf("add to %s:", file), ConfigPathAdvice(v, hostsDir)}
	if r.ConfigPath == "" && r.mirrorsSet() {
		lines = append(lines, "moving what registry.mirrors holds into hosts files (containerd refuses both),")
	}
	return append(lines, "and restart containerd")
}

func (r Report) mirrorsSet() bool {
	for _, v := range r.ByVersion {
		if strings.Contains(v.Why, "registry.mirrors is set") {
			return true
		}
	}
	return false
}

// ConfigPathAdvice says how to set config_path in a containerd config of
// the given version (2: containerd 1.x, 3: 2.x).
func ConfigPathAdvice(version int, configPath string) string {
	section := `[plugins."io.containerd.grpc.v1.cri".registry]`
	if version >= 3 {
		section = `[plugins."io.containerd.cri.v1.images".registry]`
	}
	return fmt.Sprintf("%s\n  config_path = %q", section, configPath)
}
