package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

// certCmd prints (or writes to --out-dir) a read-only client certificate
// for the peer port, derived from the cluster secret as the nodes derive
// theirs, for debugging clients such as grpcurl.
//
// It is short-lived (1h by default, 24h at most) because it is as strong as
// a node's for reading: any node of the cluster accepts it, it reads what
// the member it names reads, private blobs included, and nothing revokes it
// short of rotating the secret.
func certCmd(args []string, stdout io.Writer) error {
	fs := subFlags("cert")
	secret := fs.String("secret", "", "the cluster secret file the nodes use (p2p.secret_file); its first line signs, every line's CA goes in ca.pem")
	name := fs.String("name", "", "the node id the certificate names: a live member's, and the client must run on that member's address")
	valid := fs.Duration("valid", time.Hour, "how long the certificate lives, at most 24h: nothing revokes it but rotating the secret")
	outDir := fs.String("out-dir", "", "write cert.pem, key.pem (0600) and ca.pem into this directory instead of printing the certificate and key")
	if err := parseSub(fs, args, stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	switch {
	case *secret == "":
		return fmt.Errorf("cert: --secret FILE is required: the cluster secret file of the nodes: %w", errUsage)
	case *name == "":
		return fmt.Errorf("cert: --name is required: the node id of a live member, on whose address the client runs: %w", errUsage)
	case *valid <= 0 || *valid > trust.MaxClientCertValidity:
		return fmt.Errorf("cert: --valid %v: want more than 0 and at most 24h (nothing revokes the certificate): %w", *valid, errUsage)
	}
	if _, err := trust.ParseNodeID(*name); err != nil {
		return fmt.Errorf("cert: --name %q: %w: %w", *name, err, errUsage)
	}
	secrets, err := trust.ReadSecretFile(*secret)
	if err != nil {
		return fmt.Errorf("cert: --secret %s: %w: %w", *secret, err, errUsage)
	}
	c, err := trust.NewClientCert(secrets, *name, time.Now(), *valid)
	if err != nil {
		return fmt.Errorf("cert: %w", err)
	}
	if *outDir == "" {
		if _, err := stdout.Write(append(c.Cert, c.Key...)); err != nil {
			return fmt.Errorf("cert: %w", err)
		}
		return nil
	}
	if err := os.MkdirAll(*outDir, 0o700); err != nil {
		return fmt.Errorf("cert: --out-dir: %w", err)
	}
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{{"cert.pem", c.Cert, 0o644}, {"key.pem", c.Key, 0o600}, {"ca.pem", c.CA, 0o644}} {
		if err := writeFileAtomic(filepath.Join(*outDir, f.name), f.data, f.perm); err != nil {
			return fmt.Errorf("cert: %w", err)
		}
	}
	fmt.Fprintf(stdout, "wrote %s: cert.pem, key.pem, ca.pem: read-only certificate for node %q, valid until %s\n",
		*outDir, *name, c.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// writeFileAtomic replaces path with data at perm, whatever the mode of a
// file already there (a key must not end up world-readable).
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
