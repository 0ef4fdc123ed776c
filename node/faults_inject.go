//go:build faults

package node

import (
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/registry-proxy/registry-proxy/p2p/peer"
)

// injectedFaults makes this node a lying member, for tests only:
// REGISTRY_PROXY_FAULTS is a comma-separated list of corrupt (flip a byte of
// every piece sent), complete (announce every blob as complete), inflate
// (report an idle 100 Gbit/s host) and trickle=BYTES (send pieces at
// BYTES/s).
func injectedFaults(log *slog.Logger) (f peer.Faults, inflateState bool) {
	spec := os.Getenv("REGISTRY_PROXY_FAULTS")
	for _, item := range strings.Split(spec, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(item), "=")
		switch k {
		case "":
		case "corrupt":
			f.CorruptPieces = true
		case "complete":
			f.ClaimComplete = true
		case "inflate":
			inflateState = true
		case "trickle":
			f.TrickleBps, _ = strconv.ParseInt(v, 10, 64)
		default:
			log.Error("unknown fault", "fault", k)
		}
	}
	if spec != "" {
		log.Warn("fault injection: this node lies to its peers", "faults", spec)
	}
	return f, inflateState
}
