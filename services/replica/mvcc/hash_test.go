package mvcc

import (
	"context"
	"errors"
	"testing"

	"github.com/kvmesh/kvmesh/libs/etcderr"
)

func TestHashKVAgreesOnEqualHistoriesAndIgnoresCompaction(t *testing.T) {
	a, b := newEnv(t), newEnv(t)
	for _, e := range []*testEnv{a, b} {
		e.mustPut("x", "1")
		e.mustPut("y", "2")
		e.mustPut("x", "3")
		e.mustDelete("y", "")
	}
	ha, reva, _, err := a.s.HashKV(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	hb, _, _, err := b.s.HashKV(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if ha != hb || reva != 5 {
		t.Fatalf("equal histories hash %08x and %08x (revision %d, want 5)", ha, hb, reva)
	}

	b.mustPut("z", "4")
	if h, _, _, _ := b.s.HashKV(context.Background(), 5); h != ha {
		t.Fatalf("a later write changed the hash at revision 5: %08x, want %08x", h, ha)
	}
	if h, _, _, _ := b.s.HashKV(context.Background(), 0); h == ha {
		t.Fatal("different histories hash the same")
	}

	// Compaction removes what it must below 4; the hash of (4, 6] is the same before
	// and after the deletions run.
	before, _, _, err := b.s.HashKV(context.Background(), 6)
	if err != nil {
		t.Fatal(err)
	}
	b.mustCompact(3)
	mid, _, compact, _ := b.s.HashKV(context.Background(), 6)
	b.waitCompacted(3)
	after, _, _, _ := b.s.HashKV(context.Background(), 6)
	if compact != 3 || mid != after {
		t.Fatalf("hash moved while compaction ran: %08x then %08x (compact revision %d)", mid, after, compact)
	}
	if before == after {
		t.Fatal("the hash should cover only revisions after the compaction, and it did not change")
	}

	if _, _, _, err := b.s.HashKV(context.Background(), 2); !errors.Is(err, etcderr.ErrCompacted) {
		t.Fatalf("HashKV below the compaction: %v, want ErrCompacted", err)
	}
	if _, _, _, err := b.s.HashKV(context.Background(), 99); !errors.Is(err, etcderr.ErrFutureRev) {
		t.Fatalf("HashKV beyond the revision: %v, want ErrFutureRev", err)
	}
}
