// Package raftlog keeps the Raft log, the HardState and the snapshot metadata in
// Pebble and serves them to go.etcd.io/raft through the raft.Storage interface.
//
// The log has a Pebble database of its own (the state machine has another, which a
// snapshot replaces whole). Whoever truncates the log must first make the applied
// state it relies on durable.
package raftlog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"go.etcd.io/raft/v3"
	pb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Key layout. Every key starts with the byte 'R' so the log never interleaves with the
// state machine's keys, which use other first bytes.
var (
	entryPrefix  = []byte("Rl") // + big-endian index → raftpb.Entry
	hardStateKey = []byte("Rh") // → raftpb.HardState
	snapshotKey  = []byte("Rs") // → raftpb.SnapshotMetadata of the last log truncation
)

// cacheLimit bounds the recent entries kept in memory. Committed entries are almost
// always read back right after they were appended, so a small tail cache saves a Pebble
// read per Ready.
const cacheLimit = 4096

func entryKey(index uint64) []byte {
	k := make([]byte, len(entryPrefix)+8)
	copy(k, entryPrefix)
	binary.BigEndian.PutUint64(k[len(entryPrefix):], index)
	return k
}

// Store is a raft.Storage over Pebble. Save, Truncate and the raft.Storage reads may
// run on different goroutines.
type Store struct {
	db *pebble.DB

	mu        sync.Mutex
	hardState *pb.HardState
	snap      *pb.SnapshotMetadata // index and term of the entry before the first one kept
	conf      *pb.ConfState        // configuration as of the applied index, if known
	last      uint64
	cache     []cachedEntry // consecutive entries ending at last
}

// cachedEntry is an entry of the cache and its encoded size, known from Save: raft
// asks for sizes with every read, and measuring a message is not free.
type cachedEntry struct {
	e    *pb.Entry
	size uint64
}

var _ raft.Storage = (*Store)(nil)

// Open loads the log's bounds and state from db.
func Open(db *pebble.DB) (*Store, error) {
	s := &Store{db: db, hardState: &pb.HardState{}, snap: &pb.SnapshotMetadata{ConfState: &pb.ConfState{}}}
	if err := get(db, hardStateKey, s.hardState); err != nil {
		return nil, fmt.Errorf("load hard state: %w", err)
	}
	if err := get(db, snapshotKey, s.snap); err != nil {
		return nil, fmt.Errorf("load snapshot metadata: %w", err)
	}
	if s.snap.ConfState == nil {
		s.snap.ConfState = &pb.ConfState{}
	}
	s.last = s.snap.GetIndex()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: entryKey(0), UpperBound: entryKey(1<<64 - 1)})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	if it.Last() {
		s.last = binary.BigEndian.Uint64(it.Key()[len(entryPrefix):])
	}
	return s, it.Error()
}

func get(db *pebble.DB, key []byte, m proto.Message) error {
	v, closer, err := db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer closer.Close()
	return proto.Unmarshal(v, m)
}

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
	cs := s.snap.ConfState
	if s.conf != nil {
		cs = s.conf
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
	return s.last, nil
}

// Snapshot implements raft.Storage. The state machine lives in the same database and
// is always at least as new as the snapshot index, so the snapshot carries metadata
// only; the data is streamed separately when a follower needs it.
func (s *Store) Snapshot() (*pb.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return &pb.Snapshot{Metadata: proto.Clone(s.snap).(*pb.SnapshotMetadata)}, nil
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
	case i > s.last:
		return 0, raft.ErrUnavailable
	}
	if e := s.cached(i); e != nil {
		return e.GetTerm(), nil
	}
	var e pb.Entry
	if err := s.readEntry(i, &e); err != nil {
		return 0, err
	}
	return e.GetTerm(), nil
}

// Entries implements raft.Storage.
func (s *Store) Entries(lo, hi, maxSize uint64) ([]*pb.Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if lo <= s.snap.GetIndex() {
		return nil, raft.ErrCompacted
	}
	if hi > s.last+1 {
		return nil, fmt.Errorf("raftlog: entries [%d, %d) beyond last index %d: %w", lo, hi, s.last, raft.ErrUnavailable)
	}
	if lo >= hi {
		return nil, nil
	}
	var out []*pb.Entry
	var size uint64
	add := func(e *pb.Entry, n uint64) bool {
		size += n
		if len(out) > 0 && size > maxSize {
			return false
		}
		out = append(out, e)
		return true
	}
	if len(s.cache) > 0 && lo >= s.cache[0].e.GetIndex() {
		first := s.cache[0].e.GetIndex()
		for _, c := range s.cache[lo-first : hi-first] {
			if !add(c.e, c.size) {
				break
			}
		}
		return out, nil
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: entryKey(lo), UpperBound: entryKey(hi)})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	next := lo
	for it.First(); it.Valid(); it.Next() {
		e := &pb.Entry{}
		if err := proto.Unmarshal(it.Value(), e); err != nil {
			return nil, fmt.Errorf("raftlog: decode entry: %w", err)
		}
		if e.GetIndex() != next {
			return nil, fmt.Errorf("raftlog: entry %d missing (found %d): %w", next, e.GetIndex(), raft.ErrUnavailable)
		}
		next++
		if !add(e, uint64(len(it.Value()))) {
			break
		}
	}
	if err := it.Error(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, raft.ErrUnavailable
	}
	return out, nil
}

func (s *Store) cached(i uint64) *pb.Entry {
	if len(s.cache) == 0 || i < s.cache[0].e.GetIndex() || i > s.last {
		return nil
	}
	return s.cache[i-s.cache[0].e.GetIndex()].e
}

func (s *Store) readEntry(i uint64, e *pb.Entry) error {
	v, closer, err := s.db.Get(entryKey(i))
	if errors.Is(err, pebble.ErrNotFound) {
		return raft.ErrUnavailable
	}
	if err != nil {
		return err
	}
	defer closer.Close()
	return proto.Unmarshal(v, e)
}

// Save durably writes what a Ready asks to persist: entries (replacing any conflicting
// suffix of the log) and the HardState, in one batch, synced when sync is set.
func (s *Store) Save(hs *pb.HardState, entries []*pb.Entry, sync bool) error {
	if raft.IsEmptyHardState(hs) && len(entries) == 0 {
		return nil
	}
	b := s.db.NewBatch()
	defer b.Close()
	s.mu.Lock()
	last := s.last
	s.mu.Unlock()
	var sizes []uint64
	if len(entries) > 0 {
		first := entries[0].GetIndex()
		if first <= last {
			// A new leader overwrote our uncommitted tail: drop it.
			if err := b.DeleteRange(entryKey(first), entryKey(last+1), nil); err != nil {
				return err
			}
		}
		buf := make([]byte, 0, 256)
		sizes = make([]uint64, len(entries))
		for i, e := range entries {
			var err error
			buf, err = proto.MarshalOptions{}.MarshalAppend(buf[:0], e)
			if err != nil {
				return err
			}
			sizes[i] = uint64(len(buf))
			if err := b.Set(entryKey(e.GetIndex()), buf, nil); err != nil {
				return err
			}
		}
	}
	if !raft.IsEmptyHardState(hs) {
		v, err := proto.Marshal(hs)
		if err != nil {
			return err
		}
		if err := b.Set(hardStateKey, v, nil); err != nil {
			return err
		}
	}
	opts := pebble.NoSync
	if sync {
		opts = pebble.Sync
	}
	if err := b.Commit(opts); err != nil {
		return fmt.Errorf("raftlog: commit: %w", err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if !raft.IsEmptyHardState(hs) {
		s.hardState = proto.Clone(hs).(*pb.HardState)
	}
	if len(entries) > 0 {
		first := entries[0].GetIndex()
		if len(s.cache) > 0 && first > s.cache[0].e.GetIndex() && first <= s.last+1 {
			s.cache = s.cache[:first-s.cache[0].e.GetIndex()]
		} else {
			s.cache = s.cache[:0]
		}
		for i, e := range entries {
			s.cache = append(s.cache, cachedEntry{e: e, size: sizes[i]})
		}
		if n := len(s.cache); n > cacheLimit {
			s.cache = append([]cachedEntry(nil), s.cache[n-cacheLimit/2:]...)
		}
		s.last = entries[len(entries)-1].GetIndex()
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
	s.mu.Lock()
	first := s.snap.GetIndex() + 1
	s.mu.Unlock()
	if index < first {
		return nil
	}
	meta := &pb.SnapshotMetadata{Index: proto.Uint64(index), Term: proto.Uint64(term), ConfState: cs}
	v, err := proto.Marshal(meta)
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	if err := b.Set(snapshotKey, v, nil); err != nil {
		return err
	}
	if err := b.DeleteRange(entryKey(first), entryKey(index+1), nil); err != nil {
		return err
	}
	// Publish the new first index before the entries disappear: a reader must never
	// find them gone from Pebble while the first index still promises them (raft
	// tolerates only ErrCompacted there), and answering ErrCompacted early is harmless
	// since they are applied. No lock is held across the fsync.
	s.mu.Lock()
	s.snap = meta
	if s.last < index {
		s.last = index
	}
	for len(s.cache) > 0 && s.cache[0].e.GetIndex() <= index {
		s.cache = s.cache[1:]
	}
	s.mu.Unlock()
	if err := b.Commit(pebble.Sync); err != nil {
		// The entries stay on disk; a restart reloads the truncation point that was
		// actually written.
		return fmt.Errorf("raftlog: commit truncation: %w", err)
	}
	return nil
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
	v, err := proto.Marshal(meta)
	if err != nil {
		return err
	}
	s.mu.Lock()
	hs := proto.Clone(s.hardState).(*pb.HardState)
	s.mu.Unlock()
	if hs.GetCommit() < meta.GetIndex() {
		hs.Commit = proto.Uint64(meta.GetIndex())
	}
	if hs.GetTerm() < meta.GetTerm() {
		hs.Term = proto.Uint64(meta.GetTerm())
	}
	hv, err := proto.Marshal(hs)
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	if err := b.DeleteRange(entryKey(0), entryKey(1<<64-1), nil); err != nil {
		return err
	}
	if err := b.Set(snapshotKey, v, nil); err != nil {
		return err
	}
	if err := b.Set(hardStateKey, hv, nil); err != nil {
		return err
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("raftlog: commit snapshot: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snap = meta
	s.conf = nil
	s.hardState = hs
	s.last = meta.GetIndex()
	s.cache = s.cache[:0]
	return nil
}

// EnsureCommitted raises the stored commit index to index, an entry known to be
// committed (the state machine applied it) whose commit index was lost: the commit
// index is written without sync, the applied state in another database.
func (s *Store) EnsureCommitted(index uint64) error {
	s.mu.Lock()
	hs := proto.Clone(s.hardState).(*pb.HardState)
	last := s.last
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
