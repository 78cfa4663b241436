package mvcc

import (
	"bytes"
	"fmt"
	"sort"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// model is a deliberately naive in-memory implementation of etcd 3.7's KV semantics
// (etcdserver/txn and storage/mvcc), the reference the store is checked against: the
// full history of every key, never pruned; compaction only moves the revision below
// which reads fail.
type model struct {
	rev     int64
	compact int64
	leases  leaseSet
	// hist holds every change of every key in order; a tombstone is a KeyValue with
	// CreateRevision 0 (as the store writes it).
	hist map[string][]*mvccpb.KeyValue
}

func newModel(leases leaseSet) *model {
	return &model{rev: 1, compact: -1, leases: leases, hist: map[string][]*mvccpb.KeyValue{}}
}

func isTombstone(kv *mvccpb.KeyValue) bool { return kv.GetCreateRevision() == 0 }

// at is the live version of key at rev, or nil.
func (m *model) at(key string, rev int64) *mvccpb.KeyValue {
	h := m.hist[key]
	for i := len(h) - 1; i >= 0; i-- {
		if h[i].GetModRevision() <= rev {
			if isTombstone(h[i]) {
				return nil
			}
			return proto.Clone(h[i]).(*mvccpb.KeyValue)
		}
	}
	return nil
}

// keysIn lists, in byte order, the keys the model has ever seen inside etcd's range
// (key, range_end): a single key, [key, end), or every key ≥ key for end "\x00".
func (m *model) keysIn(key, end []byte) []string {
	var out []string
	for k := range m.hist {
		bk := []byte(k)
		var in bool
		switch {
		case len(end) == 0:
			in = bytes.Equal(bk, key)
		case len(end) == 1 && end[0] == 0:
			in = bytes.Compare(bk, key) >= 0
		default:
			in = bytes.Compare(bk, key) >= 0 && bytes.Compare(bk, end) < 0
		}
		if in {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// liveAt lists the live versions at rev of the keys in the range, in key order.
func (m *model) liveAt(key, end []byte, rev int64) []*mvccpb.KeyValue {
	var out []*mvccpb.KeyValue
	for _, k := range m.keysIn(key, end) {
		if kv := m.at(k, rev); kv != nil {
			out = append(out, kv)
		}
	}
	return out
}

// rangeAt answers r as etcd's executeRange does, for a reader whose current revision
// is curRev.
func (m *model) rangeAt(r *pb.RangeRequest, curRev int64) (*pb.RangeResponse, error) {
	rev := r.GetRevision()
	if rev > curRev {
		return nil, etcderr.ErrFutureRev
	}
	if rev <= 0 {
		rev = curRev
	}
	if rev < m.compact {
		return nil, etcderr.ErrCompacted
	}
	all := m.liveAt(r.GetKey(), r.GetRangeEnd(), rev)
	resp := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: curRev}, Count: int64(len(all))}
	if r.GetCountOnly() {
		return resp, nil
	}
	kvs := all
	filters := r.GetMinModRevision() != 0 || r.GetMaxModRevision() != 0 ||
		r.GetMinCreateRevision() != 0 || r.GetMaxCreateRevision() != 0
	// etcd fetches only limit+1 keys, in key order, when the request as sent (sort
	// order NONE counts as default, even for another target) neither sorts nor filters;
	// the sort below then orders just those.
	defaultOrder := r.GetSortOrder() == pb.RangeRequest_NONE ||
		(r.GetSortTarget() == pb.RangeRequest_KEY && r.GetSortOrder() == pb.RangeRequest_ASCEND)
	if l := r.GetLimit(); l > 0 && defaultOrder && !filters && int64(len(kvs)) > l+1 {
		kvs = kvs[:l+1]
	}
	// Note: etcd 3.7.3 serves keys_only (unless sorting by value) from its in-memory
	// index and so drops the lease from the KeyValues; that is a known regression
	// (etcd-io/etcd#22209, fix in #22212), so the model keeps the lease as etcd 3.6 did.
	// The revision filters as etcd documents them: each bound, when not 0, is
	// inclusive.
	within := func(v, lo, hi int64) bool { return (lo == 0 || v >= lo) && (hi == 0 || v <= hi) }
	var kept []*mvccpb.KeyValue
	for _, kv := range kvs {
		if within(kv.GetModRevision(), r.GetMinModRevision(), r.GetMaxModRevision()) &&
			within(kv.GetCreateRevision(), r.GetMinCreateRevision(), r.GetMaxCreateRevision()) {
			kept = append(kept, kv)
		}
	}
	etcdSort(kept, r.GetSortTarget(), r.GetSortOrder())
	if l := r.GetLimit(); l > 0 && int64(len(kept)) > l {
		kept = kept[:l]
		resp.More = true
	}
	if r.GetKeysOnly() {
		for _, kv := range kept {
			kv.Value = nil
		}
	}
	resp.Kvs = kept
	return resp, nil
}

// etcdSort is etcd's sortRangeResults: sort.Sort (not stable) over the fetched order,
// reversed for DESCEND; NONE with a target other than KEY means ASCEND.
func etcdSort(kvs []*mvccpb.KeyValue, target pb.RangeRequest_SortTarget, order pb.RangeRequest_SortOrder) {
	if target != pb.RangeRequest_KEY && order == pb.RangeRequest_NONE {
		order = pb.RangeRequest_ASCEND
	}
	if order == pb.RangeRequest_NONE || (target == pb.RangeRequest_KEY && order == pb.RangeRequest_ASCEND) {
		return
	}
	s := refSorter{kvs: kvs, less: sortLess(target)}
	switch order {
	case pb.RangeRequest_ASCEND:
		sort.Sort(s)
	case pb.RangeRequest_DESCEND:
		sort.Sort(sort.Reverse(s))
	}
}

func sortLess(target pb.RangeRequest_SortTarget) func(a, b *mvccpb.KeyValue) bool {
	switch target {
	case pb.RangeRequest_KEY:
		return func(a, b *mvccpb.KeyValue) bool { return bytes.Compare(a.GetKey(), b.GetKey()) < 0 }
	case pb.RangeRequest_VERSION:
		return func(a, b *mvccpb.KeyValue) bool { return a.GetVersion()-b.GetVersion() < 0 }
	case pb.RangeRequest_CREATE:
		return func(a, b *mvccpb.KeyValue) bool { return a.GetCreateRevision()-b.GetCreateRevision() < 0 }
	case pb.RangeRequest_MOD:
		return func(a, b *mvccpb.KeyValue) bool { return a.GetModRevision()-b.GetModRevision() < 0 }
	case pb.RangeRequest_VALUE:
		return func(a, b *mvccpb.KeyValue) bool { return bytes.Compare(a.GetValue(), b.GetValue()) < 0 }
	}
	panic(fmt.Sprintf("unexpected sort target %v", target))
}

type refSorter struct {
	kvs  []*mvccpb.KeyValue
	less func(a, b *mvccpb.KeyValue) bool
}

func (s refSorter) Len() int           { return len(s.kvs) }
func (s refSorter) Swap(i, j int)      { s.kvs[i], s.kvs[j] = s.kvs[j], s.kvs[i] }
func (s refSorter) Less(i, j int) bool { return s.less(s.kvs[i], s.kvs[j]) }

// apply applies one write request and returns what etcd answers. A failing request
// changes nothing.
func (m *model) apply(req proto.Message) (proto.Message, error) {
	switch r := req.(type) {
	case *pb.PutRequest:
		t := m.begin()
		if err := t.checkPut(r); err != nil {
			return nil, err
		}
		resp := t.put(r)
		m.end(t)
		return resp, nil
	case *pb.DeleteRangeRequest:
		t := m.begin()
		resp := t.deleteRange(r)
		m.end(t)
		return resp, nil
	case *pb.TxnRequest:
		t := m.begin()
		resp, err := t.txn(r)
		if err != nil {
			return nil, err
		}
		m.end(t)
		return resp, nil
	case *pb.CompactionRequest:
		switch {
		case r.GetRevision() <= m.compact:
			return nil, etcderr.ErrCompacted
		case r.GetRevision() > m.rev:
			return nil, etcderr.ErrFutureRev
		}
		m.compact = r.GetRevision()
		return &pb.CompactionResponse{Header: &pb.ResponseHeader{Revision: m.rev}}, nil
	}
	panic(fmt.Sprintf("model.apply: unexpected %T", req))
}

// readTxn answers a read-only txn at the current revision.
func (m *model) readTxn(r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return m.begin().txn(r)
}

// mtxn is one write request in the model: its changes all get revision begin+1.
type mtxn struct {
	m       *model
	begin   int64
	changes int
}

func (m *model) begin() *mtxn { return &mtxn{m: m, begin: m.rev} }

func (m *model) end(t *mtxn) {
	if t.changes > 0 {
		m.rev = t.begin + 1
	}
}

func (t *mtxn) cur() int64 {
	if t.changes > 0 {
		return t.begin + 1
	}
	return t.begin
}

func (t *mtxn) change(kv *mvccpb.KeyValue) {
	k := string(kv.GetKey())
	t.m.hist[k] = append(t.m.hist[k], kv)
	t.changes++
}

func (t *mtxn) checkPut(r *pb.PutRequest) error {
	if r.GetLease() != 0 && !t.m.leases.Exists(r.GetLease()) {
		return etcderr.ErrLeaseNotFound
	}
	if (r.GetIgnoreValue() || r.GetIgnoreLease()) && t.m.at(string(r.GetKey()), t.cur()) == nil {
		return etcderr.ErrKeyNotFound
	}
	return nil
}

func (t *mtxn) put(r *pb.PutRequest) *pb.PutResponse {
	rev := t.begin + 1
	prev := t.m.at(string(r.GetKey()), t.cur())
	kv := &mvccpb.KeyValue{Key: r.GetKey(), Value: r.GetValue(), Lease: r.GetLease(), CreateRevision: rev, ModRevision: rev, Version: 1}
	if prev != nil {
		kv.CreateRevision = prev.GetCreateRevision()
		kv.Version = prev.GetVersion() + 1
		if r.GetIgnoreValue() {
			kv.Value = prev.GetValue()
		}
		if r.GetIgnoreLease() {
			kv.Lease = prev.GetLease()
		}
	}
	t.change(kv)
	resp := &pb.PutResponse{Header: &pb.ResponseHeader{Revision: rev}}
	if r.GetPrevKv() {
		resp.PrevKv = prev
	}
	return resp
}

func (t *mtxn) deleteRange(r *pb.DeleteRangeRequest) *pb.DeleteRangeResponse {
	doomed := t.m.liveAt(r.GetKey(), r.GetRangeEnd(), t.cur())
	for _, kv := range doomed {
		t.change(&mvccpb.KeyValue{Key: kv.GetKey(), ModRevision: t.begin + 1})
	}
	resp := &pb.DeleteRangeResponse{Header: &pb.ResponseHeader{Revision: t.cur()}, Deleted: int64(len(doomed))}
	if r.GetPrevKv() {
		resp.PrevKvs = doomed
	}
	return resp
}

// plan is the outcome of a txn's compares and, for each nested txn of the chosen
// branch (by op position), its own plan: all decided before anything is written.
type plan struct {
	ok   bool
	ops  []*pb.RequestOp
	subs map[int]*plan
}

func (t *mtxn) decide(r *pb.TxnRequest) *plan {
	p := &plan{ok: true, subs: map[int]*plan{}}
	for _, c := range r.GetCompare() {
		if !t.compare(c) {
			p.ok = false
			break
		}
	}
	p.ops = r.GetSuccess()
	if !p.ok {
		p.ops = r.GetFailure()
	}
	for i, op := range p.ops {
		if n := op.GetRequestTxn(); n != nil {
			p.subs[i] = t.decide(n)
		}
	}
	return p
}

func (t *mtxn) compare(c *pb.Compare) bool {
	kvs := t.m.liveAt(c.GetKey(), c.GetRangeEnd(), t.cur())
	if len(kvs) == 0 {
		if c.GetTarget() == pb.Compare_VALUE {
			return false
		}
		kvs = []*mvccpb.KeyValue{{}}
	}
	for _, kv := range kvs {
		var got, want int64
		var res int
		switch c.GetTarget() {
		case pb.Compare_VALUE:
			res = bytes.Compare(kv.GetValue(), c.GetValue())
		case pb.Compare_CREATE:
			got, want = kv.GetCreateRevision(), c.GetCreateRevision()
		case pb.Compare_MOD:
			got, want = kv.GetModRevision(), c.GetModRevision()
		case pb.Compare_VERSION:
			got, want = kv.GetVersion(), c.GetVersion()
		case pb.Compare_LEASE:
			got, want = kv.GetLease(), c.GetLease()
		}
		if c.GetTarget() != pb.Compare_VALUE {
			switch {
			case got < want:
				res = -1
			case got > want:
				res = 1
			}
		}
		var ok bool
		switch c.GetResult() {
		case pb.Compare_EQUAL:
			ok = res == 0
		case pb.Compare_NOT_EQUAL:
			ok = res != 0
		case pb.Compare_GREATER:
			ok = res > 0
		case pb.Compare_LESS:
			ok = res < 0
		}
		if !ok {
			return false
		}
	}
	return true
}

func (t *mtxn) check(p *plan) error {
	for i, op := range p.ops {
		switch {
		case op.GetRequestRange() != nil:
			rev := op.GetRequestRange().GetRevision()
			switch {
			case rev == 0:
			case rev > t.begin:
				return etcderr.ErrFutureRev
			case rev < t.m.compact:
				return etcderr.ErrCompacted
			}
		case op.GetRequestPut() != nil:
			if err := t.checkPut(op.GetRequestPut()); err != nil {
				return err
			}
		case op.GetRequestTxn() != nil:
			if err := t.check(p.subs[i]); err != nil {
				return err
			}
		}
	}
	return nil
}

func (t *mtxn) exec(p *plan) *pb.TxnResponse {
	resp := &pb.TxnResponse{Header: &pb.ResponseHeader{}, Succeeded: p.ok}
	for i, op := range p.ops {
		out := &pb.ResponseOp{}
		switch {
		case op.GetRequestRange() != nil:
			rr, err := t.m.rangeAt(op.GetRequestRange(), t.cur())
			if err != nil {
				panic(fmt.Sprintf("model: range in txn failed after its check: %v", err))
			}
			out.Response = &pb.ResponseOp_ResponseRange{ResponseRange: rr}
		case op.GetRequestPut() != nil:
			out.Response = &pb.ResponseOp_ResponsePut{ResponsePut: t.put(op.GetRequestPut())}
		case op.GetRequestDeleteRange() != nil:
			out.Response = &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: t.deleteRange(op.GetRequestDeleteRange())}
		case op.GetRequestTxn() != nil:
			out.Response = &pb.ResponseOp_ResponseTxn{ResponseTxn: t.exec(p.subs[i])}
		}
		resp.Responses = append(resp.Responses, out)
	}
	return resp
}

func (t *mtxn) txn(r *pb.TxnRequest) (*pb.TxnResponse, error) {
	p := t.decide(r)
	if err := t.check(p); err != nil {
		return nil, err
	}
	resp := t.exec(p)
	resp.Header.Revision = t.cur()
	return resp, nil
}

// survivors counts the index entries and revision records a finished compaction at
// m.compact leaves: every change after the compaction revision, plus each key's newest
// change at or before it when that is a put. A key changed several times in one
// revision has one index entry (the last change) but a record per change; once
// compacted, only the last one can stay.
func (m *model) survivors() (index, records int) {
	for _, h := range m.hist {
		kept := -1
		for i, kv := range h {
			if kv.GetModRevision() <= m.compact {
				kept = i
				continue
			}
			records++
			if i == 0 || h[i-1].GetModRevision() != kv.GetModRevision() {
				index++
			}
		}
		if kept >= 0 && !isTombstone(h[kept]) {
			index++
			records++
		}
	}
	return index, records
}

// liveCount is the number of live keys now.
func (m *model) liveCount() int { return len(m.liveAt(nil, []byte{0}, m.rev)) }
