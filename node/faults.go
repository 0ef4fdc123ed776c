//go:build !faults

package node

import (
	"log/slog"

	"github.com/registry-proxy/registry-proxy/p2p/peer"
)

// injectedFaults: none in a production build. A binary built with
// -tags faults reads them from REGISTRY_PROXY_FAULTS (faults_inject.go).
func injectedFaults(*slog.Logger) (f peer.Faults, inflateState bool) { return f, false }
