package peer

import (
	"errors"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/hoststate"
	"github.com/registry-proxy/registry-proxy/p2p/seeding"
	"github.com/registry-proxy/registry-proxy/piece"
)

// ErrSentElsewhere means super-seeding refuses a piece this node sent to
// another peer just now: the asking peer takes it from there.
var ErrSentElsewhere = errors.New("peer: piece already sent to another peer; fetch it from there")

// SentElsewhereError is ErrSentElsewhere with the pieces this node would
// send instead (Fresh[j]: piece j).
type SentElsewhereError struct{ Fresh []bool }

func (e *SentElsewhereError) Error() string { return ErrSentElsewhere.Error() }
func (e *SentElsewhereError) Unwrap() error { return ErrSentElsewhere }

// Offered is what a refusal by Admit sends the child in OfferedHeader: the
// fresh pieces as piece.EncodeSet writes them, "" when err names none.
func Offered(err error) string {
	if se := (*SentElsewhereError)(nil); errors.As(err, &se) && se.Fresh != nil {
		return piece.EncodeSet(se.Fresh)
	}
	return ""
}

// Admission decides whether this node uploads a piece now: a free upload
// slot (the meter; hoststate.ErrBusy when full) and, with super-seeding,
// the ledger. The peer server and the simulator both admit through it.
type Admission struct {
	Meter  *hoststate.Meter // nil: no slot limit
	Ledger *seeding.Ledger  // nil: no super-seeding
}

// Admit reserves the upload of piece i of d, a blob of count pieces of which
// offer says what this node can send first copies of; reading: it reads d
// from the upstream now. done releases it; a piece that was not sent is
// taken off the ledger again.
func (a Admission) Admit(d digest.Digest, i, count int, offer seeding.Offer, reading bool) (done func(sent bool), err error) {
	uploads := 0
	releaseSlot := func() {}
	if a.Meter != nil {
		uploads = a.Meter.Uploads()
		if releaseSlot, err = a.Meter.BeginUpload(); err != nil {
			return nil, err
		}
	}
	undo := func() {}
	if a.Ledger != nil {
		var fresh []bool
		var ok bool
		if undo, fresh, ok = a.Ledger.Begin(d, i, count, offer, reading, uploads); !ok {
			releaseSlot()
			return nil, &SentElsewhereError{Fresh: fresh}
		}
	}
	return func(sent bool) {
		if !sent {
			undo()
		}
		releaseSlot()
	}, nil
}
