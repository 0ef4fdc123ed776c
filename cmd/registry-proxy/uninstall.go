package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/signal"
	"syscall"
	"time"

	"github.com/registry-proxy/registry-proxy/clientconfig"
	"github.com/registry-proxy/registry-proxy/uninstallwait"
)

// containerdUninstall prints each step of clientconfig.Uninstall; a
// directory it could not undo makes the exit status 1, after the others.
func containerdUninstall(configPath string, registries []string, dryRun bool, stdout io.Writer) error {
	steps, err := clientconfig.Uninstall(configPath, registries, dryRun)
	prefix := ""
	if dryRun {
		prefix = "(dry run) "
	}
	for _, s := range steps {
		fmt.Fprintln(stdout, prefix+s.String())
	}
	switch {
	case err != nil:
		return err
	case len(steps) == 0:
		fmt.Fprintf(stdout, "nothing recorded under %s: containerd-config wrote nothing there, or it was undone already\n", configPath)
	case !dryRun:
		fmt.Fprintln(stdout, "containerd reads these files at its next pull: no restart needed")
	}
	return nil
}

// uninstallWaitCmd is the chart's post-delete hook: --serve in each node's
// cleanup pod (after its init container ran containerd-config --uninstall),
// --endpoint in the Job that waits for all of them.
func uninstallWaitCmd(args []string, stdout, stderr io.Writer) error {
	fs := subFlags("uninstall-wait")
	serveAddr := fs.String("serve", "", "answer the waiter on ADDR until SIGTERM (the cleanup pod, once containerd-config --uninstall ran)")
	endpoint := fs.String("endpoint", "", "HOST:PORT: the cleanup pods' headless Service; wait until every address answers")
	timeout := fs.Duration("timeout", 4*time.Minute, "with --endpoint: give up after this long (exit status 1)")
	rounds := fs.Int("rounds", 3, "with --endpoint: rounds in a row in which every address must answer")
	interval := fs.Duration("interval", 2*time.Second, "with --endpoint: time between rounds")
	if err := parseSub(fs, args, stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if (*serveAddr == "") == (*endpoint == "") {
		return fmt.Errorf("uninstall-wait: give one of --serve and --endpoint: %w", errUsage)
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *serveAddr != "" {
		return uninstallwait.Serve(ctx, *serveAddr, log)
	}
	host, port, err := net.SplitHostPort(*endpoint)
	if err != nil || host == "" || port == "" {
		return fmt.Errorf("--endpoint %q: want HOST:PORT: %w", *endpoint, errUsage)
	}
	if *rounds < 1 || *interval <= 0 || *timeout <= 0 {
		return fmt.Errorf("--rounds, --interval and --timeout must be positive: %w", errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	w := uninstallwait.Waiter{Host: host, Port: port, Rounds: *rounds, Interval: *interval, Log: log}
	if err := w.Wait(ctx); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "containerd-config --uninstall ran on every node behind %s\n", host)
	return nil
}
