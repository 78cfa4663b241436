package mvcc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

func TestCompactErrors(t *testing.T) {
	e := newEnv(t)
	for i := 0; i < 5; i++ {
		e.mustPut("k", fmt.Sprint(i)) // revisions 2..6
	}
	steps := []struct {
		rev  int64
		want error
	}{
		{7, etcderr.ErrFutureRev},
		{3, nil},
		{3, etcderr.ErrCompacted}, // same revision again
		{2, etcderr.ErrCompacted}, // older
		{5, nil},
		{4, etcderr.ErrCompacted},
		{6, nil}, // the current revision
		{6, etcderr.ErrCompacted},
		{7, etcderr.ErrFutureRev},
	}
	for _, s := range steps {
		resp, err := e.apply(&pb.CompactionRequest{Revision: s.rev})
		if !isErr(err, s.want) || (s.want == nil && err != nil) {
			t.Fatalf("compact at %d: err = %v, want %v", s.rev, err, s.want)
		}
		if s.want == nil {
			want := &pb.CompactionResponse{Header: &pb.ResponseHeader{Revision: 6}}
			if !proto.Equal(resp, want) {
				t.Errorf("compact at %d:%s", s.rev, protoDiff(resp, want))
			}
		}
	}
	if e.s.CompactRev() != 6 || e.s.Rev() != 6 {
		t.Errorf("after compactions: compact rev %d, rev %d; want 6, 6", e.s.CompactRev(), e.s.Rev())
	}
}

func TestCompactEmptyStore(t *testing.T) {
	e := newEnv(t)
	if err := e.compact(2); !isErr(err, etcderr.ErrFutureRev) {
		t.Errorf("compact at 2 of an empty store: err = %v, want ErrFutureRev", err)
	}
	e.mustCompact(1)
	e.waitCompacted(1)
	if err := e.compact(1); !isErr(err, etcderr.ErrCompacted) {
		t.Errorf("second compact at 1: err = %v, want ErrCompacted", err)
	}
	e.mustPut("a", "1")
	if got := e.get("a", 0); got == nil {
		t.Errorf("put after compacting an empty store is not readable")
	}
}

// checkAllRevisions reads every revision of the model through the store: below the
// compaction revision reads fail, from it on they match the model.
func checkAllRevisions(t *testing.T, e *testEnv, m *model, what string) {
	t.Helper()
	all := &pb.RangeRequest{Key: []byte{}, RangeEnd: []byte{0}}
	for rev := int64(1); rev <= m.rev; rev++ {
		r := proto.Clone(all).(*pb.RangeRequest)
		r.Revision = rev
		checkRange(t, e, m, fmt.Sprintf("%s: everything at %d (compacted at %d)", what, rev, m.compact), r)
		if t.Failed() {
			t.FailNow()
		}
	}
	checkRange(t, e, m, what+": everything now", all)
}

// checkKeyspace compares the Pebble keys of the store with what a finished compaction
// must leave.
func checkKeyspace(t *testing.T, e *testEnv, m *model, what string) {
	t.Helper()
	index, records := m.survivors()
	if got := e.countPrefix('i'); got != index {
		t.Errorf("%s: %d index ('i') keys, want %d", what, got, index)
	}
	if got := e.countPrefix('r'); got != records {
		t.Errorf("%s: %d revision ('r') keys, want %d (see TestCompactRemovesSupersededSubRevisions)", what, got, records)
	}
	if got, want := e.countPrefix('c'), m.liveCount(); got != want {
		t.Errorf("%s: %d current ('c') keys, want %d", what, got, want)
	}
}

// applyBoth applies one request to the store and the model and checks the answers.
func applyBoth(t *testing.T, e *testEnv, m *model, r proto.Message) {
	t.Helper()
	got, err := e.apply(r)
	want, wantErr := m.apply(r)
	if !isErr(err, wantErr) || (wantErr == nil && err != nil) {
		t.Fatalf("%v: err %v, want %v", r, err, wantErr)
	}
	if wantErr == nil && !proto.Equal(got, want) {
		t.Fatalf("%v:%s", r, protoDiff(got, want))
	}
}

func TestCompactReadsAndKeyspace(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewPCG(seed, 7))
	e := newEnv(t)
	m := newModel(leaseSet{})
	keys := []string{"a", "a\x00", "a\x00b", "ab", "b", "c", "d\x00", "e"}
	randomHistory(t, e, m, rng, keys, 150)
	checkKeyspace(t, e, m, "before any compaction")

	for _, frac := range []float64{0.3, 0.3, 0.6, 0.9, 1.0} {
		target := max(m.compact+1, int64(frac*float64(m.rev)))
		if target > m.rev {
			randomHistory(t, e, m, rng, keys, 20)
		}
		applyBoth(t, e, m, &pb.CompactionRequest{Revision: target})
		what := fmt.Sprintf("seed %d, compacted at %d", seed, target)
		// Reads right after the compaction is scheduled, while it may still run.
		checkAllRevisions(t, e, m, what+", before WaitCompacted")
		e.waitCompacted(target)
		checkAllRevisions(t, e, m, what+", after WaitCompacted")
		checkKeyspace(t, e, m, what)
		randomHistory(t, e, m, rng, keys, 40)
	}
}

func TestCompactRemovesTombstones(t *testing.T) {
	e := newEnv(t)
	e.mustPut("gone", "1")   // 2
	e.mustPut("gone", "2")   // 3
	e.mustDelete("gone", "") // 4: tombstone
	e.mustPut("kept", "1")   // 5
	e.mustPut("late", "1")   // 6
	e.mustDelete("late", "") // 7: tombstone above the compaction revision
	if got := e.countPrefix('i'); got != 6 {
		t.Fatalf("%d index keys before compaction, want 6", got)
	}
	e.mustCompact(6)
	e.waitCompacted(6)
	// Left: kept@5, late@6 (the version reads at 6 see), late's tombstone @7.
	if got := e.countPrefix('i'); got != 3 {
		t.Errorf("%d index keys after compaction at 6, want 3 (kept@5, late@6, late@7)", got)
	}
	if got := e.countPrefix('r'); got != 3 {
		t.Errorf("%d revision keys after compaction at 6, want 3", got)
	}
	// Nothing of "gone" is left in the index.
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: indexKeyPrefix([]byte("gone")), UpperBound: nextIndexKey(indexKeyPrefix([]byte("gone")))})
	if err != nil {
		t.Fatal(err)
	}
	for it.First(); it.Valid(); it.Next() {
		_, main := splitIndexKey(it.Key())
		t.Errorf("index entry of the deleted key survives compaction: revision %d", main)
	}
	it.Close()
	if got := e.get("late", 6); got == nil || got.GetModRevision() != 6 {
		t.Errorf("late at the compaction revision: %v", got)
	}
	if got := e.get("late", 7); got != nil {
		t.Errorf("late after its delete: %v", got)
	}
	e.mustCompact(7)
	e.waitCompacted(7)
	if got := e.countPrefix('i'); got != 1 {
		t.Errorf("%d index keys after compaction at 7, want 1 (kept@5)", got)
	}
	if got := e.countPrefix('r'); got != 1 {
		t.Errorf("%d revision keys after compaction at 7, want 1", got)
	}
}

// A key changed more than once in one txn has several revision records (sub-revisions)
// but one index entry per revision; compaction must delete the superseded records too.
// etcd's duplicate-key validation (mirrored in the replica's validate.go) does not
// prevent this: a delete with range_end "\x00" covers no key for it, and a delete in a
// nested txn is not checked against a put in an earlier sibling txn.
func TestCompactRemovesSupersededSubRevisions(t *testing.T) {
	tests := []struct {
		name string
		txn  *pb.TxnRequest
	}{
		{"put twice (rejected by the API layer, accepted by the store)",
			&pb.TxnRequest{Success: []*pb.RequestOp{putOp("k", "1"), putOp("k", "2")}}},
		{"delete [a, \\x00) then put k (passes etcd's validation)",
			&pb.TxnRequest{Success: []*pb.RequestOp{delOp("a", "\x00"), putOp("k", "1")}}},
		{"put k in a nested txn, delete it in a later sibling (passes etcd's validation)",
			&pb.TxnRequest{Success: []*pb.RequestOp{
				txnOp(&pb.TxnRequest{Success: []*pb.RequestOp{putOp("k", "1")}}),
				txnOp(&pb.TxnRequest{Success: []*pb.RequestOp{delOp("k", "")}}),
			}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.mustPut("k", "0") // 2
			e.mustTxn(tc.txn)   // 3: records 3.0 and 3.1 for k
			e.mustPut("k", "3") // 4
			e.mustCompact(4)
			e.waitCompacted(4)
			// Only k@4 is reachable.
			if got := e.countPrefix('i'); got != 1 {
				t.Errorf("%d index keys after compaction, want 1", got)
			}
			if got := e.countPrefix('r'); got != 1 {
				var left []string
				it, _ := e.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixRev}, UpperBound: []byte{prefixRev + 1}})
				for it.First(); it.Valid(); it.Next() {
					main, sub := parseRevKey(it.Key())
					left = append(left, fmt.Sprintf("%d.%d", main, sub))
				}
				it.Close()
				t.Errorf("%d revision records after compaction at 4, want 1 (4.0); left: %v — a record superseded "+
					"within its own revision is never deleted: compactKey deletes only the record each index entry points to", got, left)
			}
		})
	}
}

// More changes than one compaction batch holds (compactBatch), so the compactor commits
// in several batches.
func TestCompactManyKeys(t *testing.T) {
	e := newEnv(t)
	e.commit = pebble.NoSync
	m := newModel(leaseSet{})
	n := compactBatch*2 + 37
	var batch []proto.Message
	flush := func() {
		for i, res := range e.applyBatch(batch...) {
			want, _ := m.apply(batch[i])
			if res.err != nil || !proto.Equal(res.resp, want) {
				t.Fatalf("%v: %v%s", batch[i], res.err, protoDiff(res.resp, want))
			}
		}
		batch = batch[:0]
	}
	for round := 0; round < 3; round++ {
		for i := 0; i < n; i++ {
			batch = append(batch, &pb.PutRequest{Key: []byte(fmt.Sprintf("key%05d", i)), Value: []byte(fmt.Sprint(round))})
			if i%3 == round {
				batch = append(batch, &pb.DeleteRangeRequest{Key: []byte(fmt.Sprintf("key%05d", i))})
			}
			if len(batch) >= 200 {
				flush()
			}
		}
		flush()
	}
	mid := m.rev - int64(n)
	applyBoth(t, e, m, &pb.CompactionRequest{Revision: mid})
	e.waitCompacted(mid)
	checkKeyspace(t, e, m, "compacted in the middle of the last round")
	for _, rev := range []int64{mid, mid + 1, m.rev} {
		checkRange(t, e, m, "after a large compaction", &pb.RangeRequest{Key: []byte("key"), RangeEnd: []byte("kez"), Revision: rev})
	}
	applyBoth(t, e, m, &pb.CompactionRequest{Revision: m.rev})
	e.waitCompacted(m.rev)
	checkKeyspace(t, e, m, "compacted at the last revision")
}

func TestCompactSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	m := newModel(leaseSet{})
	rng := rand.New(rand.NewPCG(1, 1))
	keys := []string{"a", "b", "b\x00", "c"}
	randomHistory(t, e, m, rng, keys, 60)
	target := m.rev / 2
	applyBoth(t, e, m, &pb.CompactionRequest{Revision: target})
	e.waitCompacted(target)
	for _, restart := range []struct {
		name string
		do   func()
	}{{"new Store on the same db", e.reopenStore}, {"db closed and reopened", e.restart}} {
		restart.do()
		if e.s.CompactRev() != target || e.s.Rev() != m.rev {
			t.Fatalf("%s: compact rev %d, rev %d; want %d, %d", restart.name, e.s.CompactRev(), e.s.Rev(), target, m.rev)
		}
		checkAllRevisions(t, e, m, restart.name)
		checkKeyspace(t, e, m, restart.name)
		if err := e.compact(target); !isErr(err, etcderr.ErrCompacted) {
			t.Errorf("%s: compact at the old revision again: err = %v, want ErrCompacted", restart.name, err)
		}
	}
	// The compactor still works after the restart.
	randomHistory(t, e, m, rng, keys, 20)
	applyBoth(t, e, m, &pb.CompactionRequest{Revision: m.rev - 5})
	e.waitCompacted(m.rev - 5)
	checkAllRevisions(t, e, m, "compaction after restart")
	checkKeyspace(t, e, m, "compaction after restart")
}

// A compaction scheduled ('mc') but not finished ('mf' behind) when the process stopped
// is resumed by Open.
func TestCompactInterruptedResumesOnOpen(t *testing.T) {
	setMeta := func(t *testing.T, e *testEnv, key []byte, v int64) {
		t.Helper()
		if err := e.db.Set(key, encodeInt(v), pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
	history := func(t *testing.T) (*testEnv, *model) {
		e := newEnv(t)
		m := newModel(leaseSet{})
		randomHistory(t, e, m, rand.New(rand.NewPCG(5, 5)), []string{"a", "a\x00", "b", "c", "d"}, 80)
		return e, m
	}
	tests := []struct {
		name string
		// interrupt leaves the database as a crash during compaction at target would
		// (the Store is closed, the db open), and returns target.
		interrupt func(t *testing.T, e *testEnv, m *model) int64
		closeDB   bool
	}{
		{
			name: "scheduled, nothing deleted yet",
			interrupt: func(t *testing.T, e *testEnv, m *model) int64 {
				e.s.Close()
				target := m.rev / 2
				setMeta(t, e, metaCompactKey, target)
				return target
			},
		},
		{
			name: "scheduled, nothing deleted yet, db reopened",
			interrupt: func(t *testing.T, e *testEnv, m *model) int64 {
				e.s.Close()
				target := m.rev / 2
				setMeta(t, e, metaCompactKey, target)
				return target
			},
			closeDB: true,
		},
		{
			name: "stopped midway: some keys compacted in a committed batch",
			interrupt: func(t *testing.T, e *testEnv, m *model) int64 {
				e.s.Close()
				target := m.rev * 2 / 3
				setMeta(t, e, metaCompactKey, target)
				b := e.db.NewBatch()
				for _, k := range []string{"a\x00", "c"} {
					if _, err := e.s.compactKey(b, []byte(k), target); err != nil {
						t.Fatal(err)
					}
				}
				if err := b.Commit(pebble.Sync); err != nil {
					t.Fatal(err)
				}
				b.Close()
				return target
			},
			closeDB: true,
		},
		{
			name: "an earlier compaction finished, a later one not",
			interrupt: func(t *testing.T, e *testEnv, m *model) int64 {
				e.mustCompact(m.rev / 4)
				e.waitCompacted(m.rev / 4)
				e.s.Close()
				target := m.rev * 3 / 4
				setMeta(t, e, metaCompactKey, target)
				return target
			},
			closeDB: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, m := history(t)
			target := tc.interrupt(t, e, m)
			m.compact = target
			if tc.closeDB {
				e.s = nil
				e.closeAll()
				e.openDB()
			}
			e.openStore()
			if e.s.CompactRev() != target {
				t.Fatalf("CompactRev() after Open = %d, want %d", e.s.CompactRev(), target)
			}
			if _, err := e.rangeReq(&pb.RangeRequest{Key: []byte("a"), Revision: target - 1}); !isErr(err, etcderr.ErrCompacted) {
				t.Errorf("read below the resumed compaction: err = %v, want ErrCompacted", err)
			}
			e.waitCompacted(target)
			checkKeyspace(t, e, m, "resumed compaction")
			checkAllRevisions(t, e, m, "resumed compaction")
			if got, err := getInt(e.db, metaCompactedKey, 0); err != nil || got != target {
				t.Errorf("finished-compaction marker = %d (%v), want %d", got, err, target)
			}
		})
	}
}

func TestWaitCompacted(t *testing.T) {
	e := newEnv(t)
	e.mustPut("a", "1")
	e.mustPut("a", "2")
	// Nothing scheduled at 3: WaitCompacted waits until the context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := e.s.WaitCompacted(ctx, 3); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitCompacted for an unscheduled revision: err = %v, want DeadlineExceeded", err)
	}
	// Already compacted revisions (and 0) return at once.
	if err := e.s.WaitCompacted(context.Background(), 0); err != nil {
		t.Errorf("WaitCompacted(0): %v", err)
	}
	e.mustCompact(3)
	e.waitCompacted(3)
	e.waitCompacted(2)
	// A waiter blocked when the store closes gets ErrStopped.
	s := e.s
	done := make(chan error, 1)
	go func() { done <- s.WaitCompacted(context.Background(), 100) }()
	time.Sleep(20 * time.Millisecond)
	s.Close()
	e.s = nil
	select {
	case err := <-done:
		if !isErr(err, etcderr.ErrStopped) {
			t.Errorf("WaitCompacted on a closed store: err = %v, want ErrStopped", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WaitCompacted still blocked 5s after Close")
	}
}
