// Command registry-proxy is a node-local OCI registry mirror.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/registry-proxy/registry-proxy/clientconfig"
	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/inspect"
	"github.com/registry-proxy/registry-proxy/node"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/preheat"

	// CA roots compiled in, used where the host has none: the container
	// image has no base image.
	"github.com/registry-proxy/registry-proxy/task"
	_ "golang.org/x/crypto/x509roots/fallback"
)

const usage = `usage: registry-proxy <command> [flags]

commands:
  serve              run the mirror (registry-proxy serve --help for flags)
  containerd-config  write hosts.toml files pointing containerd at the mirror (--uninstall: undo that)
  docker-config      add the mirror to dockerd's registry-mirrors in daemon.json
  peers              the cluster's members, their host state and weights, refreshed like top
  status             this node's downloads in flight: progress and bytes by source
  preheat IMAGE...   have the cluster fetch images' blobs before a rollout, with progress and a table of nodes × blobs
  secret             print a new cluster secret (registry-proxy secret > FILE)
  uninstall-wait     the chart's post-delete hook: wait until containerd-config --uninstall ran on every node
  cert               print a short-lived read-only client certificate for the peer port (grpcurl), from the cluster secret
  version            print the version
`

// errUsage marks errors that exit with status 2.
var errUsage = errors.New("usage")

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, errUsage):
		fmt.Fprintln(os.Stderr, "registry-proxy:", strings.TrimSuffix(err.Error(), ": usage"))
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "registry-proxy:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("no command: %w", errUsage)
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "containerd-config":
		return containerdConfig(args[1:], stdout)
	case "docker-config":
		return dockerConfig(args[1:], stdout)
	case "peers", "status":
		return inspectCmd(args[0], args[1:], stdout)
	case "preheat":
		return preheatCmd(args[1:], stdout)
	case "cert":
		return certCmd(args[1:], stdout)
	case "uninstall-wait":
		return uninstallWaitCmd(args[1:], stdout, stderr)
	case "secret":
		if len(args) > 1 {
			return fmt.Errorf("secret takes no arguments: %w", errUsage)
		}
		fmt.Fprintln(stdout, trust.NewSecret())
		return nil
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "registry-proxy", node.Version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q: %w", args[0], errUsage)
}

// loadConfig reads --config (or the defaults) and applies the flags over it;
// check is --check-config: check them and exit.
func loadConfig(args []string, stderr io.Writer) (cfg config.Config, check bool, err error) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported in one line by main
	fs.Usage = func() {}
	path := fs.String("config", "", "configuration file (TOML); defaults as in config.toml when unset")
	checkOnly := fs.Bool("check-config", false, "check the configuration and flags as serve would, then exit: 0 when valid, else 2 with the error")
	listen := fs.String("listen", "", "mirror HTTP address (listen)")
	dataDir := fs.String("data-dir", "", "blob store directory (data_dir)")
	defReg := fs.String("default-registry", "", "registry for requests without ns=, as dockerd sends them (default_registry)")
	level := fs.String("log-level", "", "debug, info, warn or error (log.level)")
	format := fs.String("log-format", "", "text or json (log.format)")
	peerListen := fs.String("peer-listen", "", "peer address: pieces and gRPC; gossip on the next port (p2p.peer_listen)")
	join := fs.String("join", "", "comma-separated seeds: HOST:PORT peer addresses or dns:NAME:PORT (p2p.join)")
	nodeID := fs.String("node-id", "", "this node's name in the cluster, default the host name (p2p.node_id)")
	selector := fs.String("selector", "", "parent selection: state or fcfs (p2p.selector)")
	secret := fs.String("cluster-secret", "", "file holding the cluster secret: authenticates and encrypts peers (p2p.secret_file)")
	grace := fs.Duration("shutdown-timeout", 0, "how long a stopping node finishes client responses and uploads (shutdown_timeout)")
	admin := fs.String("admin-listen", "", "address of the operators' endpoints /debug/*, /healthz (admin.listen)")
	ctdAddress := fs.String("containerd-address", "", `containerd's socket, whose content store is served; "none": off (containerd.address)`)
	ctdContent := fs.String("containerd-content-dir", "", "containerd's content directory, read directly when readable (containerd.content_dir)")
	var ctdNamespaces []string
	fs.Func("containerd-namespace", "containerd namespace whose content is served (repeatable; containerd.namespaces)", func(v string) error {
		ctdNamespaces = append(ctdNamespaces, v)
		return nil
	})
	var upstreams []string
	fs.Func("upstream", "NAME=URL: fetch registry NAME from URL (repeatable; upstream.registries)", func(v string) error {
		upstreams = append(upstreams, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, "usage: registry-proxy serve [flags]")
			fs.SetOutput(stderr)
			fs.PrintDefaults()
			return config.Config{}, false, err
		}
		return config.Config{}, false, fmt.Errorf("%w: %w", err, errUsage)
	}
	if fs.NArg() > 0 {
		return config.Config{}, false, fmt.Errorf("unexpected argument %q: %w", fs.Arg(0), errUsage)
	}
	check = *checkOnly
	cfg = config.Default()
	if *path != "" {
		if cfg, err = config.Load(*path); err != nil {
			return cfg, check, fmt.Errorf("%w: %w", err, errUsage)
		}
	}
	for dst, v := range map[*string]string{&cfg.Listen: *listen, &cfg.DataDir: *dataDir, &cfg.DefaultRegistry: *defReg, &cfg.Log.Level: *level, &cfg.Log.Format: *format,
		&cfg.P2P.PeerListen: *peerListen, &cfg.P2P.NodeID: *nodeID, &cfg.P2P.Selector: *selector,
		&cfg.P2P.SecretFile: *secret, &cfg.Admin.Listen: *admin, &cfg.Containerd.ContentDir: *ctdContent} {
		if v != "" {
			*dst = v
		}
	}
	if *grace > 0 {
		cfg.ShutdownTimeout = *grace
	}
	switch *ctdAddress {
	case "":
	case "none":
		cfg.Containerd.Address = ""
	default:
		cfg.Containerd.Address = *ctdAddress
	}
	if len(ctdNamespaces) > 0 {
		cfg.Containerd.Namespaces = ctdNamespaces
	}
	if *join != "" {
		cfg.P2P.Join = strings.Split(*join, ",")
	}
	for _, u := range upstreams {
		if err := cfg.SetUpstream(u); err != nil {
			return cfg, check, fmt.Errorf("%w: %w", err, errUsage)
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, check, fmt.Errorf("config: %s: %w", strings.ReplaceAll(err.Error(), "\n", "; "), errUsage)
	}
	if cfg.P2P.SecretFile != "" {
		if _, err := trust.ReadSecretFile(cfg.P2P.SecretFile); err != nil {
			return cfg, check, fmt.Errorf("%w: %w", err, errUsage)
		}
	}
	return cfg, check, nil
}

func newLogger(c config.Log, lvl *slog.LevelVar, w io.Writer) *slog.Logger {
	lvl.UnmarshalText([]byte(c.Level)) // validated already
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func serve(args []string, stderr io.Writer) error {
	cfg, check, err := loadConfig(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if check {
		fmt.Fprintln(stderr, "registry-proxy: configuration valid")
		return nil
	}
	level := new(slog.LevelVar)
	log := newLogger(cfg.Log, level, stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	n, err := node.Start(ctx, cfg, log)
	if err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var serveErr error
wait:
	for {
		select {
		case <-hup:
			reload(n, args, level, log)
		case <-ctx.Done():
			log.Info("shutting down", "grace", cfg.ShutdownTimeout)
			break wait
		case serveErr = <-n.Err():
			break wait
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	return errors.Join(serveErr, n.Shutdown(sctx))
}

// reload reads the configuration again, with the same flags, and applies
// what may change while running; it says what needs a restart.
func reload(n *node.Node, args []string, level *slog.LevelVar, log *slog.Logger) {
	cfg, _, err := loadConfig(args, io.Discard)
	if err != nil {
		log.Error("SIGHUP: configuration not reloaded", "err", err)
		return
	}
	applied, restart, err := n.Reload(cfg)
	if err != nil {
		log.Error("SIGHUP: configuration not reloaded", "err", err)
		return
	}
	if slices.Contains(applied, "log.level") {
		level.UnmarshalText([]byte(cfg.Log.Level))
	}
	attrs := []any{"applied", applied}
	if len(restart) > 0 {
		attrs = append(attrs, "need_restart", restart)
		log.Warn("SIGHUP: configuration reloaded; some changed keys take effect only after a restart", attrs...)
		return
	}
	log.Info("SIGHUP: configuration reloaded", attrs...)
}

// subFlags is a flag set whose errors main reports in one line.
func subFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

func parseSub(fs *flag.FlagSet, args []string, stdout io.Writer) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stdout, "usage: registry-proxy %s [flags]\n", fs.Name())
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return err
		}
		return fmt.Errorf("%w: %w", err, errUsage)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: %w", fs.Arg(0), errUsage)
	}
	return nil
}

func containerdConfig(args []string, stdout io.Writer) error {
	fs := subFlags("containerd-config")
	configPath := fs.String("config-path", "/etc/containerd/certs.d", "containerd's registry config_path")
	mirror := fs.String("mirror", "http://127.0.0.1:5000", "the mirror's URL, as containerd reaches it")
	ctdConfig := fs.String("containerd-config", "/etc/containerd/config.toml", "containerd's config file, to check its config_path")
	distribution := fs.String("distribution", "auto", "who writes containerd's config: containerd, k3s or rke2, whose paths are then the defaults of --config-path and --containerd-config; auto: the first whose config file exists (k3s, rke2, containerd), and the config file's content says")
	dryRun := fs.Bool("dry-run", false, "print the files instead of writing them (with --uninstall: what it would do)")
	uninstall := fs.Bool("uninstall", false, "undo what containerd-config wrote under --config-path (for each --registry; default every registry it recorded): remove its hosts.toml files, put back those they replaced")
	var registries []string
	fs.Func("registry", "a registry to mirror (repeatable; default _default, every registry)", func(v string) error {
		registries = append(registries, v)
		return clientconfig.CheckRegistry(v)
	})
	if err := parseSub(fs, args, stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	forced, err := containerdLayout(fs, *distribution, configPath, ctdConfig)
	if err != nil {
		return err
	}
	if *uninstall {
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "mirror" || f.Name == "containerd-config" {
				err = fmt.Errorf("--%s has no meaning with --uninstall: %w", f.Name, errUsage)
			}
		})
		if err != nil {
			return err
		}
		return containerdUninstall(*configPath, registries, *dryRun, stdout)
	}
	if len(registries) == 0 {
		registries = []string{clientconfig.DefaultHost}
	}
	if *dryRun {
		for _, r := range registries {
			fmt.Fprintf(stdout, "--- %s\n%s", filepath.Join(*configPath, r, "hosts.toml"), clientconfig.HostsTOML(r, *mirror))
		}
	} else {
		steps, err := clientconfig.WriteHosts(*configPath, *mirror, registries)
		for _, s := range steps {
			fmt.Fprintln(stdout, s)
		}
		if err != nil {
			return err
		}
	}
	// Whether containerd reads what was written, decided from its config
	// file; the decision and its reasons are the output's last lines.
	b, err := os.ReadFile(*ctdConfig)
	found := err == nil
	if err != nil && !os.IsNotExist(err) {
		fmt.Fprintf(stdout, "%v\n", err)
	}
	r, err := clientconfig.CheckContainerd(b, found, *ctdConfig, *configPath, forced)
	if err != nil {
		return err
	}
	for _, l := range r.Explain(*ctdConfig, *configPath) {
		fmt.Fprintln(stdout, l)
	}
	return nil
}

// containerdLayout applies --distribution: a named one's paths become the
// defaults of --config-path and --containerd-config; auto picks the first
// layout whose config file exists, when neither flag is given. It returns
// the distribution named, "" for auto (then the config file says).
func containerdLayout(fs *flag.FlagSet, name string, configPath, ctdConfig *string) (clientconfig.Distribution, error) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var l clientconfig.Layout
	switch name {
	case "auto":
		if set["config-path"] || set["containerd-config"] {
			return "", nil
		}
		// The last layout, containerd's, when no config file exists.
		for _, l = range clientconfig.Layouts() {
			if _, err := os.Stat(l.ConfigFile); err == nil {
				break
			}
		}
	default:
		var ok bool
		if l, ok = clientconfig.LayoutOf(clientconfig.Distribution(name)); !ok {
			return "", fmt.Errorf("--distribution %q: want auto, containerd, k3s or rke2: %w", name, errUsage)
		}
	}
	if !set["config-path"] {
		*configPath = l.HostsDir
	}
	if !set["containerd-config"] {
		*ctdConfig = l.ConfigFile
	}
	if name == "auto" {
		return "", nil
	}
	return l.Distribution, nil
}

func dockerConfig(args []string, stdout io.Writer) error {
	fs := subFlags("docker-config")
	path := fs.String("daemon-json", "/etc/docker/daemon.json", "dockerd's daemon.json")
	mirror := fs.String("mirror", "http://127.0.0.1:5000", "the mirror's URL, as dockerd reaches it")
	dryRun := fs.Bool("dry-run", false, "print the result instead of writing it")
	if err := parseSub(fs, args, stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	out, changed, err := clientconfig.WriteDaemonJSON(*path, *mirror, *dryRun)
	switch {
	case err != nil:
		return err
	case *dryRun:
		stdout.Write(out)
	case changed:
		fmt.Fprintf(stdout, "added %s to registry-mirrors in %s; restart dockerd to apply (dockerd uses mirrors for Docker Hub images only)\n", *mirror, *path)
	default:
		fmt.Fprintf(stdout, "%s already lists %s in registry-mirrors\n", *path, *mirror)
	}
	return nil
}

// inspectCmd prints `peers` or `status` from a running node's admin listener.
func inspectCmd(name string, args []string, stdout io.Writer) error {
	fs := subFlags(name)
	admin := fs.String("admin", "127.0.0.1:5001", "the node's admin listener (admin.listen)")
	interval := fs.Duration("interval", 2*time.Second, "refresh period when stdout is a terminal")
	once := fs.Bool("once", false, "print once and exit (the default when stdout is not a terminal)")
	asJSON := fs.Bool("json", false, "print the admin listener's JSON once")
	if err := parseSub(fs, args, stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	base := *admin
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	c := inspect.Client{Base: base}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	render := func(w io.Writer) error {
		var v any
		var err error
		if name == "peers" {
			var ms []inspect.Member
			if ms, err = c.Members(ctx); err == nil && !*asJSON {
				return inspect.WritePeers(w, ms)
			}
			v = ms
		} else {
			var ts []task.Stats
			if ts, err = c.Tasks(ctx); err == nil && !*asJSON {
				return inspect.WriteStatus(w, ts, collector.UpstreamID)
			}
			v = ts
		}
		if err != nil {
			return err
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	return inspect.Watch(ctx, stdout, *interval, *once || *asJSON || !inspect.IsTerminal(stdout), render)
}

func preheatCmd(args []string, stdout io.Writer) error {
	fs := subFlags("preheat")
	admin := fs.String("admin", "127.0.0.1:5001", "the node's admin listener (admin.listen); it resolves the images with its own credentials")
	nodes := fs.String("nodes", "all", "how many nodes get the blobs (this one first), or all")
	platform := fs.String("platform", "", "os/arch[/variant] of an index's manifest to preheat (default the node's)")
	asJSON := fs.Bool("json", false, "print the node's events as JSON lines")
	var images []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprintln(stdout, "usage: registry-proxy preheat [flags] IMAGE...")
				fs.SetOutput(stdout)
				fs.PrintDefaults()
				return nil
			}
			return fmt.Errorf("%w: %w", err, errUsage)
		}
		if fs.NArg() == 0 {
			break
		}
		// Images and flags in any order.
		images, args = append(images, fs.Arg(0)), fs.Args()[1:]
	}
	req := preheat.Request{Images: images, Platform: *platform}
	if len(req.Images) == 0 {
		return fmt.Errorf("preheat: name at least one image: %w", errUsage)
	}
	if *nodes != "all" {
		n, err := strconv.Atoi(*nodes)
		if err != nil || n < 1 {
			return fmt.Errorf("preheat: --nodes %q: want a positive number or all: %w", *nodes, errUsage)
		}
		req.Nodes = n
	}
	base := *admin
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var view inspect.PreheatView
	enc := json.NewEncoder(stdout)
	live := !*asJSON && inspect.IsTerminal(stdout)
	errc := make(chan error, 1)
	go func() {
		errc <- inspect.Client{Base: base}.Preheat(ctx, req, func(e preheat.Event) {
			view.Add(e)
			if *asJSON {
				enc.Encode(e)
			}
		})
	}()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	lines := 0
	redraw := func() {
		var b strings.Builder
		view.WriteProgress(&b)
		if lines > 0 {
			fmt.Fprintf(stdout, "\x1b[%dA\x1b[J", lines) // back over the last frame
		}
		io.WriteString(stdout, b.String())
		lines = strings.Count(b.String(), "\n")
	}
	for {
		select {
		case err := <-errc:
			if err != nil {
				return err
			}
			if !*asJSON {
				redraw()
				fmt.Fprintln(stdout)
				view.WriteTable(stdout)
			}
			if n := view.Failed(); n > 0 {
				return fmt.Errorf("preheat: %d blob fetches failed", n)
			}
			return nil
		case <-tick.C:
			if live {
				redraw()
			}
		}
	}
}
