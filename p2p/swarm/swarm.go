// Package swarm runs blob downloads across the cluster. Its two roles are
// separate types: the Downloader fills this node's downloads (it finds each
// digest's owner by rendezvous hashing over the live members, registers with
// it to learn which peers have pieces, follows those peers' piece metadata
// and host state, and feeds them as parents to the collector; only the owner,
// or when it cannot be reached the next in rank, and at last anyone, goes to
// the upstream); the Server is this node's side for its peers (the tracker of
// the digests it owns, and what it has of each blob). Both reach other nodes
// only through Transport, so a simulated network can run them unchanged.
package swarm

import (
	"context"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// Transport reaches other nodes: *transfer.Pool over gRPC and HTTP.
type Transport interface {
	// Register asks the owner at addr for the nodes that have a digest's
	// pieces, and has it fetch the blob.
	Register(ctx context.Context, addr string, req *pb.RegisterRequest) (*pb.RegisterResponse, error)
	// Watch follows the pieces the node at addr has of d until the stream
	// ends; nil when the node said the blob is complete.
	Watch(ctx context.Context, addr string, d digest.Digest, self string, fn func(*pb.PieceUpdate)) error
	// Parent is the node at addr as a collector parent for d.
	Parent(id, addr string, d digest.Digest) collector.Parent
}

// Members lists the cluster's live members, this node included;
// *membership.Membership is one.
type Members interface {
	Members() []membership.Member
}

// Follower follows a parent's host state; *statesync.Syncer is one.
type Follower interface {
	Follow(id, addr string)
}

// RegistryChecker says whether this node may fetch a repository of a
// registry; *upstream.Client is one.
type RegistryChecker interface {
	CheckRepository(registry, repo string) error
}
