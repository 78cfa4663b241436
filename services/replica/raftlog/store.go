// Package raftlog keeps the Raft log, the HardState and the truncation point in a
// write-ahead log of its own (the format is in wal.go) and serves them to
// go.etcd.io/raft through the raft.Storage interface.
//
// A synced Save is one write and one fdatasync on the caller's goroutine, into a
// segment whose blocks are already allocated and written, as etcd's WAL does: no
// commit pipeline, no goroutine hand-off, no file growth to journal. Entries are read
// back from a tail cache or, by their offset, from the segment files.
//
// Whoever truncates the log must first make the applied state it relies on durable.
package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/cockroachdb/pebble/v2/vfs"
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// DefaultSegmentSize is the size segment files are prepared at (a record larger than
// what is left starts a new segment; one larger than a segment grows it).
const DefaultSegmentSize = 16 << 20

// maxSpares bounds the truncated segments kept for reuse.
const maxSpares = 2

// cacheLimit bounds the recent entries kept in memory. Committed entries are almost
// always read back right after they were appended, so a small tail cache saves a file
// read per Ready.
const cacheLimit = 4096

// Options configure a Store.
type Options struct {
	// FS is the file system the log lives on (default: the operating system's); tests
	// inject slow or failing disks through it.
	FS vfs.FS
	// SegmentSize is the size segments are prepared at (default DefaultSegmentSize).
	SegmentSize int64
}

// position is where an entry is: its encoding's offset and length in a segment.
type position struct {
	seg  *segment
	off  int64
	size uint32
	term uint64
}

// cachedEntry is an entry of the cache and its encoded size, known from Save: raft
// asks for sizes with every read, and measuring a message is not free.
type cachedEntry struct {
	e    *pb.Entry
	size uint64
}

// Store is a raft.Storage over a write-ahead log in a directory. Save, Truncate and
// the raft.Storage reads may run on different goroutines.
type Store struct {
	fs      vfs.FS
	dir     string
	segSize int64

	// wmu orders the writers (Save, Truncate, ApplySnapshot); the fields up to mu are
	// theirs.
	wmu       sync.Mutex
	active    *segment
	off       int64 // where the next record goes in active
	headerEnd int64 // the end of active's opening mark
	buf       []byte
	failed    error // a write or sync failed: the log's durable state is unknown

	mu        sync.Mutex
	hardState *pb.HardState
	snap      *pb.SnapshotMetadata // index and term of the entry before the first one kept
	conf      *pb.ConfState        // configuration as of the applied index, if known
	pos       []position           // entries snap.Index+1 … lastIndex()
	cache     []cachedEntry        // consecutive entries ending at lastIndex()
	segs      []*segment           // in order; the last is active
	spares    []string             // paths of files ready to become segments
	nextSpare uint64
	preparing bool
	closed    bool
	prep      sync.WaitGroup
}

var _ raft.Storage = (*Store)(nil)

// Open loads the log in dir, creating it if there is none. A torn record at the end
// (a crash mid-write) is dropped; damage anywhere else is an error.
func Open(dir string, opts Options) (*Store, error) {
	if opts.FS == nil {
		opts.FS = vfs.Default
	}
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	s := &Store{fs: opts.FS, dir: dir, segSize: opts.SegmentSize, hardState: &pb.HardState{},
		snap: &pb.SnapshotMetadata{ConfState: &pb.ConfState{}}}
	if err := s.fs.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("raftlog: %w", err)
	}
	seqs, spares, partial, err := listDir(s.fs, dir)
	if err != nil {
		return nil, fmt.Errorf("raftlog: %w", err)
	}
	for _, name := range partial {
		if err := s.fs.Remove(s.fs.PathJoin(dir, name)); err != nil {
			return nil, fmt.Errorf("raftlog: %w", err)
		}
	}
	for _, name := range spares {
		s.spares = append(s.spares, s.fs.PathJoin(dir, name))
		if n, err := strconv.ParseUint(strings.TrimPrefix(name, "spare-"), 16, 64); err == nil && n >= s.nextSpare {
			s.nextSpare = n + 1
		}
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if len(seqs) == 0 {
		err = s.startSegment(1)
	} else {
		err = s.replay(seqs)
	}
	if err != nil {
		s.closeFiles()
		return nil, err
	}
	return s, nil
}

// replay rebuilds the log from its segments.
func (s *Store) replay(seqs []uint64) error {
	var recs []record
	var end, size int64
	var sealed, torn bool
	for i, seq := range seqs {
		name := s.fs.PathJoin(s.dir, segmentName(seq))
		if i > 0 && seq != seqs[i-1]+1 {
			return fmt.Errorf("raftlog: segment %s follows %s: a segment is missing", segmentName(seq), segmentName(seqs[i-1]))
		}
		f, err := s.fs.OpenReadWrite(name, vfs.WriteCategoryUnspecified)
		if err != nil {
			return fmt.Errorf("raftlog: %w", err)
		}
		seg := &segment{seq: seq, f: f}
		s.segs = append(s.segs, seg)
		data, err := readAll(f)
		if err != nil {
			return fmt.Errorf("raftlog: read %s: %w", name, err)
		}
		var segRecs []record
		segRecs, end, sealed, torn = readSegment(seg, data)
		size = int64(len(data))
		if i < len(seqs)-1 && !sealed {
			return fmt.Errorf("raftlog: segment %s ends at byte %d without its seal: the log is damaged", name, end)
		}
		if len(segRecs) > 0 && i == len(seqs)-1 {
			s.headerEnd = segRecs[0].off + int64(len(segRecs[0].payload))
		}
		recs = append(recs, segRecs...)
	}
	// The last mark is the truncation point in force: entries at or before it were
	// discarded, and their segments may be gone.
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i].typ == recMark || recs[i].typ == recReset {
			meta, _, err := decodeMark(recs[i].payload)
			if err != nil {
				return err
			}
			s.snap = meta
			break
		}
	}
	for _, rec := range recs {
		switch rec.typ {
		case recSave:
			hs, err := decodeSave(rec.payload, func(e *pb.Entry, off, size int) error {
				idx := e.GetIndex()
				rec.seg.maxIndex = max(rec.seg.maxIndex, idx)
				if idx <= s.snap.GetIndex() {
					// Before the truncation point; it still replaced what followed it.
					s.pos = s.pos[:0]
					return nil
				}
				if last := s.lastIndex(); idx > last+1 {
					return fmt.Errorf("raftlog: entry %d follows entry %d in %s: the log is missing entries", idx, last, segmentName(rec.seg.seq))
				}
				s.pos = append(s.pos[:idx-s.snap.GetIndex()-1], position{seg: rec.seg, off: rec.off + int64(off), size: uint32(size), term: e.GetTerm()})
				return nil
			})
			if err != nil {
				return err
			}
			if hs != nil {
				s.hardState = hs
			}
		case recMark, recReset:
			_, hs, err := decodeMark(rec.payload)
			if err != nil {
				return err
			}
			if hs != nil {
				s.hardState = hs
			}
			if rec.typ == recReset {
				s.pos = nil
			}
		case recSeal:
		default:
			return fmt.Errorf("raftlog: unknown record type %d in %s", rec.typ, segmentName(rec.seg.seq))
		}
	}
	last := s.segs[len(s.segs)-1]
	s.active, s.off = last, end
	switch {
	case torn:
		// Whatever follows the last whole record is a write that never completed;
		// clear it so no part of it can ever be read as a record.
		if err := writeZeros(last.f, end, size-end); err != nil {
			return s.fail(err)
		}
		if err := last.f.SyncData(); err != nil {
			return s.fail(err)
		}
	case sealed:
		// The crash came between sealing a segment and starting the next.
		return s.startSegment(last.seq + 1)
	}
	if end == 0 {
		// A new segment whose opening mark did not reach the disk.
		return s.writeMark()
	}
	return nil
}

// startSegment makes segment seq the active one: a spare or a newly prepared file,
// opened with a mark of the state so far. Writers only.
func (s *Store) startSegment(seq uint64) error {
	name := s.fs.PathJoin(s.dir, segmentName(seq))
	s.mu.Lock()
	var spare string
	if len(s.spares) > 0 {
		spare, s.spares = s.spares[0], s.spares[1:]
	}
	s.mu.Unlock()
	if spare == "" {
		if err := prepareFile(s.fs, s.dir, segmentName(seq), s.segSize); err != nil {
			return s.fail(err)
		}
	} else {
		if err := s.fs.Rename(spare, name); err != nil {
			return s.fail(err)
		}
		if err := syncDir(s.fs, s.dir); err != nil {
			return s.fail(err)
		}
	}
	f, err := s.fs.OpenReadWrite(name, vfs.WriteCategoryUnspecified)
	if err != nil {
		return s.fail(err)
	}
	seg := &segment{seq: seq, f: f}
	s.mu.Lock()
	s.segs = append(s.segs, seg)
	s.mu.Unlock()
	s.active, s.off = seg, 0
	return s.writeMark()
}

// writeMark opens the active segment with the truncation point and HardState in force,
// synced, so the segments before it can go once their entries are truncated.
func (s *Store) writeMark() error {
	s.mu.Lock()
	snap, hs := s.snap, s.hardState
	s.mu.Unlock()
	rec, err := appendMark(appendRecordHeader(nil), snap, hs)
	if err != nil {
		return err
	}
	if _, err := s.write(rec, recMark, true); err != nil {
		return err
	}
	s.headerEnd = s.off
	return nil
}

// write appends rec, a record built after appendRecordHeader, to the active segment,
// first starting a new segment when it does not fit in what is left; it returns where
// in the active segment the record went. Writers only.
func (s *Store) write(rec []byte, typ byte, sync bool) (int64, error) {
	if s.failed != nil {
		return 0, s.failed
	}
	if s.off > s.headerEnd && s.off+int64(len(rec)) > s.segSize {
		if err := s.rotate(); err != nil {
			return 0, err
		}
	}
	finishRecord(rec, s.active.seq, typ)
	at := s.off
	if _, err := s.active.f.WriteAt(rec, at); err != nil {
		return 0, s.fail(err)
	}
	s.off += int64(len(rec))
	if sync {
		if err := s.active.f.SyncData(); err != nil {
			return 0, s.fail(err)
		}
	}
	if s.off > s.segSize/2 {
		s.prepareSpare()
	}
	return at, nil
}

// rotate seals the active segment and starts the next.
func (s *Store) rotate() error {
	seal := appendRecordHeader(nil)
	finishRecord(seal, s.active.seq, recSeal)
	if _, err := s.active.f.WriteAt(seal, s.off); err != nil {
		return s.fail(err)
	}
	if err := s.active.f.SyncData(); err != nil {
		return s.fail(err)
	}
	return s.startSegment(s.active.seq + 1)
}

// prepareSpare writes a zero-filled spare in the background when none is waiting, so
// the next segment is ready before the active one is full.
func (s *Store) prepareSpare() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.preparing || s.closed || len(s.spares) > 0 {
		return
	}
	s.preparing = true
	name := spareName(s.nextSpare)
	s.nextSpare++
	s.prep.Add(1)
	go func() {
		defer s.prep.Done()
		// A failure leaves no spare; the rotation then prepares one itself and reports
		// what fails.
		err := prepareFile(s.fs, s.dir, name, s.segSize)
		s.mu.Lock()
		defer s.mu.Unlock()
		s.preparing = false
		if err == nil {
			s.spares = append(s.spares, s.fs.PathJoin(s.dir, name))
		}
	}()
}

// fail records that the log's files are in an unknown state: every later write fails.
func (s *Store) fail(err error) error {
	s.failed = fmt.Errorf("raftlog: %w", err)
	return s.failed
}

// recycle removes segments whose entries are all truncated, keeping a few as spares,
// once the mark that truncated them is synced. It runs outside wmu: the next Save does
// not wait for its renames and directory sync.
func (s *Store) recycle(dead []*segment) error {
	if len(dead) == 0 {
		return nil
	}
	for _, seg := range dead {
		name := s.fs.PathJoin(s.dir, segmentName(seg.seq))
		if err := seg.f.Close(); err != nil {
			return fmt.Errorf("raftlog: %w", err)
		}
		s.mu.Lock()
		keep := len(s.spares) < maxSpares
		spare := s.fs.PathJoin(s.dir, spareName(s.nextSpare))
		s.nextSpare++
		s.mu.Unlock()
		if !keep {
			if err := s.fs.Remove(name); err != nil {
				return fmt.Errorf("raftlog: %w", err)
			}
			continue
		}
		if err := s.fs.Rename(name, spare); err != nil {
			return fmt.Errorf("raftlog: %w", err)
		}
		s.mu.Lock()
		s.spares = append(s.spares, spare)
		s.mu.Unlock()
	}
	return syncDir(s.fs, s.dir)
}

// Close waits for a spare being prepared and closes the files. Nothing may use the
// Store afterwards.
func (s *Store) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.prep.Wait()
	return s.closeFiles()
}

func (s *Store) closeFiles() error {
	var errs []error
	for _, seg := range s.segs {
		errs = append(errs, seg.f.Close())
	}
	s.segs = nil
	return errors.Join(errs...)
}

// lastIndex is the index of the last entry (or of the truncation point). Under mu.
func (s *Store) lastIndex() uint64 { return s.snap.GetIndex() + uint64(len(s.pos)) }

// SetConfState tells the store the configuration in force at the applied index
// (which the state machine records with every applied conf change). Raft restarts from
// the applied index without replaying older conf changes, so InitialState must report
// this configuration rather than the older one of the last truncation.
func (s *Store) SetConfState(cs *pb.ConfState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conf = proto.Clone(cs).(*pb.ConfState)
}

// InitialState implements raft.Storage.
func (s *Store) InitialState() (*pb.HardState, *pb.ConfState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cs := s.snap.GetConfState()
	if s.conf != nil {
		cs = s.conf
	}
	if cs == nil {
		cs = &pb.ConfState{}
	}
	return proto.Clone(s.hardState).(*pb.HardState), proto.Clone(cs).(*pb.ConfState), nil
}

// HardState returns the last saved HardState.
func (s *Store) HardState() *pb.HardState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return proto.Clone(s.hardState).(*pb.HardState)
}

// FirstIndex implements raft.Storage.
func (s *Store) FirstIndex() (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snap.GetIndex() + 1, nil
}

// LastIndex implements raft.Storage.
func (s *Store) LastIndex() (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastIndex(), nil
}

// Snapshot implements raft.Storage. The state machine is always at least as new as
// the snapshot index, so the snapshot carries metadata only; the data is streamed
// separately when a follower needs it.
func (s *Store) Snapshot() (*pb.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	meta := proto.Clone(s.snap).(*pb.SnapshotMetadata)
	if meta.ConfState == nil {
		meta.ConfState = &pb.ConfState{}
	}
	return &pb.Snapshot{Metadata: meta}, nil
}

// Term implements raft.Storage.
func (s *Store) Term(i uint64) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case i == s.snap.GetIndex():
		return s.snap.GetTerm(), nil
	case i < s.snap.GetIndex():
		return 0, raft.ErrCompacted
	case i > s.lastIndex():
		return 0, raft.ErrUnavailable
	}
	return s.pos[i-s.snap.GetIndex()-1].term, nil
}

// Entries implements raft.Storage.
func (s *Store) Entries(lo, hi, maxSize uint64) ([]*pb.Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if lo <= s.snap.GetIndex() {
		return nil, raft.ErrCompacted
	}
	if last := s.lastIndex(); hi > last+1 {
		return nil, fmt.Errorf("raftlog: entries [%d, %d) beyond last index %d: %w", lo, hi, last, raft.ErrUnavailable)
	}
	if lo >= hi {
		return nil, nil
	}
	if len(s.cache) > 0 && lo >= s.cache[0].e.GetIndex() {
		var out []*pb.Entry
		var size uint64
		first := s.cache[0].e.GetIndex()
		for _, c := range s.cache[lo-first : hi-first] {
			size += c.size
			if len(out) > 0 && size > maxSize {
				break
			}
			out = append(out, c.e)
		}
		return out, nil
	}
	// The entries that fit maxSize (at least one), read in runs of adjacent ones.
	ps := s.pos[lo-s.snap.GetIndex()-1 : hi-s.snap.GetIndex()-1]
	var size uint64
	for i, p := range ps {
		size += uint64(p.size)
		if i > 0 && size > maxSize {
			ps = ps[:i]
			break
		}
	}
	out := make([]*pb.Entry, 0, len(ps))
	for len(ps) > 0 {
		n, end := 1, ps[0].off+int64(ps[0].size)
		for n < len(ps) && ps[n].seg == ps[0].seg && ps[n].off == end+4 {
			end = ps[n].off + int64(ps[n].size)
			n++
		}
		buf := make([]byte, end-ps[0].off)
		if _, err := ps[0].seg.f.ReadAt(buf, ps[0].off); err != nil {
			return nil, fmt.Errorf("raftlog: read entries from %s: %w", segmentName(ps[0].seg.seq), err)
		}
		for _, p := range ps[:n] {
			at := p.off - ps[0].off
			e := &pb.Entry{}
			if err := proto.Unmarshal(buf[at:at+int64(p.size)], e); err != nil {
				return nil, fmt.Errorf("raftlog: decode entry: %w", err)
			}
			out = append(out, e)
		}
		ps = ps[n:]
	}
	return out, nil
}

// Save durably writes what a Ready asks to persist: entries (replacing any conflicting
// suffix of the log) and the HardState, in one record, synced when sync is set.
func (s *Store) Save(hs *pb.HardState, entries []*pb.Entry, sync bool) error {
	if raft.IsEmptyHardState(hs) && len(entries) == 0 {
		return nil
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if len(entries) > 0 {
		s.mu.Lock()
		snapIndex, last := s.snap.GetIndex(), s.lastIndex()
		s.mu.Unlock()
		if first := entries[0].GetIndex(); first <= snapIndex || first > last+1 {
			return fmt.Errorf("raftlog: entries from %d do not continue the log (%d, %d]", first, snapIndex, last)
		}
	}
	b := appendRecordHeader(s.buf[:0])
	var err error
	if raft.IsEmptyHardState(hs) {
		b = append(b, 0)
	} else {
		b = append(b, 1)
		var at int
		b, at = appendLen(b)
		if b, err = (proto.MarshalOptions{}).MarshalAppend(b, hs); err != nil {
			return err
		}
		putLen(b, at)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(entries)))
	offs := make([]int, len(entries))
	for i, e := range entries {
		var at int
		b, at = appendLen(b)
		if b, err = (proto.MarshalOptions{}).MarshalAppend(b, e); err != nil {
			return err
		}
		putLen(b, at)
		offs[i] = at + 4
	}
	s.buf = b
	at, err := s.write(b, recSave, sync)
	if err != nil {
		return err
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if !raft.IsEmptyHardState(hs) {
		s.hardState = proto.Clone(hs).(*pb.HardState)
	}
	if len(entries) == 0 {
		return nil
	}
	first := entries[0].GetIndex()
	if len(s.cache) > 0 && first > s.cache[0].e.GetIndex() && first <= s.lastIndex()+1 {
		s.cache = s.cache[:first-s.cache[0].e.GetIndex()]
	} else {
		s.cache = s.cache[:0]
	}
	s.pos = s.pos[:first-s.snap.GetIndex()-1]
	for i, e := range entries {
		end := len(b)
		if i+1 < len(entries) {
			end = offs[i+1] - 4
		}
		size := end - offs[i]
		s.pos = append(s.pos, position{seg: s.active, off: at + int64(offs[i]), size: uint32(size), term: e.GetTerm()})
		s.cache = append(s.cache, cachedEntry{e: e, size: uint64(size)})
	}
	s.active.maxIndex = max(s.active.maxIndex, entries[len(entries)-1].GetIndex())
	if n := len(s.cache); n > cacheLimit {
		s.cache = append([]cachedEntry(nil), s.cache[n-cacheLimit/2:]...)
	}
	return nil
}

// Truncate discards the log up to and including index, which must be applied and, with
// the state it produced, durable. cs is the configuration in force at index.
func (s *Store) Truncate(index uint64, cs *pb.ConfState) error {
	term, err := s.Term(index)
	if err != nil {
		return fmt.Errorf("raftlog: truncate at %d: %w", index, err)
	}
	gone, err := s.mark(index, term, cs)
	if err != nil {
		return err
	}
	return s.recycle(gone)
}

// mark writes the truncation at index and returns the segments it leaves with no entry.
func (s *Store) mark(index, term uint64, cs *pb.ConfState) ([]*segment, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	first := s.snap.GetIndex() + 1
	dead := 0
	for dead < len(s.segs)-1 && s.segs[dead].maxIndex <= index {
		dead++
	}
	s.mu.Unlock()
	if index < first {
		return nil, nil
	}
	meta := &pb.SnapshotMetadata{Index: proto.Uint64(index), Term: proto.Uint64(term), ConfState: cs}
	b, err := appendMark(appendRecordHeader(s.buf[:0]), meta, nil)
	if err != nil {
		return nil, err
	}
	s.buf = b
	// Synced only when segments go: otherwise a lost mark leaves the entries it
	// truncated in place, and the next synced write makes it durable anyway.
	if _, err := s.write(b, recMark, dead > 0); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.pos = append([]position(nil), s.pos[index+1-first:]...)
	s.snap = meta
	for len(s.cache) > 0 && s.cache[0].e.GetIndex() <= index {
		s.cache = s.cache[1:]
	}
	gone := append([]*segment(nil), s.segs[:dead]...)
	s.segs = s.segs[dead:]
	s.mu.Unlock()
	return gone, nil
}

// ApplySnapshot makes the log start after a snapshot of the state machine: every entry
// is discarded, the snapshot's index and term become the truncation point, and the
// commit index covers at least the snapshot (which only holds committed entries). The
// write is synced.
func (s *Store) ApplySnapshot(meta *pb.SnapshotMetadata) error {
	meta = proto.Clone(meta).(*pb.SnapshotMetadata)
	if meta.ConfState == nil {
		meta.ConfState = &pb.ConfState{}
	}
	gone, err := s.reset(meta)
	if err != nil {
		return err
	}
	return s.recycle(gone)
}

// reset writes the reset to meta and returns the segments before the one holding it.
func (s *Store) reset(meta *pb.SnapshotMetadata) ([]*segment, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	hs := proto.Clone(s.hardState).(*pb.HardState)
	s.mu.Unlock()
	if hs.GetCommit() < meta.GetIndex() {
		hs.Commit = proto.Uint64(meta.GetIndex())
	}
	if hs.GetTerm() < meta.GetTerm() {
		hs.Term = proto.Uint64(meta.GetTerm())
	}
	b, err := appendMark(appendRecordHeader(s.buf[:0]), meta, hs)
	if err != nil {
		return nil, err
	}
	s.buf = b
	if _, err := s.write(b, recReset, true); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.snap = meta
	s.conf = nil
	s.hardState = hs
	s.pos = nil
	s.cache = s.cache[:0]
	gone := append([]*segment(nil), s.segs[:len(s.segs)-1]...)
	s.segs = s.segs[len(s.segs)-1:]
	s.mu.Unlock()
	return gone, nil
}

// EnsureCommitted raises the stored commit index to index, an entry known to be
// committed (the state machine applied it) whose commit index was lost: the commit
// index is written without sync, the applied state in another database.
func (s *Store) EnsureCommitted(index uint64) error {
	s.mu.Lock()
	hs := proto.Clone(s.hardState).(*pb.HardState)
	last := s.lastIndex()
	s.mu.Unlock()
	if hs.GetCommit() >= index {
		return nil
	}
	if index > last {
		return fmt.Errorf("raftlog: commit %d beyond last index %d", index, last)
	}
	hs.Commit = proto.Uint64(index)
	return s.Save(hs, nil, true)
}

// appendMark appends a recMark or recReset payload.
func appendMark(b []byte, meta *pb.SnapshotMetadata, hs *pb.HardState) ([]byte, error) {
	var at int
	var err error
	b, at = appendLen(b)
	if b, err = (proto.MarshalOptions{}).MarshalAppend(b, meta); err != nil {
		return nil, err
	}
	putLen(b, at)
	b, at = appendLen(b)
	if hs != nil && !raft.IsEmptyHardState(hs) {
		if b, err = (proto.MarshalOptions{}).MarshalAppend(b, hs); err != nil {
			return nil, err
		}
	}
	putLen(b, at)
	return b, nil
}

var errBadRecord = errors.New("raftlog: a record with a valid checksum does not decode: the log is damaged")

func decodeMark(p []byte) (*pb.SnapshotMetadata, *pb.HardState, error) {
	mv, rest, ok := cutLen(p)
	if !ok {
		return nil, nil, errBadRecord
	}
	hv, _, ok := cutLen(rest)
	if !ok {
		return nil, nil, errBadRecord
	}
	meta := &pb.SnapshotMetadata{}
	if err := proto.Unmarshal(mv, meta); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errBadRecord, err)
	}
	if meta.ConfState == nil {
		meta.ConfState = &pb.ConfState{}
	}
	if len(hv) == 0 {
		return meta, nil, nil
	}
	hs := &pb.HardState{}
	if err := proto.Unmarshal(hv, hs); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errBadRecord, err)
	}
	return meta, hs, nil
}

// decodeSave decodes a recSave payload: it returns the HardState, if any, and calls
// visit with each entry, its offset in the payload and its size.
func decodeSave(p []byte, visit func(e *pb.Entry, off, size int) error) (*pb.HardState, error) {
	if len(p) < 5 {
		return nil, errBadRecord
	}
	var hs *pb.HardState
	rest := p[1:]
	if p[0] == 1 {
		hv, r, ok := cutLen(rest)
		if !ok {
			return nil, errBadRecord
		}
		hs = &pb.HardState{}
		if err := proto.Unmarshal(hv, hs); err != nil {
			return nil, fmt.Errorf("%w: %v", errBadRecord, err)
		}
		rest = r
	}
	if len(rest) < 4 {
		return nil, errBadRecord
	}
	n := binary.LittleEndian.Uint32(rest)
	rest = rest[4:]
	for range n {
		ev, r, ok := cutLen(rest)
		if !ok {
			return nil, errBadRecord
		}
		e := &pb.Entry{}
		if err := proto.Unmarshal(ev, e); err != nil {
			return nil, fmt.Errorf("%w: %v", errBadRecord, err)
		}
		if err := visit(e, len(p)-len(rest)+4, len(ev)); err != nil {
			return nil, err
		}
		rest = r
	}
	return hs, nil
}
