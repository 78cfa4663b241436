package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// A crash in the middle of a write leaves a record cut short at the end of the last
// segment: it is dropped (it was never acknowledged), cleared, and the log goes on.
func TestTornTailIsDropped(t *testing.T) {
	for _, cut := range []int{1, headerSize - 1, headerSize + 3, -1} {
		t.Run(fmt.Sprint(cut), func(t *testing.T) {
			e := newEnv(t)
			e.save(hardState(1, 1, 3), ents(1, 3, 1))
			e.s.wmu.Lock()
			at := e.s.off
			e.s.wmu.Unlock()
			e.save(hardState(1, 1, 5), ents(4, 5, 1))
			e.s.wmu.Lock()
			end := e.s.off
			f := e.s.active.f
			e.s.wmu.Unlock()
			// What the disk holds when the write stopped early: a prefix of the record
			// (cut bytes), or the whole record with its last byte wrong (-1).
			if cut >= 0 {
				if err := writeZeros(f, at+int64(cut), end-at-int64(cut)); err != nil {
					t.Fatal(err)
				}
			} else if _, err := f.WriteAt([]byte{0xAA}, end-1); err != nil {
				t.Fatal(err)
			}
			e.reopen(false)
			if first, last := e.bounds(); first != 1 || last != 3 {
				t.Fatalf("after a torn write: bounds %d, %d; want 1, 3", first, last)
			}
			if hs := e.s.HardState(); hs.GetCommit() != 3 {
				t.Errorf("after a torn write: HardState %v, want the one before it", hs)
			}
			e.save(nil, ents(4, 6, 2))
			e.reopen(true)
			if got := e.mustEntries(1, 7, math.MaxUint64); !entriesEqual(got, append(ents(1, 3, 1), ents(4, 6, 2)...)) {
				t.Errorf("the log after a torn write and more saves: %s", describe(got))
			}
		})
	}
}

// Damage anywhere but the end of the last segment is not a torn write: Open refuses.
func TestDamagedSegmentIsAnError(t *testing.T) {
	e := newEnv(t)
	for i := uint64(0); i < 20; i++ {
		e.save(hardState(1, 1, i*50), ents(i*50+1, i*50+50, 1))
	}
	segs, _ := e.segments()
	if len(segs) < 3 {
		t.Fatalf("%d segments, want several", len(segs))
	}
	if err := e.s.Close(); err != nil {
		t.Fatal(err)
	}
	e.s = nil
	name := filepath.Join(e.dir, segmentName(segs[1]))
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	data[headerSize+100] ^= 0xFF // inside the first save record, after the opening mark
	if err := os.WriteFile(name, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(e.dir, e.opts); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("Open over a damaged middle segment: %v, want an error saying the log is damaged", err)
	}
	if err := os.Remove(name); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(e.dir, e.opts); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("Open with a segment missing: %v, want an error saying so", err)
	}
}

// A crash between sealing a segment and starting the next leaves a sealed last
// segment; a crash after the rename of a recycled file, before its opening mark, leaves
// a last segment with only another segment's records. Both open.
func TestCrashDuringRotation(t *testing.T) {
	e := newEnv(t)
	e.save(hardState(1, 1, 10), ents(1, 10, 1))
	e.s.wmu.Lock()
	seal := appendRecordHeader(nil)
	finishRecord(seal, e.s.active.seq, recSeal)
	if _, err := e.s.active.f.WriteAt(seal, e.s.off); err != nil {
		t.Fatal(err)
	}
	e.s.wmu.Unlock()
	e.reopen(false)
	if got := e.mustEntries(1, 11, math.MaxUint64); !entriesEqual(got, ents(1, 10, 1)) {
		t.Fatalf("after a crash behind a seal: %s", describe(got))
	}
	if segs, _ := e.segments(); len(segs) != 2 {
		t.Fatalf("segments %v, want a new one after the sealed one", segs)
	}
	e.save(nil, ents(11, 12, 1))

	// A copy of the first segment renamed as the third, as a recycled file would be.
	segs, _ := e.segments()
	old, err := os.ReadFile(filepath.Join(e.dir, segmentName(segs[0])))
	if err != nil {
		t.Fatal(err)
	}
	e.reopen(true)
	if err := e.s.Close(); err != nil {
		t.Fatal(err)
	}
	e.s = nil
	last := filepath.Join(e.dir, segmentName(segs[1]))
	data, _ := os.ReadFile(last)
	rs, end, _, _ := readSegment(&segment{seq: segs[1]}, data)
	seal = appendRecordHeader(nil)
	finishRecord(seal, segs[1], recSeal)
	copy(data[end:], seal)
	if err := os.WriteFile(last, data, 0o600); err != nil || len(rs) == 0 {
		t.Fatal(err, len(rs))
	}
	if err := os.WriteFile(filepath.Join(e.dir, segmentName(segs[1]+1)), old, 0o600); err != nil {
		t.Fatal(err)
	}
	e.openStore()
	if got := e.mustEntries(1, 13, math.MaxUint64); !entriesEqual(got, ents(1, 12, 1)) {
		t.Fatalf("after a crash behind a recycled segment's rename: %s", describe(got))
	}
	e.save(nil, ents(13, 13, 1))
	e.reopen(true)
	if got := e.mustEntries(1, 14, math.MaxUint64); !entriesEqual(got, ents(1, 13, 1)) {
		t.Fatalf("and after more saves: %s", describe(got))
	}
}

// Truncated segments are reused, so a long-running log keeps a bounded set of files
// and writes into blocks that are already allocated.
func TestTruncatedSegmentsAreRecycled(t *testing.T) {
	e := newEnv(t)
	var idx uint64
	var recycled int
	for round := range 40 {
		for range 10 {
			e.save(hardState(1, 1, idx), ents(idx+1, idx+30, 1))
			idx += 30
		}
		if err := e.s.Truncate(idx-50, &pb.ConfState{Voters: []uint64{1}}); err != nil {
			t.Fatal(err)
		}
		segs, spares := e.segments()
		if len(segs) > 3 || len(spares) > maxSpares+1 {
			t.Fatalf("round %d: segments %v, spares %v: truncated segments are kept", round, segs, spares)
		}
		recycled = int(segs[0]) - 1
	}
	if recycled < 10 {
		t.Fatalf("%d segments recycled", recycled)
	}
	e.reopen(false)
	if got := e.mustEntries(idx-49, idx+1, math.MaxUint64); !entriesEqual(got, ents(idx-49, idx, 1)) {
		t.Fatalf("after reopening a log of recycled segments: %s", describe(got))
	}
	if first, _ := e.bounds(); first != idx-49 {
		t.Fatalf("first index %d, want %d", first, idx-49)
	}
}

// A write or sync that fails leaves the log's durable state unknown: that Save and
// every later one fail, and nothing after it is acknowledged.
func TestFailedSyncStopsTheLog(t *testing.T) {
	fs := &failingFS{FS: vfs.Default}
	e := &env{t: t, dir: t.TempDir(), opts: Options{FS: fs, SegmentSize: testSegmentSize}}
	e.openStore()
	defer e.s.Close()
	e.save(hardState(1, 1, 0), ents(1, 5, 1))
	fs.fail.Store(true)
	if err := e.s.Save(hardState(1, 1, 5), ents(6, 6, 1), true); err == nil {
		t.Fatal("Save with a failing fsync succeeded")
	}
	fs.fail.Store(false)
	if err := e.s.Save(nil, ents(6, 6, 1), true); err == nil {
		t.Fatal("Save after a failed fsync succeeded")
	}
	if _, last := e.bounds(); last != 5 {
		t.Fatalf("last index %d after failed saves, want 5", last)
	}
}

// A data directory written by a kvmesh that kept its Raft log in Pebble is imported
// on first open: the same log, the old keys gone, other keys left alone.
func TestImportPebble(t *testing.T) {
	dir := t.TempDir()
	db, err := pebble.Open(filepath.Join(dir, "raft"), &pebble.Options{Logger: quietLogger{}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	set := func(k []byte, m proto.Message) {
		v, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Set(k, v, pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
	hs := hardState(3, 2, 700)
	set(legacyHardStateKey, hs)
	set(legacySnapshotKey, &pb.SnapshotMetadata{Index: proto.Uint64(100), Term: proto.Uint64(2), ConfState: &pb.ConfState{Voters: []uint64{1, 2, 3}}})
	want := ents(101, 750, 3)
	for _, e := range want {
		set(binary.BigEndian.AppendUint64([]byte("Rl"), e.GetIndex()), e)
	}
	if err := db.Set([]byte("Aid"), []byte("identity"), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	logDir := filepath.Join(dir, "wal")
	opts := Options{SegmentSize: testSegmentSize}
	for range 2 { // the second finds nothing left to import
		if err := ImportPebble(db, logDir, opts); err != nil {
			t.Fatal(err)
		}
	}
	s, err := Open(logDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.Entries(101, 751, math.MaxUint64)
	if err != nil || !entriesEqual(got, want) {
		t.Fatalf("imported entries: %s, %v", describe(got), err)
	}
	if !proto.Equal(s.HardState(), hs) {
		t.Errorf("imported HardState %v, want %v", s.HardState(), hs)
	}
	if first, _ := s.FirstIndex(); first != 101 {
		t.Errorf("imported first index %d, want 101", first)
	}
	if _, cs, _ := s.InitialState(); len(cs.GetVoters()) != 3 {
		t.Errorf("imported conf state %v", cs)
	}
	it, _ := db.NewIter(nil)
	var keys []string
	for it.First(); it.Valid(); it.Next() {
		keys = append(keys, string(it.Key()))
	}
	it.Close()
	if len(keys) != 1 || keys[0] != "Aid" {
		t.Errorf("keys left in Pebble: %q, want only the identity", keys)
	}
}

// failingFS fails every sync while fail is set.
type failingFS struct {
	vfs.FS
	fail atomic.Bool
}

func (fs *failingFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	f, err := fs.FS.OpenReadWrite(name, c, opts...)
	if err != nil {
		return nil, err
	}
	return &failingFile{File: f, fs: fs}, nil
}

type failingFile struct {
	vfs.File
	fs *failingFS
}

var errInjected = errors.New("injected: input/output error")

func (f *failingFile) SyncData() error {
	if f.fs.fail.Load() {
		return errInjected
	}
	return f.File.SyncData()
}

type quietLogger struct{}

func (quietLogger) Infof(string, ...any)              {}
func (quietLogger) Errorf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
func (quietLogger) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
