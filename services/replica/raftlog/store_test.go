package raftlog

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// env is a Store in a temporary directory, with small segments so that tests cross
// segment boundaries.
type env struct {
	t    testing.TB
	dir  string
	opts Options
	s    *Store
}

const testSegmentSize = 8 << 10

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), opts: Options{SegmentSize: testSegmentSize}}
	e.openStore()
	t.Cleanup(func() {
		if e.s != nil {
			if err := e.s.Close(); err != nil {
				t.Errorf("closing the log: %v", err)
			}
		}
	})
	return e
}

func (e *env) openStore() {
	e.t.Helper()
	s, err := Open(e.dir, e.opts)
	if err != nil {
		e.t.Fatalf("raftlog.Open: %v", err)
	}
	e.s = s
}

// reopen opens a new Store on the same directory, as a restarted process would find
// it: after a clean Close, or with clean false as a process killed at that point
// leaves it (what was written without sync is still in the page cache).
func (e *env) reopen(clean bool) {
	e.t.Helper()
	if clean {
		if err := e.s.Close(); err != nil {
			e.t.Fatalf("closing the log: %v", err)
		}
	} else {
		old := e.s
		old.mu.Lock()
		old.closed = true
		old.mu.Unlock()
		old.prep.Wait() // a spare half-written by the dead process is tested on its own
		e.t.Cleanup(func() { old.closeFiles() })
	}
	e.s = nil
	e.openStore()
}

// segments lists the log's segment files and spares.
func (e *env) segments() (segs []uint64, spares []string) {
	e.t.Helper()
	segs, spares, _, err := listDir(vfs.Default, e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	return segs, spares
}

// ent is an entry with a payload derived from its index and term.
func ent(index, term uint64) *pb.Entry {
	return &pb.Entry{Index: proto.Uint64(index), Term: proto.Uint64(term), Type: pb.EntryType_EntryNormal.Enum(), Data: []byte(fmt.Sprintf("data-%d-%d", index, term))}
}

// ents is entries lo..hi inclusive, all of one term.
func ents(lo, hi, term uint64) []*pb.Entry {
	var out []*pb.Entry
	for i := lo; i <= hi; i++ {
		out = append(out, ent(i, term))
	}
	return out
}

func hardState(term, vote, commit uint64) *pb.HardState {
	return &pb.HardState{Term: proto.Uint64(term), Vote: proto.Uint64(vote), Commit: proto.Uint64(commit)}
}

func (e *env) save(hs *pb.HardState, entries []*pb.Entry) {
	e.t.Helper()
	if err := e.s.Save(hs, entries, true); err != nil {
		e.t.Fatalf("Save: %v", err)
	}
}

func (e *env) bounds() (first, last uint64) {
	e.t.Helper()
	first, err := e.s.FirstIndex()
	if err != nil {
		e.t.Fatalf("FirstIndex: %v", err)
	}
	last, err = e.s.LastIndex()
	if err != nil {
		e.t.Fatalf("LastIndex: %v", err)
	}
	return first, last
}

func (e *env) mustEntries(lo, hi, maxSize uint64) []*pb.Entry {
	e.t.Helper()
	out, err := e.s.Entries(lo, hi, maxSize)
	if err != nil {
		e.t.Fatalf("Entries(%d, %d, %d): %v", lo, hi, maxSize, err)
	}
	return out
}

func (e *env) mustTerm(i uint64) uint64 {
	e.t.Helper()
	term, err := e.s.Term(i)
	if err != nil {
		e.t.Fatalf("Term(%d): %v", i, err)
	}
	return term
}

func entriesEqual(a, b []*pb.Entry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

func describe(es []*pb.Entry) string {
	if len(es) == 0 {
		return "[]"
	}
	return fmt.Sprintf("%d entries [%d/t%d .. %d/t%d]", len(es), es[0].GetIndex(), es[0].GetTerm(), es[len(es)-1].GetIndex(), es[len(es)-1].GetTerm())
}

func TestFreshStore(t *testing.T) {
	e := newEnv(t)
	if first, last := e.bounds(); first != 1 || last != 0 {
		t.Errorf("fresh store: FirstIndex %d, LastIndex %d; want 1, 0", first, last)
	}
	hs, cs, err := e.s.InitialState()
	if err != nil {
		t.Fatal(err)
	}
	if !raft.IsEmptyHardState(hs) {
		t.Errorf("fresh store: hard state %v, want empty", hs)
	}
	if cs == nil || len(cs.GetVoters()) != 0 {
		t.Errorf("fresh store: conf state %v, want empty and not nil", cs)
	}
	if !raft.IsEmptyHardState(e.s.HardState()) {
		t.Errorf("fresh store: HardState() = %v", e.s.HardState())
	}
	snap, err := e.s.Snapshot()
	if err != nil || !raft.IsEmptySnap(snap) {
		t.Errorf("fresh store: Snapshot() = %v, %v; want an empty snapshot", snap, err)
	}
	if term := e.mustTerm(0); term != 0 {
		t.Errorf("Term(0) = %d, want 0", term)
	}
	if _, err := e.s.Term(1); !errors.Is(err, raft.ErrUnavailable) {
		t.Errorf("Term(1) of an empty log: err = %v, want ErrUnavailable", err)
	}
	if out, err := e.s.Entries(1, 1, math.MaxUint64); err != nil || len(out) != 0 {
		t.Errorf("Entries(1, 1) of an empty log = %v, %v; want nothing", out, err)
	}
	if _, err := e.s.Entries(1, 2, math.MaxUint64); !errors.Is(err, raft.ErrUnavailable) {
		t.Errorf("Entries(1, 2) of an empty log: err = %v, want ErrUnavailable", err)
	}
	if _, err := e.s.Entries(0, 1, math.MaxUint64); !errors.Is(err, raft.ErrCompacted) {
		t.Errorf("Entries(0, 1): err = %v, want ErrCompacted (index 0 is the dummy entry)", err)
	}
	// A Save of nothing writes nothing.
	if err := e.s.Save(&pb.HardState{}, nil, true); err != nil {
		t.Errorf("empty Save: %v", err)
	}
	if segs, _ := e.segments(); len(segs) != 1 || e.s.off != e.s.headerEnd {
		t.Errorf("an empty Save wrote: segments %v, offset %d after the opening mark's %d", segs, e.s.off, e.s.headerEnd)
	}
}

func TestSaveThenRead(t *testing.T) {
	e := newEnv(t)
	hs := hardState(3, 2, 7)
	all := append(append(ents(1, 4, 1), ents(5, 8, 2)...), ents(9, 10, 3)...)
	e.save(hs, all)
	check := func(what string) {
		t.Helper()
		if first, last := e.bounds(); first != 1 || last != 10 {
			t.Fatalf("%s: FirstIndex %d, LastIndex %d; want 1, 10", what, first, last)
		}
		for _, en := range all {
			if term := e.mustTerm(en.GetIndex()); term != en.GetTerm() {
				t.Errorf("%s: Term(%d) = %d, want %d", what, en.GetIndex(), term, en.GetTerm())
			}
		}
		if _, err := e.s.Term(11); !errors.Is(err, raft.ErrUnavailable) {
			t.Errorf("%s: Term(11): err = %v, want ErrUnavailable", what, err)
		}
		for lo := uint64(1); lo <= 11; lo++ {
			for hi := lo; hi <= 11; hi++ {
				got := e.mustEntries(lo, hi, math.MaxUint64)
				if !entriesEqual(got, all[lo-1:hi-1]) {
					t.Fatalf("%s: Entries(%d, %d) = %s, want %s", what, lo, hi, describe(got), describe(all[lo-1:hi-1]))
				}
			}
		}
		if _, err := e.s.Entries(5, 12, math.MaxUint64); !errors.Is(err, raft.ErrUnavailable) {
			t.Errorf("%s: Entries(5, 12) past the last index: err = %v, want ErrUnavailable", what, err)
		}
		if got := e.s.HardState(); !proto.Equal(got, hs) {
			t.Errorf("%s: HardState() = %v, want %v", what, got, hs)
		}
		if got, _, _ := e.s.InitialState(); !proto.Equal(got, hs) {
			t.Errorf("%s: InitialState() hard state = %v, want %v", what, got, hs)
		}
	}
	check("after Save")
	e.reopen(false)
	check("new Store on the same db")
	e.reopen(true)
	check("db reopened")

	// A Save with only a hard state keeps the log; one with only entries keeps the
	// hard state.
	hs2 := hardState(4, 0, 10)
	e.save(hs2, nil)
	e.save(nil, ents(11, 12, 4))
	e.save(&pb.HardState{}, ents(13, 13, 4))
	for _, reopen := range []bool{false, true} {
		if got := e.s.HardState(); !proto.Equal(got, hs2) {
			t.Errorf("HardState() = %v, want %v", got, hs2)
		}
		if _, last := e.bounds(); last != 13 {
			t.Errorf("LastIndex %d, want 13", last)
		}
		e.reopen(reopen)
	}
}

// The hard state and configuration handed out are copies.
func TestReturnedStateIsCopied(t *testing.T) {
	e := newEnv(t)
	hs := hardState(1, 1, 1)
	e.save(hs, ents(1, 3, 1))
	hs.Term = proto.Uint64(99) // the caller reuses its message
	got, cs, _ := e.s.InitialState()
	if got.GetTerm() != 1 {
		t.Errorf("Save kept a reference to the caller's HardState: term %d", got.GetTerm())
	}
	got.Commit = proto.Uint64(42)
	cs.Voters = append(cs.Voters, 7)
	got2, cs2, _ := e.s.InitialState()
	if got2.GetCommit() != 1 || len(cs2.GetVoters()) != 0 {
		t.Errorf("InitialState returned the store's own messages: %v, %v", got2, cs2)
	}
	// Appending to a returned slice must not corrupt the log (raft.Storage contract).
	out := e.mustEntries(1, 3, math.MaxUint64)
	_ = append(out, ent(3, 99))
	out[0] = ent(1, 99)
	if again := e.mustEntries(1, 4, math.MaxUint64); !entriesEqual(again, ents(1, 3, 1)) {
		t.Errorf("log changed by the caller's use of a returned slice: %s", describe(again))
	}
}

// limitSize is raft's rule: entries while the total size stays within maxSize, and at
// least one.
func limitSize(es []*pb.Entry, maxSize uint64) []*pb.Entry {
	if len(es) == 0 {
		return es
	}
	size := uint64(proto.Size(es[0]))
	for n := 1; n < len(es); n++ {
		size += uint64(proto.Size(es[n]))
		if size > maxSize {
			return es[:n]
		}
	}
	return es
}

func TestEntriesMaxSize(t *testing.T) {
	e := newEnv(t)
	all := ents(1, 20, 1)
	e.save(nil, all)
	one := uint64(proto.Size(all[0]))
	sizes := []uint64{0, 1, one - 1, one, one + 1, 2 * one, 2*one + 1, 3*one - 1, 5 * one, 100 * one, math.MaxUint64}
	for _, reopened := range []bool{false, true} {
		// After a reopen the cache is empty: the entries come from Pebble.
		for _, lo := range []uint64{1, 7, 20} {
			for _, maxSize := range sizes {
				got := e.mustEntries(lo, 21, maxSize)
				want := limitSize(all[lo-1:], maxSize)
				if !entriesEqual(got, want) {
					t.Errorf("reopened %v: Entries(%d, 21, %d) = %s, want %s", reopened, lo, maxSize, describe(got), describe(want))
				}
				if len(got) == 0 {
					t.Errorf("Entries(%d, 21, %d) returned nothing; raft needs at least one entry", lo, maxSize)
				}
			}
		}
		e.reopen(true)
	}
}

func TestSaveOverwritesConflictingSuffix(t *testing.T) {
	tests := []struct {
		name  string
		saves [][]*pb.Entry
		want  []*pb.Entry // the whole log afterwards, from index 1
	}{
		{"shorter tail of a new term", [][]*pb.Entry{ents(1, 10, 1), ents(6, 7, 2)}, append(ents(1, 5, 1), ents(6, 7, 2)...)},
		{"longer tail", [][]*pb.Entry{ents(1, 10, 1), ents(4, 15, 3)}, append(ents(1, 3, 1), ents(4, 15, 3)...)},
		{"same length", [][]*pb.Entry{ents(1, 10, 1), ents(10, 10, 2)}, append(ents(1, 9, 1), ents(10, 10, 2)...)},
		{"the whole log", [][]*pb.Entry{ents(1, 10, 1), ents(1, 2, 5)}, ents(1, 2, 5)},
		{"twice", [][]*pb.Entry{ents(1, 10, 1), ents(8, 12, 2), ents(9, 9, 3)}, append(append(ents(1, 7, 1), ents(8, 8, 2)...), ents(9, 9, 3)...)},
		{"after appends in pieces", [][]*pb.Entry{ents(1, 3, 1), ents(4, 6, 1), ents(7, 9, 2), ents(5, 5, 3)}, append(ents(1, 4, 1), ents(5, 5, 3)...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, reopenBetween := range []bool{false, true} {
				e := newEnv(t)
				for _, s := range tc.saves {
					e.save(nil, s)
					if reopenBetween {
						// The overwrite must also work on a log loaded from Pebble
						// (empty cache).
						e.reopen(false)
					}
				}
				last := tc.want[len(tc.want)-1].GetIndex()
				for _, stage := range []string{"after the saves", "new Store", "db reopened"} {
					if _, l := e.bounds(); l != last {
						t.Fatalf("reopen between saves %v, %s: LastIndex %d, want %d", reopenBetween, stage, l, last)
					}
					if got := e.mustEntries(1, last+1, math.MaxUint64); !entriesEqual(got, tc.want) {
						t.Fatalf("reopen between saves %v, %s: log %s, want %s", reopenBetween, stage, describe(got), describe(tc.want))
					}
					for _, en := range tc.want {
						if term := e.mustTerm(en.GetIndex()); term != en.GetTerm() {
							t.Errorf("%s: Term(%d) = %d, want %d", stage, en.GetIndex(), term, en.GetTerm())
						}
					}
					if _, err := e.s.Term(last + 1); !errors.Is(err, raft.ErrUnavailable) {
						t.Errorf("%s: Term(%d) past the new end: err = %v, want ErrUnavailable", stage, last+1, err)
					}
					switch stage {
					case "after the saves":
						e.reopen(false)
					case "new Store":
						e.reopen(true)
					}
				}
			}
		})
	}
}

// More entries than the in-memory cache holds: the older ones come from Pebble.
func TestEntriesBeyondCache(t *testing.T) {
	e := newEnv(t)
	const n = cacheLimit*2 + 500
	term := func(i uint64) uint64 { return 1 + i/1000 }
	var all []*pb.Entry
	for i := uint64(1); i <= n; i++ {
		all = append(all, ent(i, term(i)))
	}
	for i := 0; i < n; i += 100 {
		e.save(hardState(term(uint64(i+1)), 1, uint64(i)), all[i:min(i+100, n)])
	}
	check := func(what string) {
		t.Helper()
		if first, last := e.bounds(); first != 1 || last != n {
			t.Fatalf("%s: bounds %d, %d; want 1, %d", what, first, last, n)
		}
		if got := e.mustEntries(1, n+1, math.MaxUint64); !entriesEqual(got, all) {
			t.Fatalf("%s: Entries(1, %d) = %s", what, n+1, describe(got))
		}
		for _, r := range [][2]uint64{{1, 2}, {100, 3000}, {n - cacheLimit - 10, n - cacheLimit + 10}, {n - 5, n + 1}, {4000, 4200}} {
			if got := e.mustEntries(r[0], r[1], math.MaxUint64); !entriesEqual(got, all[r[0]-1:r[1]-1]) {
				t.Errorf("%s: Entries(%d, %d) = %s", what, r[0], r[1], describe(got))
			}
			size := uint64(proto.Size(all[0])) * 10
			if got, want := e.mustEntries(r[0], r[1], size), limitSize(all[r[0]-1:r[1]-1], size); !entriesEqual(got, want) {
				t.Errorf("%s: Entries(%d, %d, %d) = %s, want %s", what, r[0], r[1], size, describe(got), describe(want))
			}
		}
		for _, i := range []uint64{1, 999, 1000, n / 2, n - cacheLimit, n} {
			if got := e.mustTerm(i); got != term(i) {
				t.Errorf("%s: Term(%d) = %d, want %d", what, i, got, term(i))
			}
		}
	}
	check("after saves")
	// Overwrite a suffix that starts before the cached part.
	start := uint64(n - cacheLimit - 100)
	all = append(all[:start-1], ents(start, start+9, 50)...)
	e.save(nil, ents(start, start+9, 50))
	term = func(i uint64) uint64 {
		if i >= start {
			return 50
		}
		return 1 + i/1000
	}
	if _, last := e.bounds(); last != start+9 {
		t.Fatalf("LastIndex after an overwrite below the cache: %d, want %d", last, start+9)
	}
	if got := e.mustEntries(start-5, start+10, math.MaxUint64); !entriesEqual(got, all[start-6:]) {
		t.Errorf("after an overwrite below the cache: Entries = %s", describe(got))
	}
	e.reopen(true)
	if got := e.mustEntries(1, start+10, math.MaxUint64); !entriesEqual(got, all) {
		t.Errorf("after reopen: Entries = %s", describe(got))
	}
}

func TestTruncate(t *testing.T) {
	e := newEnv(t)
	all := append(ents(1, 10, 1), ents(11, 20, 2)...)
	e.save(hardState(2, 1, 20), all)
	cs := &pb.ConfState{Voters: []uint64{1, 2, 3}, Learners: []uint64{4}}
	if err := e.s.Truncate(12, cs); err != nil {
		t.Fatalf("Truncate(12): %v", err)
	}
	check := func(what string, index, term uint64, cs *pb.ConfState) {
		t.Helper()
		if first, last := e.bounds(); first != index+1 || last != 20 {
			t.Errorf("%s: bounds %d, %d; want %d, 20", what, first, last, index+1)
		}
		if got := e.mustTerm(index); got != term {
			t.Errorf("%s: Term(%d) of the truncation point = %d, want %d", what, index, got, term)
		}
		if _, err := e.s.Term(index - 1); !errors.Is(err, raft.ErrCompacted) {
			t.Errorf("%s: Term(%d) below the truncation: err = %v, want ErrCompacted", what, index-1, err)
		}
		for _, lo := range []uint64{1, index - 1, index} {
			if _, err := e.s.Entries(lo, 21, math.MaxUint64); !errors.Is(err, raft.ErrCompacted) {
				t.Errorf("%s: Entries(%d, 21): err = %v, want ErrCompacted", what, lo, err)
			}
		}
		if index < 20 {
			if got := e.mustEntries(index+1, 21, math.MaxUint64); !entriesEqual(got, all[index:]) {
				t.Errorf("%s: Entries(%d, 21) = %s", what, index+1, describe(got))
			}
		}
		snap, err := e.s.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		want := &pb.SnapshotMetadata{Index: proto.Uint64(index), Term: proto.Uint64(term), ConfState: cs}
		if !proto.Equal(snap.GetMetadata(), want) {
			t.Errorf("%s: Snapshot() metadata = %v, want %v", what, snap.GetMetadata(), want)
		}
		if _, gotCS, _ := e.s.InitialState(); !proto.Equal(gotCS, cs) {
			t.Errorf("%s: InitialState() conf state = %v, want %v", what, gotCS, cs)
		}
	}
	check("after Truncate(12)", 12, 2, cs)
	e.reopen(false)
	check("new Store after Truncate(12)", 12, 2, cs)
	e.reopen(true)
	check("db reopened after Truncate(12)", 12, 2, cs)

	// Truncating at or below the current point changes nothing; beyond the log fails.
	for _, i := range []uint64{12} {
		if err := e.s.Truncate(i, &pb.ConfState{Voters: []uint64{9}}); err != nil {
			t.Errorf("Truncate(%d) again: %v", i, err)
		}
	}
	if err := e.s.Truncate(5, &pb.ConfState{}); err == nil {
		t.Errorf("Truncate(5) below the truncation point: no error")
	}
	check("after no-op truncations", 12, 2, cs)
	if err := e.s.Truncate(21, cs); err == nil {
		t.Errorf("Truncate(21) beyond the last index: no error")
	}

	// Truncate everything: the log is empty but keeps its last index and term.
	cs2 := &pb.ConfState{Voters: []uint64{1, 2}}
	if err := e.s.Truncate(20, cs2); err != nil {
		t.Fatal(err)
	}
	check("after Truncate(20)", 20, 2, cs2)
	if out, err := e.s.Entries(21, 21, math.MaxUint64); err != nil || len(out) != 0 {
		t.Errorf("Entries(21, 21) of an empty log: %v, %v", out, err)
	}
	e.reopen(true)
	check("db reopened after Truncate(20)", 20, 2, cs2)
	// The log continues after the truncation point.
	more := ents(21, 25, 3)
	e.save(hardState(3, 1, 25), more)
	all = append(all, more...)
	if got := e.mustEntries(21, 26, math.MaxUint64); !entriesEqual(got, more) {
		t.Errorf("entries saved after a full truncation: %s", describe(got))
	}
	e.reopen(true)
	if first, last := e.bounds(); first != 21 || last != 25 {
		t.Errorf("after reopen: bounds %d, %d; want 21, 25", first, last)
	}
	if got := e.mustEntries(21, 26, math.MaxUint64); !entriesEqual(got, more) {
		t.Errorf("after reopen: entries %s", describe(got))
	}
}

// Truncation of entries only in Pebble (after a reopen, the cache is empty) and of
// entries partly cached.
func TestTruncateCachedAndUncached(t *testing.T) {
	for _, reopen := range []bool{false, true} {
		e := newEnv(t)
		all := ents(1, 50, 1)
		e.save(nil, all[:30])
		if reopen {
			e.reopen(true)
		}
		e.save(nil, all[30:])
		for _, i := range []uint64{10, 29, 35} {
			if err := e.s.Truncate(i, &pb.ConfState{Voters: []uint64{1}}); err != nil {
				t.Fatalf("Truncate(%d): %v", i, err)
			}
			if got := e.mustEntries(i+1, 51, math.MaxUint64); !entriesEqual(got, all[i:]) {
				t.Errorf("reopen %v: after Truncate(%d): Entries = %s", reopen, i, describe(got))
			}
			if got := e.mustTerm(i); got != 1 {
				t.Errorf("Term(%d) = %d", i, got)
			}
		}
	}
}

func TestSaveWithoutSync(t *testing.T) {
	e := newEnv(t)
	hs := hardState(1, 1, 0)
	if err := e.s.Save(hs, ents(1, 5, 1), false); err != nil {
		t.Fatal(err)
	}
	if got := e.mustEntries(1, 6, math.MaxUint64); !entriesEqual(got, ents(1, 5, 1)) {
		t.Errorf("entries saved without sync: %s", describe(got))
	}
	e.reopen(false)
	if got := e.mustEntries(1, 6, math.MaxUint64); !entriesEqual(got, ents(1, 5, 1)) {
		t.Errorf("entries saved without sync, new Store: %s", describe(got))
	}
	if got := e.s.HardState(); !proto.Equal(got, hs) {
		t.Errorf("hard state saved without sync, new Store: %v", got)
	}
	// A clean close flushes what was written without sync.
	e.reopen(true)
	if _, last := e.bounds(); last != 5 {
		t.Errorf("after a clean close and reopen: LastIndex %d, want 5", last)
	}
}

// TestRandomAgainstMemoryStorage drives the Store and raft's MemoryStorage with the same
// random appends (with conflicting suffixes), hard states and truncations, reopening
// now and then, and compares every read.
func TestRandomAgainstMemoryStorage(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("RAFTLOG_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (replay with RAFTLOG_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	e := newEnv(t)
	ms := raft.NewMemoryStorage()
	var hs *pb.HardState
	snapIndex, snapTerm := uint64(0), uint64(0)
	var snapCS *pb.ConfState
	term := uint64(1)
	steps := 1500
	if testing.Short() {
		steps = 300
	}
	for step := 0; step < steps; step++ {
		first, _ := ms.FirstIndex()
		last, _ := ms.LastIndex()
		p0 := rng.Float64()
		if os.Getenv("RAFTLOG_TRACE") != "" {
			t.Logf("step %d p %.3f first %d last %d", step, p0, first, last)
		}
		switch p := p0; {
		case p < 0.55:
			// Append at last+1, or overwrite from somewhere in the uncompacted log.
			at := last + 1
			if rng.IntN(5) == 0 && last >= first {
				at = first + rng.Uint64N(last-first+1)
				term++
			}
			n := 1 + rng.Uint64N(40)
			batch := ents(at, at+n-1, term)
			var newHS *pb.HardState
			if rng.IntN(2) == 0 {
				newHS = hardState(term, rng.Uint64N(3), at-1)
			}
			if err := e.s.Save(newHS, batch, rng.IntN(2) == 0); err != nil {
				t.Fatalf("seed %d step %d: Save: %v", seed, step, err)
			}
			if err := ms.Append(batch); err != nil {
				t.Fatal(err)
			}
			if newHS != nil {
				hs = newHS
			}
		case p < 0.65:
			if last < first {
				continue
			}
			i := first - 1 + rng.Uint64N(last-first+2)
			cs := &pb.ConfState{Voters: []uint64{uint64(step)}}
			if err := e.s.Truncate(i, cs); err != nil {
				t.Fatalf("seed %d step %d: Truncate(%d): %v", seed, step, i, err)
			}
			if i >= first {
				if err := ms.Compact(i); err != nil {
					t.Fatal(err)
				}
				snapIndex, snapTerm, snapCS = i, must(ms.Term(i)), cs
			}
		case p < 0.67:
			e.reopen(rng.IntN(2) == 0)
		default:
			if last < first {
				continue
			}
			lo := first + rng.Uint64N(last-first+1)
			hi := lo + 1 + rng.Uint64N(last-lo+1)
			maxSize := uint64(math.MaxUint64)
			if rng.IntN(2) == 0 {
				maxSize = rng.Uint64N(2000)
			}
			got, err := e.s.Entries(lo, hi, maxSize)
			want, wantErr := ms.Entries(lo, hi, maxSize)
			if err != nil || wantErr != nil || !entriesEqual(got, want) {
				t.Fatalf("seed %d step %d: Entries(%d, %d, %d) = %s, %v; want %s, %v", seed, step, lo, hi, maxSize, describe(got), err, describe(want), wantErr)
			}
		}
		// Bounds, terms around the ends, state.
		first, _ = ms.FirstIndex()
		last, _ = ms.LastIndex()
		if f, l := e.bounds(); f != first || l != last {
			t.Fatalf("seed %d step %d: bounds %d, %d; MemoryStorage %d, %d", seed, step, f, l, first, last)
		}
		for _, i := range []uint64{first - 1, first, (first + last) / 2, last, last + 1} {
			got, err := e.s.Term(i)
			want, wantErr := ms.Term(i)
			if got != want || !errors.Is(err, wantErr) {
				t.Fatalf("seed %d step %d: Term(%d) = %d, %v; want %d, %v", seed, step, i, got, err, want, wantErr)
			}
		}
		if hs != nil && !proto.Equal(e.s.HardState(), hs) {
			t.Fatalf("seed %d step %d: HardState %v, want %v", seed, step, e.s.HardState(), hs)
		}
		if snapCS != nil {
			snap, _ := e.s.Snapshot()
			want := &pb.SnapshotMetadata{Index: proto.Uint64(snapIndex), Term: proto.Uint64(snapTerm), ConfState: snapCS}
			if !proto.Equal(snap.GetMetadata(), want) {
				t.Fatalf("seed %d step %d: snapshot %v, want %v", seed, step, snap.GetMetadata(), want)
			}
		}
	}
	// Truncated segments were recycled: the oldest segment, unless it was active at the
	// last truncation, still holds an entry after the truncation point (segments go
	// oldest first).
	e.s.mu.Lock()
	for _, seg := range e.s.segs[:min(max(len(e.s.segs)-2, 0), 1)] {
		if seg.maxIndex <= e.s.snap.GetIndex() {
			t.Errorf("seed %d: segment %d (entries up to %d) kept after truncation at %d", seed, seg.seq, seg.maxIndex, e.s.snap.GetIndex())
		}
	}
	e.s.mu.Unlock()
	if _, spares := e.segments(); len(spares) > maxSpares+1 {
		t.Errorf("seed %d: %d spares, want at most %d", seed, len(spares), maxSpares+1)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// Save, Truncate and the raft.Storage reads may run on different goroutines.
func TestConcurrentSaveTruncateAndReads(t *testing.T) {
	e := newEnv(t)
	s := e.s
	const n = 6000
	var wg sync.WaitGroup
	var done sync.WaitGroup
	stop := make(chan struct{})
	errc := make(chan error, 4)
	// Every entry has term 1 + index/100; the log is only appended to.
	wantTerm := func(i uint64) uint64 { return 1 + i/100 }
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 2))
			for {
				select {
				case <-stop:
					return
				default:
				}
				first, _ := s.FirstIndex()
				last, _ := s.LastIndex()
				if last < first {
					continue
				}
				lo := first + rng.Uint64N(last-first+1)
				hi := min(last+1, lo+1+rng.Uint64N(200))
				out, err := s.Entries(lo, hi, math.MaxUint64)
				if errors.Is(err, raft.ErrCompacted) {
					continue // truncated meanwhile
				}
				if err != nil {
					errc <- fmt.Errorf("Entries(%d, %d): %w", lo, hi, err)
					return
				}
				for k, en := range out {
					if en.GetIndex() != lo+uint64(k) || en.GetTerm() != wantTerm(en.GetIndex()) {
						errc <- fmt.Errorf("Entries(%d, %d)[%d] = index %d term %d", lo, hi, k, en.GetIndex(), en.GetTerm())
						return
					}
				}
				if term, err := s.Term(lo); err == nil && term != wantTerm(lo) {
					errc <- fmt.Errorf("Term(%d) = %d", lo, term)
					return
				}
			}
		}()
	}
	done.Add(1)
	go func() {
		defer done.Done()
		for i := uint64(1); i <= n; i += 50 {
			batch := make([]*pb.Entry, 0, 50)
			for j := i; j < i+50; j++ {
				batch = append(batch, ent(j, wantTerm(j)))
			}
			if err := s.Save(hardState(wantTerm(i), 1, i-1), batch, false); err != nil {
				errc <- err
				return
			}
			if i > 1000 && i%500 == 1 {
				if err := s.Truncate(i-1000, &pb.ConfState{Voters: []uint64{1}}); err != nil {
					errc <- fmt.Errorf("Truncate: %w", err)
					return
				}
			}
		}
	}()
	done.Wait()
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
}

// Entries racing with Truncate must answer either the entries or ErrCompacted. raft
// treats any other error (ErrUnavailable, "entry missing") from Entries as fatal: it
// panics. Truncate deletes the entries in Pebble before it moves the first index, so a
// reader in between finds a hole where it expects entries.
func TestEntriesConcurrentWithTruncate(t *testing.T) {
	e := newEnv(t)
	s := e.s
	const n = 3 * cacheLimit
	for i := uint64(1); i <= n; i += 1000 {
		e.save(nil, ents(i, i+999, 1))
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var bad []error
	var mu sync.Mutex
	var reads, compacted int
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				first, _ := s.FirstIndex()
				// Entries below the cache, so they come from Pebble.
				out, err := s.Entries(first, first+3, math.MaxUint64)
				mu.Lock()
				reads++
				switch {
				case errors.Is(err, raft.ErrCompacted):
					compacted++
				case err != nil:
					bad = append(bad, fmt.Errorf("Entries(%d, %d): %w", first, first+3, err))
				case len(out) != 3 || out[0].GetIndex() != first:
					bad = append(bad, fmt.Errorf("Entries(%d, %d) = %s", first, first+3, describe(out)))
				}
				mu.Unlock()
			}
		}()
	}
	for i := uint64(1); i <= 200; i++ {
		if err := s.Truncate(i, &pb.ConfState{Voters: []uint64{1}}); err != nil {
			t.Fatalf("Truncate(%d): %v", i, err)
		}
		mu.Lock()
		found := len(bad) > 0
		mu.Unlock()
		if found {
			break
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d reads, %d ErrCompacted", reads, compacted)
	for i, err := range bad {
		if i == 5 {
			t.Errorf("... %d bad reads in all", len(bad))
			break
		}
		t.Error(err)
	}
}
