// Package drain closes HTTP response bodies so that their connections are
// reused.
package drain

import "io"

// Limit is the most read from a body before it is closed: a short answer
// (an error, a refusal) is read whole; a longer one costs more to read than
// a new connection.
const Limit = 64 << 10

// Close reads what is left of a short response body, up to Limit, and
// closes it. An HTTP/1.1 body closed unread closes its connection, so the
// next request would pay a new one (and a TLS handshake).
func Close(body io.ReadCloser) {
	_, _ = io.CopyN(io.Discard, body, Limit)
	body.Close()
}
