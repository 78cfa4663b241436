// Package mvcc is the replica's state machine: etcd's multi-version key-value store
// kept in Pebble. Every write request gets the next revision; every version of every key
// stays readable until it is compacted.
//
// Writes happen only on the apply goroutine, through a Writer over a Pebble batch that
// the caller commits together with the Raft applied index. Reads run concurrently on
// Pebble iterators, which are point-in-time views: the current and compacted revisions
// are stored in the same batches as the data, so an iterator always sees a revision
// together with exactly the data of that revision, without any lock.
package mvcc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/notify"
)

// keyMeta is what a put needs to know of a key's live version. The store keeps it in
// memory for every live key (as etcd keeps its key index in memory), so that a put
// reads nothing from Pebble unless it needs the previous value itself.
type keyMeta struct{ create, version, lease int64 }

// Store is the MVCC key-value store.
type Store struct {
	db  *pebble.DB
	log *slog.Logger
	lt  leaseTable

	// live holds every live key's keyMeta. Only the apply goroutine (Writers and
	// Committed) uses it.
	live map[string]keyMeta

	rev        atomic.Int64 // committed current revision
	compactRev atomic.Int64 // scheduled compaction revision, -1 when never compacted
	// commits is odd while a batch commit is publishing, even otherwise: a reader
	// that sees the same even value before and after opening its iterator knows the
	// iterator holds exactly the data of rev (a seqlock).
	commits atomic.Uint64

	// recent holds getNow's latest answers, direct-mapped by key: each is the key's
	// value (or its absence) as of the commits count it was read at, and answers again
	// until the next commit, without a Pebble lookup. Readers only; commits never
	// touch it, a later commit makes every entry stale at once.
	recent     [recentSlots]atomic.Pointer[recentRead]
	recentSeed maphash.Seed

	compactc    chan int64
	compactMu   sync.Mutex
	compacted   int64           // finished compaction revision
	compactDone notify.Notifier // whenever compacted advances
	stop        chan struct{}
	stopped     chan struct{}

	changed notify.Notifier // at every commit (see Changed)
}

// Open loads the store kept in db and resumes an interrupted compaction.
func Open(db *pebble.DB, log *slog.Logger) (*Store, error) {
	s := &Store{
		db: db, log: log,
		recentSeed: maphash.MakeSeed(),
		compactc:   make(chan int64, 64),
		stop:       make(chan struct{}),
		stopped:    make(chan struct{}),
	}
	rev, err := getInt(db, metaRevKey, 1)
	if err != nil {
		return nil, err
	}
	compact, err := getInt(db, metaCompactKey, -1)
	if err != nil {
		return nil, err
	}
	if s.compacted, err = getInt(db, metaCompactedKey, 0); err != nil {
		return nil, err
	}
	s.rev.Store(rev)
	s.compactRev.Store(compact)
	if err := s.loadLive(); err != nil {
		return nil, err
	}
	if err := s.lt.load(db, s.live); err != nil {
		return nil, err
	}
	go s.compactLoop()
	if compact > s.compacted {
		s.log.Info("resuming interrupted compaction", "from", s.compacted, "to", compact)
		s.compactc <- compact
	}
	return s, nil
}

func getInt(db *pebble.DB, key []byte, def int64) (int64, error) {
	v, closer, err := db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return def, nil
	}
	if err != nil {
		return 0, fmt.Errorf("mvcc: read %q: %w", key, err)
	}
	defer closer.Close()
	return decodeInt(v), nil
}

// loadLive fills the in-memory metadata of live keys from the current-version table.
func (s *Store) loadLive() error {
	s.live = make(map[string]keyMeta)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixCurrent}, UpperBound: []byte{prefixCurrent + 1}})
	if err != nil {
		return err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		kv := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(it.Value(), kv); err != nil {
			return fmt.Errorf("mvcc: decode current version of %q: %w", it.Key()[1:], err)
		}
		s.live[string(kv.GetKey())] = keyMeta{create: kv.GetCreateRevision(), version: kv.GetVersion(), lease: kv.GetLease()}
	}
	return it.Error()
}

// Close stops the background compactor.
func (s *Store) Close() {
	close(s.stop)
	<-s.stopped
	s.changed.Close()
}

// Rev is the current (last committed) revision.
func (s *Store) Rev() int64 { return s.rev.Load() }

// CompactRev is the revision of the last compaction, or -1.
func (s *Store) CompactRev() int64 { return s.compactRev.Load() }

// view is a point-in-time reading position: revisions and an iterator that agree.
type view struct {
	it         *pebble.Iterator
	rev        int64
	compactRev int64
}

// snapshot opens a consistent read view of the committed state. Usually the
// revisions come from memory; when a commit overlaps the iterator's creation, they are
// read from the iterator itself, where they are stored with the data.
func (s *Store) snapshot() (*view, error) {
	before := s.commits.Load()
	rev, compact := s.rev.Load(), s.compactRev.Load()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: spaceLower, UpperBound: spaceUpper})
	if err != nil {
		return nil, err
	}
	if before%2 == 0 && s.commits.Load() == before {
		return &view{it: it, rev: rev, compactRev: compact}, nil
	}
	v := &view{it: it, rev: 1, compactRev: -1}
	// One seek, then steps: the metadata keys sort together ("mc" < "mf" < "mr").
	// Stop at "mr" rather than step past it: every apply batch rewrites it, and a
	// step past it would walk all its versions still in the memtable.
	for ok := it.SeekGE(metaCompactKey); ok && it.Key()[0] == prefixMeta; ok = it.Next() {
		if bytes.Equal(it.Key(), metaCompactKey) {
			v.compactRev = decodeInt(it.Value())
		}
		if bytes.Compare(it.Key(), metaRevKey) >= 0 {
			if bytes.Equal(it.Key(), metaRevKey) {
				v.rev = decodeInt(it.Value())
			}
			break
		}
	}
	return v, it.Error()
}

// Range answers a RangeRequest from the committed state.
func (s *Store) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	if len(r.GetRangeEnd()) == 0 && r.GetRevision() == 0 {
		if resp, ok, err := s.getNow(r); ok {
			return resp, err
		}
	}
	v, err := s.snapshot()
	if err != nil {
		return nil, err
	}
	defer v.it.Close()
	return executeRange(ctx, v.it, v.rev, v.compactRev, r)
}

// recentSlots is the size of Store.recent (a power of two).
const recentSlots = 1024

// recentRead is one of Store.recent's entries: key's value (nil: no such key) read
// while the commits count was gen.
type recentRead struct {
	key []byte
	kv  *mvccpb.KeyValue
	gen uint64
}

// fresh is a copy of kv for one answer (callers may change the message, never its
// bytes); nil stays nil.
func fresh(kv *mvccpb.KeyValue) *mvccpb.KeyValue {
	if kv == nil {
		return nil
	}
	return &mvccpb.KeyValue{Key: kv.Key, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version, Value: kv.Value, Lease: kv.Lease}
}

// getNow answers the commonest read, one key at the current revision, with a point
// lookup instead of an iterator over every level. It is valid only when no commit
// overlapped it (see commits); ok is false otherwise, and the caller reads through an
// iterator instead.
func (s *Store) getNow(r *pb.RangeRequest) (resp *pb.RangeResponse, ok bool, err error) {
	before := s.commits.Load()
	if before%2 != 0 {
		return nil, false, nil
	}
	rev := s.rev.Load()
	slot := &s.recent[maphash.Bytes(s.recentSeed, r.GetKey())&(recentSlots-1)]
	if e := slot.Load(); e != nil && e.gen == before && bytes.Equal(e.key, r.GetKey()) {
		kv := fresh(e.kv)
		if s.commits.Load() == before {
			return finishGet(kv, rev, r), true, nil
		}
	}
	var kv *mvccpb.KeyValue
	val, closer, err := s.db.Get(currentKey(r.GetKey()))
	switch {
	case errors.Is(err, pebble.ErrNotFound):
	case err != nil:
		return nil, true, err
	default:
		kv = &mvccpb.KeyValue{}
		err = proto.Unmarshal(val, kv)
		closer.Close()
		if err != nil {
			return nil, true, fmt.Errorf("mvcc: decode %q: %w", r.GetKey(), err)
		}
	}
	if s.commits.Load() != before {
		return nil, false, nil
	}
	slot.Store(&recentRead{key: bytes.Clone(r.GetKey()), kv: fresh(kv), gen: before})
	return finishGet(kv, rev, r), true, nil
}

// finishGet is the answer to a read of one key at rev that found kv (nil: nothing).
func finishGet(kv *mvccpb.KeyValue, rev int64, r *pb.RangeRequest) *pb.RangeResponse {
	var kvs []*mvccpb.KeyValue
	var count int64
	if kv != nil {
		count = 1
		if !r.GetCountOnly() {
			kvs = []*mvccpb.KeyValue{kv}
		}
	}
	return finishRange(kvs, count, rev, r)
}

// ReadTxn answers a transaction that only reads (see IsTxnReadOnly) from the
// committed state, without a proposal.
func (s *Store) ReadTxn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	v, err := s.snapshot()
	if err != nil {
		return nil, err
	}
	defer v.it.Close()
	t := &txn{s: s, shared: v.it, beginRev: v.rev, compactRev: v.compactRev}
	return t.txn(ctx, r)
}

// WaitCompacted blocks until the physical compaction up to rev has finished.
func (s *Store) WaitCompacted(ctx context.Context, rev int64) error {
	for {
		ch := s.compactDone.C()
		s.compactMu.Lock()
		done := s.compacted >= rev
		s.compactMu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.stop:
			return etcderr.ErrStopped
		}
	}
}

// Writer applies write requests into one Pebble batch. It belongs to the apply
// goroutine; Store.Commit commits it.
type Writer struct {
	s          *Store
	b          *pebble.Batch
	rev        int64
	compactRev int64
	compacted  bool
	pending    map[string]*keyMeta // live-key changes of this batch; nil means deleted
	leaseOps   map[int64]*Lease    // lease changes of this batch; nil means revoked
}

// meta returns key's live metadata as of the requests applied so far.
func (w *Writer) meta(key []byte) (keyMeta, bool) {
	if m, ok := w.pending[string(key)]; ok {
		if m == nil {
			return keyMeta{}, false
		}
		return *m, true
	}
	m, ok := w.s.live[string(key)]
	return m, ok
}

func (w *Writer) setMeta(key []byte, m *keyMeta) {
	if w.pending == nil {
		w.pending = make(map[string]*keyMeta)
	}
	w.pending[string(key)] = m
}

// NewWriter starts applying into b, which must be an indexed batch (writes read their
// own earlier writes).
func (s *Store) NewWriter(b *pebble.Batch) *Writer {
	return &Writer{s: s, b: b, rev: s.rev.Load(), compactRev: s.compactRev.Load()}
}

// Rev is the revision after the requests applied so far.
func (w *Writer) Rev() int64 { return w.rev }

func (w *Writer) begin() *txn {
	return &txn{s: w.s, w: w, b: w.b, beginRev: w.rev, compactRev: w.compactRev}
}

func (w *Writer) end(t *txn) {
	if t.changes > 0 {
		w.rev++
	}
}

// Put applies a put request.
func (w *Writer) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	t := w.begin()
	if err := t.checkPut(r); err != nil {
		return nil, err
	}
	resp, err := t.put(r)
	w.end(t)
	return resp, err
}

// DeleteRange applies a delete request.
func (w *Writer) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	t := w.begin()
	resp, err := t.deleteRange(ctx, r)
	w.end(t)
	return resp, err
}

// Txn applies a transaction.
func (w *Writer) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	t := w.begin()
	resp, err := t.txn(ctx, r)
	w.end(t)
	return resp, err
}

// Compact schedules the compaction of every version older than rev that a read at rev
// or later cannot see. Reads below rev fail from the moment the batch is committed;
// the data is deleted in the background (WaitCompacted waits for it).
func (w *Writer) Compact(r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	switch {
	case r.GetRevision() <= w.compactRev:
		return nil, etcderr.ErrCompacted
	case r.GetRevision() > w.rev:
		return nil, etcderr.ErrFutureRev
	}
	w.compactRev = r.GetRevision()
	w.compacted = true
	if err := w.b.Set(metaCompactKey, encodeInt(w.compactRev), nil); err != nil {
		return nil, err
	}
	return &pb.CompactionResponse{Header: &pb.ResponseHeader{Revision: w.rev}}, nil
}

// Commit records the revision reached in w's batch, commits the batch (with whatever
// else the caller wrote into it) and publishes what it applied to readers.
func (s *Store) Commit(w *Writer, opts *pebble.WriteOptions) error {
	if err := w.b.Set(metaRevKey, encodeInt(w.rev), nil); err != nil {
		return err
	}
	s.commits.Add(1)
	if err := w.b.Commit(opts); err != nil {
		s.commits.Add(1)
		return err
	}
	changed := s.committed(w)
	s.commits.Add(1)
	if changed {
		s.changed.Notify()
	}
	return nil
}

// committed publishes w's changes to the in-memory state; it reports whether the
// revisions moved, which wakes history readers.
func (s *Store) committed(w *Writer) bool {
	s.commitLeases(w)
	for k, m := range w.pending {
		if m == nil {
			delete(s.live, k)
		} else {
			s.live[k] = *m
		}
	}
	changed := w.rev != s.rev.Load() || w.compacted
	s.rev.Store(w.rev)
	if w.compacted {
		s.compactRev.Store(w.compactRev)
		select {
		case s.compactc <- w.compactRev:
		default:
			// The compactor is behind; it always compacts to the latest scheduled
			// revision, so it catches this one up with the next signal or the
			// store's restart.
			go func() {
				select {
				case s.compactc <- w.compactRev:
				case <-s.stop:
				}
			}()
		}
	}
	return changed
}

// HashKV hashes (CRC-32C) every change in (compacted revision, rev]: each record's
// revision, kind and key-value. Compaction never touches that interval, so members with
// the same history answer the same hash at the same revision, whatever point their
// background compaction has reached. rev 0 means the current revision.
func (s *Store) HashKV(ctx context.Context, rev int64) (hash uint32, hashRev, compactRev int64, err error) {
	v, err := s.snapshot()
	if err != nil {
		return 0, 0, 0, err
	}
	defer v.it.Close()
	switch {
	case rev == 0:
		rev = v.rev
	case rev > v.rev:
		return 0, 0, 0, etcderr.ErrFutureRev
	case rev < v.compactRev:
		return 0, 0, 0, etcderr.ErrCompacted
	}
	from := max(v.compactRev, 0) + 1
	h := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	lower, upper := revKey(from, 0), revKey(rev+1, 0)
	for ok := v.it.SeekGE(lower); ok && bytes.Compare(v.it.Key(), upper) < 0; ok = v.it.Next() {
		if err := ctx.Err(); err != nil {
			return 0, 0, 0, err
		}
		h.Write(v.it.Key())
		h.Write(v.it.Value())
	}
	if err := v.it.Error(); err != nil {
		return 0, 0, 0, err
	}
	return h.Sum32(), rev, v.compactRev, nil
}
