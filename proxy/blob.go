package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/progress"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/proxy/access"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

func (s *Server) blob(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.unsupported(w, r)
		return
	}
	name, ok := s.repo(w, r)
	if !ok {
		return
	}
	d, err := digest.Parse(mux.Vars(r)["digest"])
	if err != nil {
		writeError(w, http.StatusBadRequest, codeDigestInvalid, "invalid digest: "+err.Error())
		return
	}
	h := w.Header()
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Cache-Control", "max-age=31536000, immutable")
	h.Set("Content-Type", "application/octet-stream")

	if r.Method == http.MethodHead {
		s.headBlob(w, r, name, d)
		return
	}
	if _, err := s.opts.Store.Stat(d); err == nil && s.serveCached(w, r, name, d) {
		return
	}
	req := task.Request{Digest: d, Registry: s.registry(r), Repo: name, Header: forwardHeaders(r), NodeCredentials: s.nodeAuth(r, name)}
	if req.NodeCredentials {
		req.Header = nil // never sent: the node's own answer the registry
	}
	t, err := s.opts.Tasks.Open(r.Context(), req)
	if errors.Is(err, task.ErrComplete) && s.serveCached(w, r, name, d) {
		return
	}
	if err != nil {
		s.writeUpstreamError(w, r, err, codeBlobUnknown)
		return
	}
	// A task another client started, or fed by peers: this client's own
	// HEAD upstream (remembered when it opened the task) says it may read it.
	if !s.allowed(w, r, name, d, access.Blob, codeBlobUnknown) {
		return
	}
	s.serveTask(w, r, t)
}

// serveCached answers with a complete blob from the store, if this client
// may read it; false when it is not there (any more).
func (s *Server) serveCached(w http.ResponseWriter, r *http.Request, repo string, d digest.Digest) bool {
	return !s.allowed(w, r, repo, d, access.Blob, codeBlobUnknown) || s.serveStored(w, r, d)
}

// serveStored serves a complete blob (ranges, sendfile) if the store has it.
func (s *Server) serveStored(w http.ResponseWriter, r *http.Request, d digest.Digest) bool {
	b, err := s.opts.Store.Get(r.Context(), d)
	if err != nil {
		if !errors.Is(err, blobstore.ErrNotFound) {
			s.log.Error("reading stored blob", "digest", d, "err", err)
		}
		return false
	}
	defer b.Close()
	pw := progress.New(w, s.opts.WriteStall)
	defer pw.Done()
	w = pw
	source := metrics.SourceCache
	if b.External {
		source = metrics.SourceContainerd
	}
	w.Header().Set("X-Registry-Proxy-Source", source)
	if r.Header.Get("Range") != "" || r.Header.Get("If-None-Match") != "" {
		http.ServeContent(w, r, "", time.Time{}, b.Content)
		return true
	}
	w.Header().Set("Content-Length", contentLength(b.Size))
	w.WriteHeader(http.StatusOK)
	if _, err := s.copyOut(w, r, b.Content); err != nil {
		s.logSendError(r, d, err)
	}
	return true
}

// logSendError says why a blob response ended early: a client that stopped
// reading (cut off after limits.write_stall), or a failure; a client that
// went away is routine.
func (s *Server) logSendError(r *http.Request, d digest.Digest, err error) {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		s.log.Info("client took no bytes for limits.write_stall; response cut off", "digest", d, "remote", r.RemoteAddr, "stall", s.opts.WriteStall, "err", err)
	case r.Context().Err() == nil:
		s.log.Warn("sending blob", "digest", d, "remote", r.RemoteAddr, "err", err)
	}
}

// serveTask streams a blob that is still arriving. If the task fails, the
// response is aborted so the client can't take it as a whole blob.
func (s *Server) serveTask(w http.ResponseWriter, r *http.Request, t *task.Task) {
	pw := progress.New(w, s.opts.WriteStall)
	defer pw.Done()
	w = pw
	w.Header().Set("X-Registry-Proxy-Source", "fetch")
	if t.Size() == 0 {
		// Nothing to hold back: answer only once the digest is checked.
		if err := t.Wait(r.Context()); err != nil {
			s.writeTaskError(w, r, t, err)
			return
		}
	}
	rd, err := t.NewReader(r.Context())
	if err != nil {
		s.writeTaskError(w, r, t, err)
		return
	}
	defer rd.Close()
	var err2 error
	if r.Header.Get("Range") == "" && r.Header.Get("If-None-Match") == "" {
		// The whole blob, the common case: stream it with sendfile.
		w.Header().Set("Content-Length", contentLength(t.Size()))
		w.WriteHeader(http.StatusOK)
		_, err2 = s.copyOut(w, r, rd)
	} else {
		end, ok := rangeEnd(r.Header.Get("Range"), t.Size())
		if !ok {
			// Several ranges, or one ServeContent will refuse: answered once
			// the whole blob is verified.
			if err := t.Wait(r.Context()); err != nil {
				s.writeTaskError(w, r, t, err)
				return
			}
		} else if end > 0 {
			// Bytes from peers are checked against their digest only when
			// the whole blob is: a range ending before the blob does is
			// completed only then, so a 206 never ends cleanly on bytes
			// that may not be the blob's.
			rd.HoldUntilVerified(end)
		}
		er := &errReader{r: rd}
		http.ServeContent(w, r, "", time.Time{}, er)
		err2 = er.err
	}
	if err2 != nil && !errors.Is(err2, io.EOF) {
		var ne net.Error
		if r.Context().Err() == nil || (errors.As(err2, &ne) && ne.Timeout()) {
			s.log.Error("aborting blob response", "digest", t.Digest(), "remote", r.RemoteAddr, "err", err2)
		}
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) writeTaskError(w http.ResponseWriter, r *http.Request, t *task.Task, err error) {
	if errors.Is(err, task.ErrDigestMismatch) {
		s.log.Error("blob failed verification", "digest", t.Digest(), "err", err)
		writeError(w, http.StatusBadGateway, codeBlobUnknown, "blob failed digest verification")
		return
	}
	s.writeUpstreamError(w, r, err, codeBlobUnknown)
}

// bigBuffers bounds the large copy buffers in use at once, so that many
// loopback clients cost at most this many MiB; the others get sendfile.
const bigBuffers = 32

// copyOut sends a blob body. To a remote peer the kernel's sendfile sends
// it; to a client on loopback (the node's own containerd or dockerd) a
// plain copy through a large buffer is faster, as loopback moves sendfile's
// page fragments at about half the speed of large writes, while one of
// bigBuffers is free.
func (s *Server) copyOut(w http.ResponseWriter, r *http.Request, src io.Reader) (int64, error) {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return io.Copy(w, src)
	}
	select {
	case bp := <-s.copyBufs:
		defer func() { s.copyBufs <- bp }()
		return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{src}, *bp)
	default:
		return io.Copy(w, src)
	}
}

// rangeEnd is the exclusive end of a single-range Range header within a blob
// of size bytes (0 when there is no header); ok is false for several ranges
// or a header it does not understand.
func rangeEnd(h string, size int64) (end int64, ok bool) {
	if h == "" {
		return 0, true
	}
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return 0, false
	}
	first, last, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found {
		return 0, false
	}
	if first == "" || last == "" {
		return size, true // a suffix, or open-ended: up to the blob's end
	}
	b, err := strconv.ParseInt(last, 10, 64)
	if err != nil || b < 0 {
		return 0, false
	}
	return min(b+1, size), true
}

// errReader remembers the error that ended a read, which ServeContent drops.
type errReader struct {
	r   io.ReadSeeker
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil {
		e.err = err
	}
	return n, err
}

func (e *errReader) Seek(off int64, whence int) (int64, error) { return e.r.Seek(off, whence) }

func (s *Server) headBlob(w http.ResponseWriter, r *http.Request, name string, d digest.Digest) {
	size, err := s.opts.Store.Stat(d)
	if err != nil {
		if t, ok := s.opts.Tasks.Lookup(d); ok {
			size, err = t.Size(), nil
		}
	}
	if err == nil && !s.allowed(w, r, name, d, access.Blob, codeBlobUnknown) {
		return
	}
	if err != nil {
		ctx, cancel := context.WithTimeout(r.Context(), s.opts.UpstreamTimeout)
		defer cancel()
		size, err = s.upstreamFor(r, name).BlobSize(ctx, s.registry(r), name, d, forwardHeaders(r))
		if err != nil {
			if upstream.Unreachable(err) && !s.allowed(w, r, name, d, access.Blob, codeBlobUnknown) {
				// While the registry cannot answer, a client nothing
				// allows gets a refusal, not the outage.
				return
			}
			s.writeUpstreamError(w, r, err, codeBlobUnknown)
			return
		}
	}
	w.Header().Set("Content-Length", contentLength(size))
	w.WriteHeader(http.StatusOK)
}
