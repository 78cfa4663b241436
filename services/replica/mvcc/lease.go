package mvcc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// The lease table: which leases exist, with their granted TTL and the remaining TTL
// last checkpointed through Raft, and which live keys each one holds. Like the keys,
// it changes only on the apply goroutine, in the same batches; it is kept in Pebble
// under 'l' id → ttl, remaining (big-endian int64s), and in memory for lookups.
//
// When a lease is revoked (by a client or by expiry) all of its keys are deleted in
// one revision, in key order, so that every member writes the same history.

const prefixLease byte = 'l'

func leaseKey(id int64) []byte {
	return binary.BigEndian.AppendUint64([]byte{prefixLease}, uint64(id))
}

// Lease is one lease of the table.
type Lease struct {
	ID  int64
	TTL int64 // granted TTL, seconds
	// Remaining is the remaining TTL (seconds) last checkpointed; 0 when never.
	Remaining int64
}

func encodeLease(l Lease) []byte {
	b := binary.BigEndian.AppendUint64(nil, uint64(l.TTL))
	return binary.BigEndian.AppendUint64(b, uint64(l.Remaining))
}

type leaseEntry struct {
	Lease
	keys map[string]struct{}
}

// leaseTable is the committed lease state.
type leaseTable struct {
	mu     sync.RWMutex
	leases map[int64]*leaseEntry
}

// load reads every lease from db and attaches the live keys that name one.
func (lt *leaseTable) load(db *pebble.DB, live map[string]keyMeta) error {
	lt.leases = make(map[int64]*leaseEntry)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixLease}, UpperBound: []byte{prefixLease + 1}})
	if err != nil {
		return err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		k, v := it.Key(), it.Value()
		if len(k) != 9 || len(v) != 16 {
			return fmt.Errorf("mvcc: malformed lease record %x = %x", k, v)
		}
		id := int64(binary.BigEndian.Uint64(k[1:]))
		lt.leases[id] = &leaseEntry{
			Lease: Lease{ID: id, TTL: int64(binary.BigEndian.Uint64(v)), Remaining: int64(binary.BigEndian.Uint64(v[8:]))},
			keys:  make(map[string]struct{}),
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	for k, m := range live {
		if e := lt.leases[m.lease]; m.lease != 0 && e != nil {
			e.keys[k] = struct{}{}
		}
	}
	return nil
}

// Lease returns the committed lease id, with the number of keys it holds.
func (s *Store) Lease(id int64) (Lease, bool) {
	s.lt.mu.RLock()
	defer s.lt.mu.RUnlock()
	e := s.lt.leases[id]
	if e == nil {
		return Lease{}, false
	}
	return e.Lease, true
}

// LeaseKeys returns the keys lease id holds, in order.
func (s *Store) LeaseKeys(id int64) [][]byte {
	s.lt.mu.RLock()
	defer s.lt.mu.RUnlock()
	e := s.lt.leases[id]
	if e == nil {
		return nil
	}
	keys := make([][]byte, 0, len(e.keys))
	for k := range e.keys {
		keys = append(keys, []byte(k))
	}
	slices.SortFunc(keys, bytes.Compare)
	return keys
}

// Leases returns every committed lease, by ID.
func (s *Store) Leases() []Lease {
	s.lt.mu.RLock()
	defer s.lt.mu.RUnlock()
	out := make([]Lease, 0, len(s.lt.leases))
	for _, e := range s.lt.leases {
		out = append(out, e.Lease)
	}
	slices.SortFunc(out, func(a, b Lease) int { return cmpInt(a.ID, b.ID) })
	return out
}

// leaseExists tells whether lease id exists as of the requests applied so far.
func (w *Writer) leaseExists(id int64) bool {
	if l, ok := w.leaseOps[id]; ok {
		return l != nil
	}
	_, ok := w.s.Lease(id)
	return ok
}

// LeaseGrant adds lease id with ttl seconds. It writes no revision.
func (w *Writer) LeaseGrant(id, ttl int64) error {
	if id == 0 {
		return errors.New("mvcc: lease ID 0 means no lease")
	}
	if w.leaseExists(id) {
		return etcderr.ErrLeaseExist
	}
	return w.setLease(&Lease{ID: id, TTL: ttl})
}

// LeaseCheckpoint records a lease's remaining TTL, so that a new leader does not
// start it over from the granted TTL. Unknown leases are ignored (revoked since).
func (w *Writer) LeaseCheckpoint(id, remaining int64) error {
	if !w.leaseExists(id) {
		return nil
	}
	l, ok := w.leaseOps[id]
	if !ok {
		c, _ := w.s.Lease(id)
		l = &c
	}
	return w.setLease(&Lease{ID: id, TTL: l.TTL, Remaining: remaining})
}

func (w *Writer) setLease(l *Lease) error {
	if w.leaseOps == nil {
		w.leaseOps = make(map[int64]*Lease)
	}
	w.leaseOps[l.ID] = l
	return w.b.Set(leaseKey(l.ID), encodeLease(*l), nil)
}

// LeaseRevoke removes lease id and deletes every key it holds, in one revision.
func (w *Writer) LeaseRevoke(ctx context.Context, id int64) (*pb.LeaseRevokeResponse, error) {
	if !w.leaseExists(id) {
		return nil, etcderr.ErrLeaseNotFound
	}
	t := w.begin()
	for _, key := range w.leaseKeys(id) {
		if err := t.deleteKey(key); err != nil {
			return nil, err
		}
	}
	w.end(t)
	if w.leaseOps == nil {
		w.leaseOps = make(map[int64]*Lease)
	}
	w.leaseOps[id] = nil
	if err := w.b.Delete(leaseKey(id), nil); err != nil {
		return nil, err
	}
	return &pb.LeaseRevokeResponse{Header: &pb.ResponseHeader{Revision: w.rev}}, nil
}

// leaseKeys is the keys lease id holds as of the requests applied so far, in order.
func (w *Writer) leaseKeys(id int64) [][]byte {
	var keys [][]byte
	for _, k := range w.s.LeaseKeys(id) {
		if m, ok := w.pending[string(k)]; !ok || (m != nil && m.lease == id) {
			keys = append(keys, k)
		}
	}
	for k, m := range w.pending {
		if m != nil && m.lease == id {
			if _, committed := w.s.live[k]; !committed || w.s.live[k].lease != id {
				keys = append(keys, []byte(k))
			}
		}
	}
	slices.SortFunc(keys, bytes.Compare)
	return slices.CompactFunc(keys, func(a, b []byte) bool { return string(a) == string(b) })
}

// deleteKey writes key's deletion (it must be live).
func (t *txn) deleteKey(key []byte) error {
	tomb, err := proto.Marshal(&mvccpb.KeyValue{Key: key, ModRevision: t.beginRev + 1})
	if err != nil {
		return err
	}
	if err := t.record(key, kindDelete, tomb); err != nil {
		return err
	}
	if err := t.b.Delete(currentKey(key), nil); err != nil {
		return err
	}
	t.w.setMeta(key, nil)
	return nil
}

// commitLeases publishes w's lease changes and the keys' attachments; it runs before
// w's key changes reach s.live (it compares with the keys' committed leases).
func (s *Store) commitLeases(w *Writer) {
	if len(w.leaseOps) == 0 && len(w.pending) == 0 {
		return
	}
	s.lt.mu.Lock()
	defer s.lt.mu.Unlock()
	for id, l := range w.leaseOps {
		switch e := s.lt.leases[id]; {
		case l == nil:
			delete(s.lt.leases, id)
		case e == nil:
			s.lt.leases[id] = &leaseEntry{Lease: *l, keys: make(map[string]struct{})}
		default:
			e.Lease = *l
		}
	}
	for k, m := range w.pending {
		var was, now int64
		if old, ok := s.live[k]; ok {
			was = old.lease
		}
		if m != nil {
			now = m.lease
		}
		if was == now {
			continue
		}
		if e := s.lt.leases[was]; was != 0 && e != nil {
			delete(e.keys, k)
		}
		if e := s.lt.leases[now]; now != 0 && e != nil {
			e.keys[k] = struct{}{}
		}
	}
}

// LeaseKeys is the keys lease id holds as of the requests applied so far in this
// writer's batch.
func (w *Writer) LeaseKeys(id int64) [][]byte { return w.leaseKeys(id) }
