package mvcc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
)

// compactBatch bounds the deletions committed at once, so compaction never holds a
// large batch and interleaves fairly with the apply loop's writes.
const compactBatch = 1000

func (s *Store) compactLoop() {
	defer close(s.stopped)
	for {
		var target int64
		select {
		case <-s.stop:
			return
		case target = <-s.compactc:
		}
		// Compact to the newest scheduled revision; older signals are subsumed.
		for drained := false; !drained; {
			select {
			case t := <-s.compactc:
				target = max(target, t)
			default:
				drained = true
			}
		}
		s.compactMu.Lock()
		from := s.compacted
		s.compactMu.Unlock()
		if target <= from {
			continue
		}
		if err := s.compactRange(from, target); err != nil {
			// Reads below the compaction revision already fail; the data is only
			// kept longer. The next compaction or restart retries.
			s.log.Error("compaction failed", "from", from, "to", target, "err", err)
			continue
		}
		s.compactMu.Lock()
		s.compacted = target
		s.compactMu.Unlock()
		s.compactDone.Notify()
	}
}

// compactRange deletes every change a read at target or later can no longer see: for
// each key changed in (from, target], every version older than its newest change at or
// before target, and that change too when it is a delete. Keys not changed in that
// interval were already compacted down to their newest version by earlier rounds.
func (s *Store) compactRange(from, target int64) error {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: revKey(from+1, 0), UpperBound: revKey(target+1, 0)})
	if err != nil {
		return err
	}
	defer it.Close()
	b := s.db.NewBatch()
	defer func() { b.Close() }()
	done := make(map[string]bool)
	n := 0
	for it.First(); it.Valid(); it.Next() {
		kv := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(it.Value()[1:], kv); err != nil {
			return fmt.Errorf("decode revision record: %w", err)
		}
		// A key changed twice in one revision (a txn may delete a range and then
		// put into it) has one index entry, for its last change: the earlier records
		// of that revision are unreachable once compacted past.
		main, sub := parseRevKey(it.Key())
		if superseded, err := s.supersededInRevision(kv.GetKey(), main, sub); err != nil {
			return err
		} else if superseded {
			if err := b.Delete(bytes.Clone(it.Key()), nil); err != nil {
				return err
			}
			n++
		}
		if !done[string(kv.GetKey())] {
			done[string(kv.GetKey())] = true
			deleted, err := s.compactKey(b, kv.GetKey(), target)
			if err != nil {
				return err
			}
			n += deleted
		}
		if n >= compactBatch {
			if err := b.Commit(pebble.NoSync); err != nil {
				return err
			}
			b.Close()
			b = s.db.NewBatch()
			clear(done)
			n = 0
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	if err := b.Set(metaCompactedKey, encodeInt(target), nil); err != nil {
		return err
	}
	return b.Commit(pebble.NoSync)
}

// supersededInRevision tells whether the change (main, sub) of key is not the one its
// revision's index entry points at.
func (s *Store) supersededInRevision(key []byte, main, sub int64) (bool, error) {
	v, closer, err := s.db.Get(indexKey(key, main))
	if errors.Is(err, pebble.ErrNotFound) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	defer closer.Close()
	return len(v) != 9 || int64(binary.BigEndian.Uint64(v[1:])) != sub, nil
}

// compactKey deletes the versions of key that compaction at target makes unreachable.
func (s *Store) compactKey(b *pebble.Batch, key []byte, target int64) (int, error) {
	prefix := indexKeyPrefix(key)
	start := binary.BigEndian.AppendUint64(bytes.Clone(prefix), ^uint64(target))
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: start, UpperBound: nextIndexKey(prefix)})
	if err != nil {
		return 0, err
	}
	defer it.Close()
	n := 0
	first := true
	for it.First(); it.Valid(); it.Next() {
		v := it.Value()
		if first {
			first = false
			if len(v) == 9 && v[0] == kindPut {
				continue // the version reads at target see: kept
			}
		}
		_, main := splitIndexKey(it.Key())
		if err := b.Delete(bytes.Clone(it.Key()), nil); err != nil {
			return 0, err
		}
		if err := b.Delete(revKey(main, int64(binary.BigEndian.Uint64(v[1:]))), nil); err != nil {
			return 0, err
		}
		n++
	}
	return n, it.Error()
}
