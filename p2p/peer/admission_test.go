package peer

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/hoststate"
	"github.com/registry-proxy/registry-proxy/p2p/seeding"
	"github.com/registry-proxy/registry-proxy/piece"
)

type noCounters struct{}

func (noCounters) Net(context.Context) (uint64, uint64, error) { return 0, 0, nil }
func (noCounters) LinkSpeed(context.Context) (uint64, error)   { return 0, nil }
func (noCounters) DiskRead(context.Context) (uint64, error)    { return 0, nil }
func (noCounters) Free(context.Context) (uint64, error)        { return 0, nil }

func TestAdmission(t *testing.T) {
	d := digest.FromString("blob")
	all := seeding.Offer{All: true}
	meter := hoststate.New(hoststate.Options{Counters: noCounters{}, UploadLimit: 3})
	a := Admission{Meter: meter, Ledger: seeding.New(seeding.Options{Busy: 1})}

	// Piece 0 goes out, and is sent.
	first, err := a.Admit(d, 0, 4, all, true)
	if err != nil {
		t.Fatal(err)
	}
	// While it uploads, piece 0 again is refused: pieces nobody has wait.
	if _, err := a.Admit(d, 0, 4, all, true); !errors.Is(err, ErrSentElsewhere) {
		t.Fatalf("a duplicate while busy: %v, want ErrSentElsewhere", err)
	}
	if got := meter.Uploads(); got != 1 {
		t.Fatalf("%d uploads after a refusal, want 1 (its slot given back)", got)
	}
	// Piece 1 fails to send: taken off the ledger, so it may go again.
	second, err := a.Admit(d, 1, 4, all, true)
	if err != nil {
		t.Fatal(err)
	}
	second(false)
	again, err := a.Admit(d, 1, 4, all, true)
	if err != nil {
		t.Fatalf("a piece whose upload failed: %v", err)
	}
	// Slots: two in flight of three, then the limit.
	third, err := a.Admit(d, 2, 4, all, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admit(d, 3, 4, all, true); !errors.Is(err, hoststate.ErrBusy) {
		t.Fatalf("beyond the upload limit: %v, want hoststate.ErrBusy", err)
	}
	first(true)
	again(true)
	third(true)
	if got := meter.Uploads(); got != 0 {
		t.Errorf("%d uploads after all ended", got)
	}
	// Without meter and ledger everything is admitted.
	done, err := Admission{}.Admit(d, 0, 4, all, true)
	if err != nil {
		t.Fatal(err)
	}
	done(true)
}

func TestOffered(t *testing.T) {
	fresh := []bool{true, false, true}
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"no error", nil, ""},
		{"busy", hoststate.ErrBusy, ""},
		{"refusal without a set", ErrSentElsewhere, ""},
		{"refusal with a set, wrapped", fmt.Errorf("admit: %w", &SentElsewhereError{Fresh: fresh}), piece.EncodeSet(fresh)},
	} {
		if got := Offered(tc.err); got != tc.want {
			t.Errorf("%s: Offered = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// A node offers as first copies every piece while it fetches from the
// upstream or holds the blob, else the pieces it holds.
func TestSnapshotOffer(t *testing.T) {
	for _, tc := range []struct {
		name string
		snap Snapshot
		want []bool
	}{
		{"seeding", Snapshot{Seeding: true}, []bool{true, true, true}},
		{"complete", Snapshot{Complete: true}, []bool{true, true, true}},
		{"downloading", Snapshot{Done: []bool{true, false, true}}, []bool{true, false, true}},
		{"a short list", Snapshot{Done: []bool{true}}, []bool{true, false, false}},
	} {
		var got []bool
		for j := range 3 {
			got = append(got, tc.snap.Offer().Has(j))
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: offers %v, want %v", tc.name, got, tc.want)
		}
	}
}
