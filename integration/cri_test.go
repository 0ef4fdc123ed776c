package integration

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// criClient talks to a containerd's CRI plugin over its unix socket, as
// kubelet does.
type criClient struct {
	conn   *grpc.ClientConn
	images runtimeapi.ImageServiceClient
}

func dialCRI(t testing.TB, sock string) *criClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, MaxDelay: time.Second}}))
	if err != nil {
		t.Fatalf("CRI %s: %v", sock, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &criClient{conn: conn, images: runtimeapi.NewImageServiceClient(conn)}
}

// waitReady polls the image service until it answers, for at most within.
func (c *criClient) waitReady(ctx context.Context, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.images.ListImages(cctx, &runtimeapi.ListImagesRequest{})
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("CRI image service not up after %v: %w", within, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// kubeletAuth is the AuthConfig kubelet puts in a PullImageRequest for an
// image of registry (its host[:port] as the image reference names it): the
// pull secret's (or its credential provider's) username and password, and
// ServerAddress naming that registry, so that containerd gives them to that
// host only and never to a mirror of hosts.toml (CLIENTS.md, "Credentials
// through CRI"). containerd compares url.Parse(ServerAddress).Host with the
// host it contacts: a bare "host:port" does not parse as a URL (and a bare
// "host" parses with an empty Host, matching nothing), so the address
// carries a scheme, which the comparison ignores.
func kubeletAuth(user, pass, registry string) *runtimeapi.AuthConfig {
	return &runtimeapi.AuthConfig{Username: user, Password: pass, ServerAddress: "https://" + registry}
}

// pull is kubelet's PullImage; it returns the image's id (its config digest).
func (c *criClient) pull(ctx context.Context, ref string, auth *runtimeapi.AuthConfig) (string, error) {
	resp, err := c.images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}, Auth: auth})
	if err != nil {
		return "", err
	}
	return resp.GetImageRef(), nil
}

// remove is kubelet's RemoveImage: containerd deletes the last reference
// synchronously, its content and snapshots with it.
func (c *criClient) remove(ctx context.Context, ref string) error {
	_, err := c.images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	return err
}

// status is kubelet's ImageStatus: nil when the image is not there.
func (c *criClient) status(ctx context.Context, ref string) (*runtimeapi.Image, error) {
	resp, err := c.images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return nil, err
	}
	return resp.GetImage(), nil
}

// logBuffer collects a daemon's output for the test to read while it runs.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
