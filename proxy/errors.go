package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/gorilla/mux"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/proxy/access"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// OCI distribution error codes.
const (
	codeBlobUnknown     = "BLOB_UNKNOWN"
	codeManifestUnknown = "MANIFEST_UNKNOWN"
	codeManifestInvalid = "MANIFEST_INVALID"
	codeNameInvalid     = "NAME_INVALID"
	codeNameUnknown     = "NAME_UNKNOWN"
	codeDigestInvalid   = "DIGEST_INVALID"
	codeUnauthorized    = "UNAUTHORIZED"
	codeDenied          = "DENIED"
	codeUnsupported     = "UNSUPPORTED"
	codeTooManyRequests = "TOOMANYREQUESTS"
	codeUnavailable     = "UNAVAILABLE"
	codeRangeInvalid    = "RANGE_INVALID"
)

type ociError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// writeError answers with an OCI error body.
func writeError(w http.ResponseWriter, status int, code, msg string) {
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Del("Content-Length")
	h.Del("Docker-Content-Digest")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(struct {
		Errors []ociError `json:"errors"`
	}{[]ociError{{Code: code, Message: msg}}})
}

// writeUpstreamError turns an error from fetching something upstream into the
// answer a client can act on: the registry's own 401 challenge so it fetches a
// token, 404 so it falls back, 502/504 when the upstream fails.
func (s *Server) writeUpstreamError(w http.ResponseWriter, r *http.Request, err error, unknown string) {
	var se *upstream.StatusError
	switch {
	case errors.As(err, &se):
		if (se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden) && mux.Vars(r)["name"] != "" {
			s.privateRefused(r, refusedRefused)
		}
		switch {
		case se.Code == http.StatusUnauthorized:
			for _, v := range se.Header.Values("WWW-Authenticate") {
				w.Header().Add("WWW-Authenticate", v)
			}
			writeError(w, se.Code, codeUnauthorized, "authentication required by the upstream registry")
		case se.Code == http.StatusForbidden:
			writeError(w, se.Code, codeDenied, "access denied by the upstream registry")
		case se.Code == http.StatusNotFound:
			writeError(w, se.Code, unknown, "not found upstream")
		case se.Code == http.StatusTooManyRequests:
			if ra := se.Header.Get("Retry-After"); ra != "" {
				w.Header().Set("Retry-After", ra)
			}
			writeError(w, se.Code, codeTooManyRequests, "the upstream registry is rate limiting")
		case se.Code >= 500:
			s.log.Warn("upstream failed", "method", r.Method, "path", r.URL.Path, "status", se.Code)
			writeError(w, http.StatusBadGateway, codeUnavailable, fmt.Sprintf("upstream registry answered %d", se.Code))
		default:
			writeError(w, se.Code, unknown, fmt.Sprintf("upstream registry answered %d", se.Code))
		}
	case errors.Is(err, access.ErrUnanswered):
		// Nothing says this client may read it: as if not here, so the
		// client tries its next host.
		writeError(w, http.StatusNotFound, unknown, "the registry cannot be asked whether this client may read it, and it was not allowed before")
	case errors.Is(err, upstream.ErrUnknownRegistry):
		// 404: the client falls back to its next host.
		s.log.Debug("registry not served", "ns", r.URL.Query().Get("ns"), "err", err)
		writeError(w, http.StatusNotFound, codeNameUnknown, "registry not served by this mirror")
	case errors.Is(err, upstream.ErrBadRepository):
		writeError(w, http.StatusBadRequest, codeNameInvalid, "invalid repository name")
	case errors.Is(err, upstream.ErrForbiddenAddress):
		s.log.Warn("refused to dial the upstream", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusBadGateway, codeUnavailable, "upstream address not allowed")
	case errors.Is(err, blobstore.ErrNoSpace):
		// A local failure: say so, so nobody looks for it upstream. 507 is a
		// 5xx: the client falls back to its next host.
		s.log.Error("disk full", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInsufficientStorage, codeUnavailable, "this mirror node's disk is full")
	case errors.Is(err, task.ErrTooMany):
		s.log.Warn("download refused", "method", r.Method, "path", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, codeUnavailable, "this mirror node runs as many downloads as it may")
	case errors.Is(err, task.ErrDraining):
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, codeUnavailable, "this mirror node is shutting down")
	case errors.Is(err, task.ErrTooLarge):
		writeError(w, http.StatusForbidden, codeDenied, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		s.log.Warn("upstream timed out", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusGatewayTimeout, codeUnavailable, "upstream registry timed out")
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody reads the answer.
		w.WriteHeader(499)
	default:
		s.log.Warn("upstream request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusBadGateway, codeUnavailable, "upstream registry unavailable")
	}
}

func logLevel(status int) slog.Level {
	switch {
	case status >= 500 || status < 0:
		return slog.LevelWarn
	default:
		return slog.LevelDebug
	}
}
