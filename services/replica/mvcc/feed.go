package mvcc

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// Change is one committed revision with all its events, in the order its request made
// them.
type Change struct {
	Rev    int64
	Events []*mvccpb.Event
}

// Position is a consistent reading position: the current and compacted revisions.
type Position struct {
	Rev, CompactRev int64
}

// Changes reads the committed history from revision from on, whole revisions only
// and every revision (one without events, such as the initial revision 1, comes
// without events),
// until about maxBytes of events are read (at least one revision when there is one).
// With withPrev each event carries prev_kv as etcd's watch fills it: the key's
// version at the revision before, unless the key did not exist then or that revision
// is compacted. A from below the compacted revision fails with ErrCompacted, as a
// watch starting there does in etcd; a from beyond the current revision reads nothing.
func (s *Store) Changes(ctx context.Context, from int64, maxBytes int, withPrev bool) ([]Change, Position, error) {
	v, err := s.snapshot()
	if err != nil {
		return nil, Position{}, err
	}
	defer v.it.Close()
	pos := Position{Rev: v.rev, CompactRev: v.compactRev}
	if from < v.compactRev {
		return nil, pos, etcderr.ErrCompacted
	}
	if from > v.rev {
		return nil, pos, nil
	}
	// A second iterator over the same point-in-time view, for the prev_kv lookups.
	prevIt, err := v.it.Clone(pebble.CloneOptions{})
	if err != nil {
		return nil, pos, err
	}
	defer prevIt.Close()

	var (
		out   []Change
		size  int
		upper = revKey(v.rev+1, 0)
	)
	// Every revision gets a Change, events or not: the initial revision 1 has none,
	// and compaction at a revision removes its delete events.
	next, full := from, false
	for ok := v.it.SeekGE(revKey(from, 0)); ok && bytes.Compare(v.it.Key(), upper) < 0; ok = v.it.Next() {
		main, _ := parseRevKey(v.it.Key())
		if len(out) == 0 || out[len(out)-1].Rev != main {
			if size >= maxBytes && len(out) > 0 {
				full = true
				break
			}
			if err := ctx.Err(); err != nil {
				return nil, pos, err
			}
			for ; next < main; next++ {
				out = append(out, Change{Rev: next})
			}
			out = append(out, Change{Rev: main})
			next = main + 1
		}
		val := v.it.Value()
		kv := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(val[1:], kv); err != nil {
			return nil, pos, fmt.Errorf("mvcc: decode revision record %d: %w", main, err)
		}
		ev := &mvccpb.Event{Kv: kv}
		if val[0] == kindDelete {
			ev.Type = mvccpb.Event_DELETE
		}
		if withPrev && main-1 >= v.compactRev {
			if ev.PrevKv, err = versionAt(prevIt, kv.GetKey(), main-1); err != nil {
				return nil, pos, err
			}
		}
		size += len(val) + proto.Size(ev.PrevKv)
		c := &out[len(out)-1]
		c.Events = append(c.Events, ev)
	}
	if err := v.it.Error(); err != nil {
		return nil, pos, err
	}
	for ; !full && next <= v.rev; next++ {
		out = append(out, Change{Rev: next})
	}
	return out, pos, nil
}

// versionAt reads key's version visible at revision rev, nil when the key did not
// exist then.
func versionAt(it *pebble.Iterator, key []byte, rev int64) (*mvccpb.KeyValue, error) {
	prefix := indexKeyPrefix(key)
	if !it.SeekGE(binary.BigEndian.AppendUint64(bytes.Clone(prefix), ^uint64(rev))) || !bytes.HasPrefix(it.Key(), prefix) || len(it.Key()) != len(prefix)+8 {
		return nil, it.Error()
	}
	idx := it.Value()
	if len(idx) != 9 || idx[0] != kindPut {
		return nil, nil
	}
	_, main := splitIndexKey(it.Key())
	rk := revKey(main, int64(binary.BigEndian.Uint64(idx[1:])))
	if !it.SeekGE(rk) || !bytes.Equal(it.Key(), rk) {
		// Compacted away under the iterator's view: etcd answers nothing either.
		return nil, it.Error()
	}
	kv := &mvccpb.KeyValue{}
	if err := proto.Unmarshal(it.Value()[1:], kv); err != nil {
		return nil, fmt.Errorf("mvcc: decode revision record %d: %w", main, err)
	}
	return kv, nil
}

// Position reads the current and compacted revisions.
func (s *Store) Position() Position {
	for {
		before := s.commits.Load()
		p := Position{Rev: s.rev.Load(), CompactRev: s.compactRev.Load()}
		if before%2 == 0 && s.commits.Load() == before {
			return p
		}
	}
}

// Changed returns a channel that is closed at the next commit (or when the store
// closes): a reader that found nothing new waits on it.
func (s *Store) Changed() <-chan struct{} { return s.changed.C() }
