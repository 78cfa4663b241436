package mvcc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// txn is one request's work: the writes of a Put, DeleteRange or Txn all share the
// revision beginRev+1, told apart by their sub-revision (the count of changes so far).
// A read-only txn reads one shared iterator; a writing txn reads through its batch.
type txn struct {
	s          *Store
	w          *Writer // nil for a read-only txn
	b          *pebble.Batch
	shared     *pebble.Iterator
	beginRev   int64
	compactRev int64
	changes    int64
}

// curRev is the revision a read inside the request sees: its own writes included.
func (t *txn) curRev() int64 {
	if t.changes > 0 {
		return t.beginRev + 1
	}
	return t.beginRev
}

func (t *txn) iter() (*pebble.Iterator, func(), error) {
	if t.shared != nil {
		return t.shared, func() {}, nil
	}
	it, err := t.b.NewIter(&pebble.IterOptions{LowerBound: spaceLower, UpperBound: spaceUpper})
	if err != nil {
		return nil, nil, err
	}
	return it, func() { it.Close() }, nil
}

func (t *txn) rangeKVs(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	it, done, err := t.iter()
	if err != nil {
		return nil, err
	}
	defer done()
	return executeRange(ctx, it, t.curRev(), t.compactRev, r)
}

// current returns the live version of key, or nil. Writers look it up with a point
// Get on their batch (bloom filters skip most tables); read-only txns seek their view.
func (t *txn) current(key []byte) (*mvccpb.KeyValue, error) {
	if t.shared != nil {
		return currentKV(t.shared, key)
	}
	v, closer, err := t.b.Get(currentKey(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer closer.Close()
	kv := &mvccpb.KeyValue{}
	if err := proto.Unmarshal(v, kv); err != nil {
		return nil, fmt.Errorf("mvcc: decode %q: %w", key, err)
	}
	return kv, nil
}

func currentKV(it *pebble.Iterator, key []byte) (*mvccpb.KeyValue, error) {
	ck := currentKey(key)
	if !it.SeekGE(ck) || !bytes.Equal(it.Key(), ck) {
		return nil, it.Error()
	}
	kv := &mvccpb.KeyValue{}
	if err := proto.Unmarshal(it.Value(), kv); err != nil {
		return nil, fmt.Errorf("mvcc: decode %q: %w", key, err)
	}
	return kv, nil
}

// checkPut validates a put against the state before the request, as etcd does before
// it writes anything, so a failing request changes nothing.
func (t *txn) checkPut(r *pb.PutRequest) error {
	if r.GetLease() != 0 && !t.w.leaseExists(r.GetLease()) {
		return etcderr.ErrLeaseNotFound
	}
	if r.GetIgnoreValue() || r.GetIgnoreLease() {
		if _, ok := t.w.meta(r.GetKey()); !ok {
			return etcderr.ErrKeyNotFound
		}
	}
	return nil
}

func (t *txn) put(r *pb.PutRequest) (*pb.PutResponse, error) {
	// Only prev_kv and ignore_value need the previous version itself; everything else
	// comes from the in-memory key metadata.
	var prev *mvccpb.KeyValue
	if r.GetPrevKv() || r.GetIgnoreValue() {
		var err error
		if prev, err = t.current(r.GetKey()); err != nil {
			return nil, err
		}
	}
	rev := t.beginRev + 1
	kv := &mvccpb.KeyValue{
		Key:            r.GetKey(),
		Value:          r.GetValue(),
		Lease:          r.GetLease(),
		CreateRevision: rev,
		ModRevision:    rev,
		Version:        1,
	}
	if m, ok := t.w.meta(r.GetKey()); ok {
		kv.CreateRevision = m.create
		kv.Version = m.version + 1
		if r.GetIgnoreValue() && prev != nil {
			kv.Value = prev.GetValue()
		}
		if r.GetIgnoreLease() {
			kv.Lease = m.lease
		}
	}
	enc, err := proto.Marshal(kv)
	if err != nil {
		return nil, err
	}
	if err := t.record(r.GetKey(), kindPut, enc); err != nil {
		return nil, err
	}
	if err := t.b.Set(currentKey(r.GetKey()), enc, nil); err != nil {
		return nil, err
	}
	t.w.setMeta(r.GetKey(), &keyMeta{create: kv.GetCreateRevision(), version: kv.GetVersion(), lease: kv.GetLease()})
	resp := &pb.PutResponse{Header: &pb.ResponseHeader{Revision: rev}}
	if r.GetPrevKv() {
		resp.PrevKv = prev
	}
	return resp, nil
}

// record appends a change to the history: the revision record and its index entry.
func (t *txn) record(key []byte, kind byte, enc []byte) error {
	rev, sub := t.beginRev+1, t.changes
	val := make([]byte, 1+len(enc))
	val[0] = kind
	copy(val[1:], enc)
	if err := t.b.Set(revKey(rev, sub), val, nil); err != nil {
		return err
	}
	idx := binary.BigEndian.AppendUint64([]byte{kind}, uint64(sub))
	if err := t.b.Set(indexKey(key, rev), idx, nil); err != nil {
		return err
	}
	t.changes++
	return nil
}

func (t *txn) deleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	resp := &pb.DeleteRangeResponse{Header: &pb.ResponseHeader{}}
	it, done, err := t.iter()
	if err != nil {
		return nil, err
	}
	var doomed []*mvccpb.KeyValue
	err = scanCurrent(it, r.GetKey(), rangeEnd(r.GetRangeEnd()), func(kv []byte) (bool, error) {
		m := &mvccpb.KeyValue{}
		if err := proto.Unmarshal(kv, m); err != nil {
			return false, err
		}
		doomed = append(doomed, m)
		return true, nil
	})
	done()
	if err != nil {
		return nil, err
	}
	for _, kv := range doomed {
		if err := t.deleteKey(kv.GetKey()); err != nil {
			return nil, err
		}
	}
	resp.Deleted = int64(len(doomed))
	if r.GetPrevKv() {
		resp.PrevKvs = doomed
	}
	resp.Header.Revision = t.curRev()
	return resp, nil
}

// txn runs a TxnRequest: compares, then every check of the chosen branch, then the
// branch itself. Checks come first so that a failing request writes nothing.
func (t *txn) txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	path, err := t.comparePath(r)
	if err != nil {
		return nil, err
	}
	if _, err := t.checkBranch(r, path); err != nil {
		return nil, err
	}
	resp := &pb.TxnResponse{Header: &pb.ResponseHeader{}}
	if _, err := t.execBranch(ctx, r, path, resp); err != nil {
		return nil, err
	}
	resp.Header.Revision = t.curRev()
	return resp, nil
}

// comparePath evaluates the compares of r and of every nested txn on the chosen
// branches, depth first, before anything is written.
func (t *txn) comparePath(r *pb.TxnRequest) ([]bool, error) {
	ok := true
	for _, c := range r.GetCompare() {
		match, err := t.compare(c)
		if err != nil {
			return nil, err
		}
		if !match {
			ok = false
			break
		}
	}
	path := []bool{ok}
	for _, op := range branch(r, ok) {
		if nested := op.GetRequestTxn(); nested != nil {
			sub, err := t.comparePath(nested)
			if err != nil {
				return nil, err
			}
			path = append(path, sub...)
		}
	}
	return path, nil
}

func branch(r *pb.TxnRequest, ok bool) []*pb.RequestOp {
	if ok {
		return r.GetSuccess()
	}
	return r.GetFailure()
}

func (t *txn) compare(c *pb.Compare) (bool, error) {
	it, done, err := t.iter()
	if err != nil {
		return false, err
	}
	defer done()
	var kvs []*mvccpb.KeyValue
	end := rangeEnd(c.GetRangeEnd())
	if end == nil {
		kv, err := currentKV(it, c.GetKey())
		if err != nil {
			return false, err
		}
		if kv != nil {
			kvs = append(kvs, kv)
		}
	} else {
		err = scanCurrent(it, c.GetKey(), end, func(enc []byte) (bool, error) {
			kv := &mvccpb.KeyValue{}
			if err := proto.Unmarshal(enc, kv); err != nil {
				return false, err
			}
			kvs = append(kvs, kv)
			return true, nil
		})
		if err != nil {
			return false, err
		}
	}
	if len(kvs) == 0 {
		if c.GetTarget() == pb.Compare_VALUE {
			return false, nil
		}
		return compareKV(c, &mvccpb.KeyValue{}), nil
	}
	for _, kv := range kvs {
		if !compareKV(c, kv) {
			return false, nil
		}
	}
	return true, nil
}

func compareKV(c *pb.Compare, kv *mvccpb.KeyValue) bool {
	var result int
	switch c.GetTarget() {
	case pb.Compare_VALUE:
		result = bytes.Compare(kv.GetValue(), c.GetValue())
	case pb.Compare_CREATE:
		result = cmpInt(kv.GetCreateRevision(), c.GetCreateRevision())
	case pb.Compare_MOD:
		result = cmpInt(kv.GetModRevision(), c.GetModRevision())
	case pb.Compare_VERSION:
		result = cmpInt(kv.GetVersion(), c.GetVersion())
	case pb.Compare_LEASE:
		result = cmpInt(kv.GetLease(), c.GetLease())
	}
	switch c.GetResult() {
	case pb.Compare_EQUAL:
		return result == 0
	case pb.Compare_NOT_EQUAL:
		return result != 0
	case pb.Compare_GREATER:
		return result > 0
	case pb.Compare_LESS:
		return result < 0
	}
	return true
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// checkBranch validates the ops of the chosen branches; it returns how many entries of
// path the nested txns consumed.
func (t *txn) checkBranch(r *pb.TxnRequest, path []bool) (int, error) {
	used := 0
	for _, op := range branch(r, path[0]) {
		switch req := op.GetRequest().(type) {
		case *pb.RequestOp_RequestRange:
			if err := checkRevision(req.RequestRange.GetRevision(), t.beginRev, t.compactRev); err != nil {
				return 0, err
			}
		case *pb.RequestOp_RequestPut:
			if err := t.checkPut(req.RequestPut); err != nil {
				return 0, err
			}
		case *pb.RequestOp_RequestTxn:
			n, err := t.checkBranch(req.RequestTxn, path[1+used:])
			if err != nil {
				return 0, err
			}
			used += n + 1
		}
	}
	return used, nil
}

func checkRevision(rev, cur, compact int64) error {
	switch {
	case rev == 0:
		return nil
	case rev > cur:
		return etcderr.ErrFutureRev
	case rev < compact:
		return etcderr.ErrCompacted
	}
	return nil
}

// execBranch runs the chosen branch into resp; it returns how many entries of path the
// nested txns consumed.
func (t *txn) execBranch(ctx context.Context, r *pb.TxnRequest, path []bool, resp *pb.TxnResponse) (int, error) {
	used := 0
	resp.Succeeded = path[0]
	ops := branch(r, path[0])
	resp.Responses = make([]*pb.ResponseOp, len(ops))
	for i, op := range ops {
		out := &pb.ResponseOp{}
		resp.Responses[i] = out
		switch req := op.GetRequest().(type) {
		case *pb.RequestOp_RequestRange:
			rr, err := t.rangeKVs(ctx, req.RequestRange)
			if err != nil {
				return 0, fmt.Errorf("txn range: %w", err)
			}
			out.Response = &pb.ResponseOp_ResponseRange{ResponseRange: rr}
		case *pb.RequestOp_RequestPut:
			pr, err := t.put(req.RequestPut)
			if err != nil {
				return 0, fmt.Errorf("txn put: %w", err)
			}
			out.Response = &pb.ResponseOp_ResponsePut{ResponsePut: pr}
		case *pb.RequestOp_RequestDeleteRange:
			dr, err := t.deleteRange(ctx, req.RequestDeleteRange)
			if err != nil {
				return 0, fmt.Errorf("txn delete: %w", err)
			}
			out.Response = &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: dr}
		case *pb.RequestOp_RequestTxn:
			nested := &pb.TxnResponse{Header: &pb.ResponseHeader{}}
			n, err := t.execBranch(ctx, req.RequestTxn, path[1+used:], nested)
			if err != nil {
				return 0, err
			}
			used += n + 1
			// etcd leaves a nested txn's header empty; clients read the outer one.
			out.Response = &pb.ResponseOp_ResponseTxn{ResponseTxn: nested}
		}
	}
	return used, nil
}

// IsTxnReadOnly tells whether every op of both branches is a range, so the txn can be
// served without a proposal.
func IsTxnReadOnly(r *pb.TxnRequest) bool {
	for _, ops := range [][]*pb.RequestOp{r.GetSuccess(), r.GetFailure()} {
		for _, op := range ops {
			if op.GetRequestRange() == nil {
				return false
			}
		}
	}
	return true
}

// IsTxnSerializable tells whether a read-only txn asked only for serializable ranges.
func IsTxnSerializable(r *pb.TxnRequest) bool {
	for _, ops := range [][]*pb.RequestOp{r.GetSuccess(), r.GetFailure()} {
		for _, op := range ops {
			if rr := op.GetRequestRange(); rr == nil || !rr.GetSerializable() {
				return false
			}
		}
	}
	return true
}
