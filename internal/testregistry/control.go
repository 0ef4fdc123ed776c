package testregistry

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/docker/go-units"
)

// ControlHandler serves the registry's knobs and counters over HTTP, for a
// test driving a registry that runs in another process (cmd/testregistry
// --control, in a network namespace of its own). Serve it on a listener of
// its own: an outage does not touch it.
//
//	GET  /stats                          Stats as JSON
//	POST /reset                          ResetCounters
//	POST /outage?mode=refuse|close|hang| SetOutage (empty mode: up)
//	POST /down?on=true|false             SetDown (503 to everything)
//	POST /limit?n=N[&retry_after=30s]    SetManifestGetLimit, SetRetryAfter
//	POST /pace?bps=N                     SetPace (bytes a second a connection; 0: unpaced)
//	POST /private?repo=R&user=U&pass=P   SetRepoCredentials (no user: public)
//	POST /push?repo=R&tag=T[&layers=1MiB,512KiB][&seed=N]
//	           [&platforms=linux/amd64,linux/arm64][&format=oci|docker|image|docker-image]
//	                                     PushIndexSpec (oci, docker) or
//	                                     PushPlatformImage (image, docker-image);
//	                                     answers the Index or Image as JSON
//	POST /tag?repo=R&tag=T&digest=D      MoveTag
func (r *Registry) ControlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, r.Stats())
	})
	mux.HandleFunc("POST /reset", func(w http.ResponseWriter, _ *http.Request) {
		r.ResetCounters()
		writeJSON(w, r.Stats())
	})
	mux.HandleFunc("POST /outage", func(w http.ResponseWriter, req *http.Request) {
		if err := r.SetOutage(req.URL.Query().Get("mode")); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, r.Stats())
	})
	mux.HandleFunc("POST /down", func(w http.ResponseWriter, req *http.Request) {
		on, err := strconv.ParseBool(req.URL.Query().Get("on"))
		if err != nil {
			http.Error(w, "on: "+err.Error(), http.StatusBadRequest)
			return
		}
		r.SetDown(on)
		writeJSON(w, r.Stats())
	})
	mux.HandleFunc("POST /pace", func(w http.ResponseWriter, req *http.Request) {
		n, err := strconv.ParseInt(req.URL.Query().Get("bps"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "bps: want bytes a second a connection, 0 for unpaced", http.StatusBadRequest)
			return
		}
		r.SetPace(n)
		writeJSON(w, r.Stats())
	})
	mux.HandleFunc("POST /limit", func(w http.ResponseWriter, req *http.Request) {
		q := req.URL.Query()
		n, err := strconv.Atoi(q.Get("n"))
		if err != nil || n < 0 {
			http.Error(w, "n: want a count, 0 for none", http.StatusBadRequest)
			return
		}
		if ra := q.Get("retry_after"); ra != "" {
			d, err := parseSeconds(ra)
			if err != nil {
				http.Error(w, "retry_after: "+err.Error(), http.StatusBadRequest)
				return
			}
			r.SetRetryAfter(d)
		}
		r.SetManifestGetLimit(n)
		writeJSON(w, r.Stats())
	})
	mux.HandleFunc("POST /private", func(w http.ResponseWriter, req *http.Request) {
		q := req.URL.Query()
		if q.Get("repo") == "" {
			http.Error(w, "repo missing", http.StatusBadRequest)
			return
		}
		r.SetRepoCredentials(q.Get("repo"), q.Get("user"), q.Get("pass"))
	})
	mux.HandleFunc("POST /push", func(w http.ResponseWriter, req *http.Request) {
		q := req.URL.Query()
		sp := IndexSpec{Repo: q.Get("repo"), Tag: q.Get("tag")}
		if sp.Repo == "" || sp.Tag == "" {
			http.Error(w, "repo and tag wanted", http.StatusBadRequest)
			return
		}
		if v := q.Get("layers"); v != "" {
			for _, f := range strings.Split(v, ",") {
				n, err := units.RAMInBytes(strings.TrimSpace(f))
				if err != nil || n < 0 {
					http.Error(w, fmt.Sprintf("layers: %q: %v", f, err), http.StatusBadRequest)
					return
				}
				sp.Layers = append(sp.Layers, n)
			}
		}
		if v := q.Get("seed"); v != "" {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				http.Error(w, "seed: "+err.Error(), http.StatusBadRequest)
				return
			}
			sp.Seed = n
		}
		if v := q.Get("platforms"); v != "" {
			sp.Platforms = strings.Split(v, ",")
		}
		var out any
		var err error
		switch f := q.Get("format"); f {
		case "", "oci", "docker":
			sp.Docker = f == "docker"
			out, err = r.PushIndexSpec(req.Context(), sp)
		case "image", "docker-image":
			if len(sp.Layers) == 0 {
				sp.Layers = []int64{1 << 20, 512 << 10}
			}
			out, err = r.PushPlatformImage(req.Context(), sp.Repo, sp.Tag, sp.Layers, sp.Seed, f == "docker-image")
		default:
			err = fmt.Errorf("format %q: want oci, docker, image or docker-image", f)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("POST /tag", func(w http.ResponseWriter, req *http.Request) {
		q := req.URL.Query()
		if err := r.MoveTag(req.Context(), q.Get("repo"), q.Get("tag"), q.Get("digest")); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
	})
	return mux
}

// parseSeconds reads "30" (seconds) or a duration ("30s", "2m").
func parseSeconds(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(s)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}
