package mvcc

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"sort"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// rangeEnd maps etcd's range_end to the store's: nil for a single key, empty (not nil)
// for "every key from key on" (range_end "\x00"), otherwise the exclusive end.
func rangeEnd(end []byte) []byte {
	if len(end) == 1 && end[0] == 0 {
		return []byte{}
	}
	if len(end) == 0 {
		return nil
	}
	return end
}

// executeRange answers r from it, a view at curRev whose compaction is at compactRev,
// following etcd: fetch (with limit+1 unless filtering or sorting needs everything),
// filter, sort, cut to limit. Count is the number of keys in the range at the read
// revision, before filters and limit.
func executeRange(ctx context.Context, it *pebble.Iterator, curRev, compactRev int64, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	rev := r.GetRevision()
	switch {
	case rev > curRev:
		return nil, etcderr.ErrFutureRev
	case rev <= 0:
		rev = curRev
	}
	if rev < compactRev {
		return nil, etcderr.ErrCompacted
	}
	limit := r.GetLimit()
	if !isDefaultOrdering(r.GetSortTarget(), r.GetSortOrder()) || hasRevisionFilters(r) {
		limit = 0
	}
	if limit > 0 && limit < math.MaxInt64 {
		limit++
	}
	var (
		kvs   []*mvccpb.KeyValue
		count int64
		err   error
	)
	if rev == curRev {
		kvs, count, err = rangeCurrent(ctx, it, r.GetKey(), rangeEnd(r.GetRangeEnd()), limit, r.GetCountOnly())
	} else {
		kvs, count, err = rangeHistory(ctx, it, r.GetKey(), rangeEnd(r.GetRangeEnd()), rev, limit, r.GetCountOnly())
	}
	if err != nil {
		return nil, err
	}
	return finishRange(kvs, count, curRev, r), nil
}

// finishRange filters, sorts and cuts what a range fetched, as etcd does, and builds
// the response.
func finishRange(kvs []*mvccpb.KeyValue, count, curRev int64, r *pb.RangeRequest) *pb.RangeResponse {
	kvs = filterKVs(kvs, r)
	sortKVs(kvs, r)
	resp := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: curRev}, Count: count}
	if r.GetLimit() > 0 && int64(len(kvs)) > r.GetLimit() {
		kvs = kvs[:r.GetLimit()]
		resp.More = true
	}
	if r.GetKeysOnly() {
		for _, kv := range kvs {
			kv.Value = nil
		}
	}
	resp.Kvs = kvs
	return resp
}

// scanCurrent calls fn with the encoded KeyValue of every live key in [key, end)
// (end nil: key alone; end empty: no upper bound) until fn returns false.
func scanCurrent(it *pebble.Iterator, key, end []byte, fn func(enc []byte) (bool, error)) error {
	if end == nil {
		ck := currentKey(key)
		if it.SeekGE(ck) && bytes.Equal(it.Key(), ck) {
			_, err := fn(it.Value())
			return err
		}
		return it.Error()
	}
	upper := []byte{prefixCurrent + 1}
	if len(end) > 0 {
		if bytes.Compare(end, key) <= 0 {
			return nil
		}
		upper = currentKey(end)
	}
	for ok := it.SeekGE(currentKey(key)); ok && bytes.Compare(it.Key(), upper) < 0; ok = it.Next() {
		more, err := fn(it.Value())
		if err != nil || !more {
			return err
		}
	}
	return it.Error()
}

func rangeCurrent(ctx context.Context, it *pebble.Iterator, key, end []byte, limit int64, countOnly bool) ([]*mvccpb.KeyValue, int64, error) {
	var kvs []*mvccpb.KeyValue
	var count int64
	err := scanCurrent(it, key, end, func(enc []byte) (bool, error) {
		count++
		if countOnly || (limit > 0 && int64(len(kvs)) >= limit) {
			return true, nil
		}
		if len(kvs)%1024 == 1023 && ctx.Err() != nil {
			return false, ctx.Err()
		}
		kv := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(enc, kv); err != nil {
			return false, fmt.Errorf("mvcc: decode: %w", err)
		}
		kvs = append(kvs, kv)
		return true, nil
	})
	return kvs, count, err
}

type revision struct{ main, sub int64 }

// historyAt calls fn for every key in [key, end) with its newest change at or before
// rev, skipping keys whose newest change is a delete.
func historyAt(it *pebble.Iterator, key, end []byte, rev int64, fn func(prefix []byte, r revision) bool) error {
	var upper []byte
	switch {
	case end == nil:
		upper = nextIndexKey(indexKeyPrefix(key))
	case len(end) == 0:
		upper = []byte{prefixIndex + 1}
	default:
		if bytes.Compare(end, key) <= 0 {
			return nil
		}
		upper = indexBound(end)
	}
	target := binary.BigEndian.AppendUint64(nil, ^uint64(rev))
	ok := it.SeekGE(indexBound(key))
	for ok && bytes.Compare(it.Key(), upper) < 0 {
		prefix, main := splitIndexKey(it.Key())
		prefix = bytes.Clone(prefix)
		if main > rev {
			// Newer than the read: jump to the newest change at or before rev.
			if !it.SeekGE(append(bytes.Clone(prefix), target...)) || bytes.Compare(it.Key(), upper) >= 0 {
				break
			}
			if p, _ := splitIndexKey(it.Key()); !bytes.Equal(p, prefix) {
				continue // the key did not exist yet at rev; it now points at the next key
			}
			_, main = splitIndexKey(it.Key())
		}
		v := it.Value()
		if len(v) == 9 && v[0] == kindPut {
			if !fn(prefix, revision{main: main, sub: int64(binary.BigEndian.Uint64(v[1:]))}) {
				return it.Error()
			}
		}
		ok = it.SeekGE(nextIndexKey(prefix))
	}
	return it.Error()
}

func rangeHistory(ctx context.Context, it *pebble.Iterator, key, end []byte, rev, limit int64, countOnly bool) ([]*mvccpb.KeyValue, int64, error) {
	var revs []revision
	var count int64
	err := historyAt(it, key, end, rev, func(_ []byte, r revision) bool {
		count++
		if !countOnly && (limit <= 0 || int64(len(revs)) < limit) {
			revs = append(revs, r)
		}
		return true
	})
	if err != nil || countOnly {
		return nil, count, err
	}
	kvs := make([]*mvccpb.KeyValue, 0, len(revs))
	for i, r := range revs {
		if i%1024 == 1023 && ctx.Err() != nil {
			return nil, 0, ctx.Err()
		}
		rk := revKey(r.main, r.sub)
		if !it.SeekGE(rk) || !bytes.Equal(it.Key(), rk) {
			return nil, 0, fmt.Errorf("mvcc: revision %d.%d indexed but missing", r.main, r.sub)
		}
		kv := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(it.Value()[1:], kv); err != nil {
			return nil, 0, fmt.Errorf("mvcc: decode revision %d.%d: %w", r.main, r.sub, err)
		}
		kvs = append(kvs, kv)
	}
	return kvs, count, nil
}

func isDefaultOrdering(target pb.RangeRequest_SortTarget, order pb.RangeRequest_SortOrder) bool {
	return order == pb.RangeRequest_NONE || (target == pb.RangeRequest_KEY && order == pb.RangeRequest_ASCEND)
}

func hasRevisionFilters(r *pb.RangeRequest) bool {
	return r.GetMinModRevision() != 0 || r.GetMaxModRevision() != 0 ||
		r.GetMinCreateRevision() != 0 || r.GetMaxCreateRevision() != 0
}

func filterKVs(kvs []*mvccpb.KeyValue, r *pb.RangeRequest) []*mvccpb.KeyValue {
	if !hasRevisionFilters(r) {
		return kvs
	}
	out := kvs[:0]
	for _, kv := range kvs {
		switch {
		case r.GetMaxModRevision() != 0 && kv.GetModRevision() > r.GetMaxModRevision():
		case r.GetMinModRevision() != 0 && kv.GetModRevision() < r.GetMinModRevision():
		case r.GetMaxCreateRevision() != 0 && kv.GetCreateRevision() > r.GetMaxCreateRevision():
		case r.GetMinCreateRevision() != 0 && kv.GetCreateRevision() < r.GetMinCreateRevision():
		default:
			out = append(out, kv)
		}
	}
	return out
}

// sortKVs sorts as etcd does, with sort.Sort on the same input order, so that even the
// order among equal elements is etcd's.
func sortKVs(kvs []*mvccpb.KeyValue, r *pb.RangeRequest) {
	order := r.GetSortOrder()
	if r.GetSortTarget() != pb.RangeRequest_KEY && order == pb.RangeRequest_NONE {
		order = pb.RangeRequest_ASCEND
	}
	if isDefaultOrdering(r.GetSortTarget(), order) {
		return
	}
	var less func(a, b *mvccpb.KeyValue) bool
	switch r.GetSortTarget() {
	case pb.RangeRequest_KEY:
		less = func(a, b *mvccpb.KeyValue) bool { return bytes.Compare(a.GetKey(), b.GetKey()) < 0 }
	case pb.RangeRequest_VERSION:
		less = func(a, b *mvccpb.KeyValue) bool { return a.GetVersion() < b.GetVersion() }
	case pb.RangeRequest_CREATE:
		less = func(a, b *mvccpb.KeyValue) bool { return a.GetCreateRevision() < b.GetCreateRevision() }
	case pb.RangeRequest_MOD:
		less = func(a, b *mvccpb.KeyValue) bool { return a.GetModRevision() < b.GetModRevision() }
	case pb.RangeRequest_VALUE:
		less = func(a, b *mvccpb.KeyValue) bool { return bytes.Compare(a.GetValue(), b.GetValue()) < 0 }
	default:
		return
	}
	var s sort.Interface = kvSorter{kvs, less}
	if order == pb.RangeRequest_DESCEND {
		s = sort.Reverse(s)
	}
	sort.Sort(s)
}

type kvSorter struct {
	kvs  []*mvccpb.KeyValue
	less func(a, b *mvccpb.KeyValue) bool
}

func (s kvSorter) Len() int           { return len(s.kvs) }
func (s kvSorter) Swap(i, j int)      { s.kvs[i], s.kvs[j] = s.kvs[j], s.kvs[i] }
func (s kvSorter) Less(i, j int) bool { return s.less(s.kvs[i], s.kvs[j]) }
