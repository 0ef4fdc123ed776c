// Package config loads and checks registry-proxy's configuration. The keys
// are documented once, in config.toml at the repository root.
package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// Config is the whole configuration.
type Config struct {
	Listen          string        `toml:"listen"`
	DataDir         string        `toml:"data_dir"`
	DefaultRegistry string        `toml:"default_registry"`
	ShutdownTimeout time.Duration `toml:"shutdown_timeout"`
	Log             Log           `toml:"log"`
	Upstream        Upstream      `toml:"upstream"`
	Manifests       Manifests     `toml:"manifests"`
	Pieces          Pieces        `toml:"pieces"`
	Store           Store         `toml:"store"`
	P2P             P2P           `toml:"p2p"`
	Upload          Upload        `toml:"upload"`
	Download        Download      `toml:"download"`
	Containerd      Containerd    `toml:"containerd"`
	Admin           Admin         `toml:"admin"`
	Access          Access        `toml:"access"`
	Limits          Limits        `toml:"limits"`
}

// Manifests is the [manifests] table.
type Manifests struct {
	StaleIfError time.Duration `toml:"stale_if_error"`
}

// Limits is the [limits] table.
type Limits struct {
	WriteStall           time.Duration `toml:"write_stall"`
	Tasks                int           `toml:"tasks"`
	TasksPerRegistry     int           `toml:"tasks_per_registry"`
	UpstreamConnsPerHost int           `toml:"upstream_conns_per_host"`
	ClientConns          int           `toml:"client_conns"`
	IdleDownload         time.Duration `toml:"idle_download"`
}

// DefaultContainerdAddress is containerd's usual socket: used when it
// exists at start.
const DefaultContainerdAddress = "/run/containerd/containerd.sock"

// Containerd is the [containerd] table.
type Containerd struct {
	Address      string        `toml:"address"`
	Namespaces   []string      `toml:"namespaces"`
	ContentDir   string        `toml:"content_dir"`
	ListInterval time.Duration `toml:"list_interval"`
}

// Admin is the [admin] table.
type Admin struct {
	Listen string `toml:"listen"`
	Pprof  bool   `toml:"pprof"`
}

// Access is the [access] table.
type Access struct {
	Check      bool                      `toml:"check"`
	TTL        time.Duration             `toml:"ttl"`
	PublicTTL  time.Duration             `toml:"public_ttl"`
	Registries map[string]RegistryAccess `toml:"registries"`
}

// RegistryAccess is one registry's entry of [access.registries]: whose
// credentials decide what a client without any may read.
type RegistryAccess struct {
	// Mode is "client" (the client's own credentials decide) or "node"
	// (a client without credentials is served what this node's can read).
	Mode string `toml:"mode"`
	// Repositories the mode applies to (patterns); empty: all of them.
	Repositories []string `toml:"repositories"`
}

// CredentialProviders is the [upstream.credential_providers] table:
// kubelet's image credential provider plugins as node credentials.
type CredentialProviders struct {
	Config  string        `toml:"config"`
	BinDir  string        `toml:"bin_dir"`
	Timeout time.Duration `toml:"timeout"`
}

// Credential is one registry's entry of [upstream.credentials].
type Credential struct {
	Username     string `toml:"username"`
	PasswordFile string `toml:"password_file"`
	TokenFile    string `toml:"token_file"`
}

// P2P is the [p2p] table.
type P2P struct {
	PeerListen string   `toml:"peer_listen"`
	Advertise  string   `toml:"advertise"`
	Join       []string `toml:"join"`
	NodeID     string   `toml:"node_id"`
	Selector   string   `toml:"selector"`
	MaxPeers   int      `toml:"max_peers"`
	SecretFile string   `toml:"secret_file"`
	Insecure   bool     `toml:"insecure"`
	// SharePrivate shares private content with members (the default).
	SharePrivate bool          `toml:"share_private"`
	AloneAfter   time.Duration `toml:"alone_after"`
	TLS          PeerTLS       `toml:"tls"`
}

// PeerTLS is the [p2p.tls] table: certificates from the operator's CA.
type PeerTLS struct {
	CA   string `toml:"ca"`
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
}

// Set reports whether operator certificates are configured.
func (t PeerTLS) Set() bool { return t.CA != "" || t.Cert != "" || t.Key != "" }

// Download is the [download] table.
type Download struct {
	Rate Size `toml:"rate"`
}

// Upload is the [upload] table.
type Upload struct {
	Limit     int    `toml:"limit"`
	Rate      Size   `toml:"rate"`
	MaxTx     Size   `toml:"max_tx"`
	MaxRx     Size   `toml:"max_rx"`
	Interface string `toml:"interface"`
	SuperSeed bool   `toml:"super_seed"`
	Syncer    Syncer `toml:"syncer"`
}

// Syncer is the [upload.syncer] table.
type Syncer struct {
	Enable   bool          `toml:"enable"`
	Interval time.Duration `toml:"interval"`
	Capacity int           `toml:"capacity"`
}

// Log is the [log] table.
type Log struct {
	Level  string `toml:"level"`
	Format string `toml:"format"`
}

// Upstream is the [upstream] table.
type Upstream struct {
	Registries            map[string]string     `toml:"registries"`
	Timeout               time.Duration         `toml:"timeout"`
	ResponseHeaderTimeout time.Duration         `toml:"response_header_timeout"`
	Attempts              int                   `toml:"attempts"`
	Backoff               time.Duration         `toml:"backoff"`
	RedirectTTL           time.Duration         `toml:"redirect_ttl"`
	MaxManifestSize       Size                  `toml:"max_manifest_size"`
	Allow                 []string              `toml:"allow"`
	DockerConfig          string                `toml:"docker_config"`
	Credentials           map[string]Credential `toml:"credentials"`
	CredentialProviders   CredentialProviders   `toml:"credential_providers"`
}

// Pieces is the [pieces] table.
type Pieces struct {
	Concurrency int           `toml:"concurrency"`
	Timeout     time.Duration `toml:"timeout"`
	Attempts    int           `toml:"attempts"`
	PerParent   int           `toml:"per_parent"`
	Upstream    int           `toml:"upstream"`
	Readers     int           `toml:"readers"`
	MinRate     Size          `toml:"min_rate"`
	RaceAfter   time.Duration `toml:"race_after"`
	MinSize     Size          `toml:"min_size"`
}

// Store is the [store] table.
type Store struct {
	HighWater     Size          `toml:"high_water"`
	LowWater      Size          `toml:"low_water"`
	MaxAge        time.Duration `toml:"max_age"`
	PartialMaxAge time.Duration `toml:"partial_max_age"`
	GCInterval    time.Duration `toml:"gc_interval"`
	MaxBlobSize   Size          `toml:"max_blob_size"`
}

// Size is a byte count written as "4MiB", "10GB" or a plain number.
type Size int64

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := units.RAMInBytes(string(b))
	if err != nil || v < 0 {
		return fmt.Errorf("size %q: want a byte count such as 512MiB or 20GiB", b)
	}
	*s = Size(v)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (s Size) MarshalText() ([]byte, error) { return []byte(units.BytesSize(float64(s))), nil }

// Default returns the built-in configuration, the same as config.toml.
func Default() Config {
	return Config{
		Listen:          "127.0.0.1:5000",
		DataDir:         "/var/lib/registry-proxy",
		DefaultRegistry: "docker.io",
		ShutdownTimeout: 25 * time.Second,
		Log:             Log{Level: "info", Format: "text"},
		Upstream: Upstream{
			Registries:            map[string]string{},
			Timeout:               time.Minute,
			ResponseHeaderTimeout: 30 * time.Second,
			Attempts:              3,
			Backoff:               200 * time.Millisecond,
			RedirectTTL:           time.Minute,
			MaxManifestSize:       4 << 20,
			Allow:                 DefaultAllow(),
			Credentials:           map[string]Credential{},
			CredentialProviders:   CredentialProviders{Timeout: 10 * time.Second},
		},
		Pieces: Pieces{Concurrency: 8, Timeout: time.Minute, Attempts: 3, PerParent: 1, Readers: 4, MinRate: 256 << 10, RaceAfter: 5 * time.Second, MinSize: Size(piece.MinSize)},
		Store:  Store{GCInterval: 5 * time.Minute, MaxBlobSize: 64 << 30, PartialMaxAge: 24 * time.Hour},
		P2P:    P2P{Join: []string{}, Selector: "state", MaxPeers: 32, AloneAfter: 10 * time.Second, SharePrivate: true},
		Upload: Upload{Limit: 16, SuperSeed: true, Syncer: Syncer{Enable: true, Interval: 3 * time.Second, Capacity: 50}},
		Containerd: Containerd{Address: DefaultContainerdAddress, Namespaces: []string{"k8s.io"},
			ContentDir: "/var/lib/containerd/io.containerd.content.v1.content", ListInterval: 10 * time.Second},
		Admin:     Admin{Listen: "127.0.0.1:5001"},
		Access:    Access{Check: true, TTL: time.Minute, PublicTTL: 24 * time.Hour, Registries: map[string]RegistryAccess{}},
		Manifests: Manifests{StaleIfError: 24 * time.Hour},
		Limits:    Limits{WriteStall: time.Minute, Tasks: 256, TasksPerRegistry: 128, UpstreamConnsPerHost: 64, ClientConns: 256, IdleDownload: 2 * time.Minute},
	}
}

// ValidRepositoryPattern checks one of access.registries' repository
// patterns: path.Match's syntax ("*" within one path segment), or a prefix
// ending in "/**" for every repository below it.
func ValidRepositoryPattern(p string) error {
	base := strings.TrimSuffix(p, "/**")
	if p == "" || base == "" || strings.HasPrefix(p, "/") {
		return fmt.Errorf("pattern %q: want a repository name pattern such as org/base-* or org/**", p)
	}
	if _, err := path.Match(base, ""); err != nil {
		return fmt.Errorf("pattern %q: %w", p, err)
	}
	return nil
}

// DefaultAllow is upstream.allow's default: the well-known public registries.
func DefaultAllow() []string {
	return []string{"docker.io", "registry-1.docker.io", "index.docker.io", "ghcr.io", "quay.io", "gcr.io", "*.gcr.io",
		"*.pkg.dev", "registry.k8s.io", "k8s.gcr.io", "public.ecr.aws", "mcr.microsoft.com", "nvcr.io", "registry.gitlab.com"}
}

// Load reads a TOML file over the defaults. Unknown keys are errors, so a
// typo does not silently leave a default in force.
func Load(path string) (Config, error) {
	c := Default()
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	md, err := toml.Decode(string(b), &c)
	if err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		sort.Strings(keys)
		return c, fmt.Errorf("config %s: unknown keys: %s", path, strings.Join(keys, ", "))
	}
	return c, nil
}

// Validate checks values that would only fail later.
func (c Config) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("listen: empty"))
	}
	// Addresses are HOST:PORT; an IPv6 host in brackets ("[fd00::5]:5002").
	for _, a := range [][2]string{{"listen", c.Listen}, {"admin.listen", c.Admin.Listen}, {"p2p.advertise", c.P2P.Advertise}} {
		if a[1] == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a[1]); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: want HOST:PORT, an IPv6 host in brackets: %w", a[0], a[1], err))
		}
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("data_dir: empty"))
	}
	if c.DefaultRegistry == "" {
		errs = append(errs, errors.New("default_registry: empty"))
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, errors.New("shutdown_timeout: must be positive"))
	}
	switch strings.ToLower(c.Log.Level) {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level %q: want debug, info, warn or error", c.Log.Level))
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		errs = append(errs, fmt.Errorf("log.format %q: want text or json", c.Log.Format))
	}
	for name, u := range c.Upstream.Registries {
		if _, err := upstream.ParseBaseURL(u); err != nil {
			errs = append(errs, fmt.Errorf("upstream.registries.%s: %w", name, err))
		}
	}
	if c.Upstream.Attempts < 1 || c.Pieces.Attempts < 1 {
		errs = append(errs, errors.New("attempts: at least 1"))
	}
	if c.Pieces.Concurrency < 1 || c.Pieces.Concurrency > 256 {
		errs = append(errs, fmt.Errorf("pieces.concurrency %d: want 1 to 256", c.Pieces.Concurrency))
	}
	if c.Pieces.PerParent < 1 || c.Pieces.PerParent > c.Pieces.Concurrency {
		errs = append(errs, fmt.Errorf("pieces.per_parent %d: want 1 to pieces.concurrency", c.Pieces.PerParent))
	}
	if c.Pieces.Upstream < 0 || c.Pieces.Upstream > c.Pieces.Concurrency {
		errs = append(errs, fmt.Errorf("pieces.upstream %d: want 0 (as pieces.concurrency) to pieces.concurrency", c.Pieces.Upstream))
	}
	if err := piece.ValidMin(int64(c.Pieces.MinSize)); err != nil {
		errs = append(errs, fmt.Errorf("pieces.min_size: %w", err))
	}
	if c.Pieces.Readers < 1 || c.Pieces.Readers > 64 {
		errs = append(errs, fmt.Errorf("pieces.readers %d: want 1 to 64", c.Pieces.Readers))
	}
	for k, d := range map[string]time.Duration{"upstream.timeout": c.Upstream.Timeout, "pieces.timeout": c.Pieces.Timeout, "store.gc_interval": c.Store.GCInterval} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s: must be positive", k))
		}
	}
	if c.P2P.Selector != "state" && c.P2P.Selector != "fcfs" {
		errs = append(errs, fmt.Errorf("p2p.selector %q: want state or fcfs", c.P2P.Selector))
	}
	if c.P2P.PeerListen != "" {
		host, _, err := net.SplitHostPort(c.P2P.PeerListen)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("p2p.peer_listen %q: want HOST:PORT, an IPv6 host in brackets: %w", c.P2P.PeerListen, err))
		case c.P2P.Advertise == "" && (host == "" || net.ParseIP(host).IsUnspecified()):
			// Members would be told to dial 0.0.0.0 or ::.
			errs = append(errs, fmt.Errorf("p2p.peer_listen %q is a wildcard: set p2p.advertise to the address peers reach", c.P2P.PeerListen))
		}
	}
	for _, j := range c.P2P.Join {
		addr := strings.TrimPrefix(j, "dns:")
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("p2p.join %q: want HOST:PORT or dns:NAME:PORT", j))
		}
	}
	if c.Upload.Limit < 1 || c.Upload.Syncer.Capacity < 1 || c.Upload.Syncer.Interval <= 0 || c.P2P.MaxPeers < 1 {
		errs = append(errs, errors.New("upload.limit, upload.syncer.capacity, upload.syncer.interval, p2p.max_peers: must be positive"))
	}
	if c.P2P.PeerListen != "" && c.P2P.SecretFile == "" && !c.P2P.TLS.Set() && !c.P2P.Insecure {
		errs = append(errs, errors.New("p2p.peer_listen is set without p2p.secret_file (--cluster-secret FILE) or p2p.tls: peers would be unauthenticated and in the clear; make a secret with `registry-proxy secret`, or set p2p.insecure = true"))
	}
	if t := c.P2P.TLS; t.Set() && (t.CA == "" || t.Cert == "" || t.Key == "") {
		errs = append(errs, errors.New("p2p.tls: set ca, cert and key together"))
	}
	for name, cr := range c.Upstream.Credentials {
		if (cr.PasswordFile == "") == (cr.TokenFile == "") {
			errs = append(errs, fmt.Errorf("upstream.credentials.%q: set one of password_file (with username) or token_file", name))
		}
		if cr.PasswordFile != "" && cr.Username == "" {
			errs = append(errs, fmt.Errorf("upstream.credentials.%q: password_file needs a username", name))
		}
	}
	if c.Limits.Tasks < 1 || c.Limits.TasksPerRegistry < 1 || c.Limits.UpstreamConnsPerHost < 1 || c.Limits.ClientConns < 1 || c.Limits.WriteStall <= 0 || c.Limits.IdleDownload <= 0 {
		errs = append(errs, errors.New("limits: every limit must be positive"))
	}
	if c.Access.Check && c.Access.TTL <= 0 {
		errs = append(errs, errors.New("access.ttl: must be positive"))
	}
	if !c.P2P.SharePrivate && !c.Access.Check {
		errs = append(errs, errors.New("p2p.share_private = false needs access.check = true: what is private is learnt by asking the registry"))
	}
	if c.Access.PublicTTL < 0 || c.Manifests.StaleIfError < 0 {
		errs = append(errs, errors.New("access.public_ttl, manifests.stale_if_error: must not be negative (0 turns them off)"))
	}
	for name, ra := range c.Access.Registries {
		if ra.Mode != "" && ra.Mode != "client" && ra.Mode != "node" {
			errs = append(errs, fmt.Errorf("access.registries.%q.mode %q: want client or node", name, ra.Mode))
		}
		for _, p := range ra.Repositories {
			if err := ValidRepositoryPattern(p); err != nil {
				errs = append(errs, fmt.Errorf("access.registries.%q.repositories: %w", name, err))
			}
		}
	}
	if cp := c.Upstream.CredentialProviders; cp.Config != "" || cp.BinDir != "" {
		if cp.Config == "" || cp.BinDir == "" {
			errs = append(errs, errors.New("upstream.credential_providers: set config and bin_dir together"))
		}
		if cp.Timeout <= 0 {
			errs = append(errs, errors.New("upstream.credential_providers.timeout: must be positive"))
		}
	}
	if c.Containerd.Address != "" && (len(c.Containerd.Namespaces) == 0 || slices.Contains(c.Containerd.Namespaces, "") || c.Containerd.ListInterval <= 0) {
		errs = append(errs, errors.New("containerd: namespaces must name at least one namespace, list_interval be positive"))
	}
	if c.Store.LowWater > c.Store.HighWater && c.Store.HighWater > 0 {
		errs = append(errs, errors.New("store.low_water: above high_water"))
	}
	return errors.Join(errs...)
}

// SetUpstream applies a NAME=URL flag value.
func (c *Config) SetUpstream(v string) error {
	name, u, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return fmt.Errorf("--upstream %q: want NAME=URL", v)
	}
	if _, err := upstream.ParseBaseURL(u); err != nil {
		return fmt.Errorf("--upstream %s: %w", name, err)
	}
	if c.Upstream.Registries == nil {
		c.Upstream.Registries = map[string]string{}
	}
	c.Upstream.Registries[name] = u
	return nil
}

// Changed lists the keys whose values differ between a and b, as dotted
// TOML paths ("store.high_water"), sorted; a table of its own keys
// (upstream.registries) counts as one key.
func Changed(a, b Config) []string {
	var out []string
	av, bv := reflect.ValueOf(a), reflect.ValueOf(b)
	leaves(av.Type(), "", nil, func(key string, index []int) {
		if !reflect.DeepEqual(av.FieldByIndex(index).Interface(), bv.FieldByIndex(index).Interface()) {
			out = append(out, key)
		}
	})
	sort.Strings(out)
	return out
}

// Keys lists every key, as dotted TOML paths; a table of the user's own
// keys (upstream.registries) is one key.
func Keys() []string {
	var out []string
	leaves(reflect.TypeFor[Config](), "", nil, func(key string, _ []int) { out = append(out, key) })
	return out
}

// leaves calls f with each key of the struct type t and its field index.
func leaves(t reflect.Type, prefix string, index []int, f func(key string, index []int)) {
	for i := range t.NumField() {
		field := t.Field(i)
		name := strings.Split(field.Tag.Get("toml"), ",")[0]
		if name == "" || name == "-" {
			continue
		}
		idx := append(slices.Clone(index), i)
		if field.Type.Kind() == reflect.Struct && field.Type != reflect.TypeFor[time.Duration]() {
			leaves(field.Type, prefix+name+".", idx, f)
			continue
		}
		f(prefix+name, idx)
	}
}
