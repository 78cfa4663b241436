// Package namespace maps etcd requests into a key prefix and their answers out of it,
// as etcd's proxy --namespace (and clientv3/namespace) do: the prefix is added to every
// key a request names and stripped from every key an answer holds. Everything here
// works on the client's request and answers new messages (or the same one when the
// prefix is empty): requests stay the client's, answers (shared events included) are
// never modified.
package namespace

import (
	"bytes"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
)

// Key is p+key.
func Key(p, key []byte) []byte {
	return append(append(make([]byte, 0, len(p)+len(key)), p...), key...)
}

// kvKey is Key for a key of a KV request: an empty key stays empty, so that
// the replica refuses it as etcd does ("key is not provided") instead of taking the
// namespace itself for the key.
func kvKey(p, key []byte) []byte {
	if len(key) == 0 {
		return key
	}
	return Key(p, key)
}

// kvInterval is Interval for a KV request's range: an empty key leaves the
// range as it is, for the replica to refuse.
func kvInterval(p, key, end []byte) ([]byte, []byte) {
	if len(key) == 0 {
		return key, end
	}
	return Interval(p, key, end)
}

// Interval maps [key, end) into the namespace p: an empty end stays empty (a
// single key), "\x00" (every key from key on) ends where the namespace ends.
func Interval(p, key, end []byte) ([]byte, []byte) {
	pk := Key(p, key)
	switch {
	case len(end) == 0:
		return pk, end
	case len(end) == 1 && end[0] == 0:
		return pk, End(p)
	}
	return pk, Key(p, end)
}

// End is the first key after every key that starts with p ("\x00", the end of
// the keyspace, when p is all 0xff).
func End(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0}
}

// StripKV answers kv with its key outside the namespace p.
func StripKV(p []byte, kv *mvccpb.KeyValue) *mvccpb.KeyValue {
	if kv == nil {
		return nil
	}
	return &mvccpb.KeyValue{Key: bytes.TrimPrefix(kv.GetKey(), p), CreateRevision: kv.GetCreateRevision(), ModRevision: kv.GetModRevision(),
		Version: kv.GetVersion(), Value: kv.GetValue(), Lease: kv.GetLease()}
}

func stripKVs(p []byte, kvs []*mvccpb.KeyValue) []*mvccpb.KeyValue {
	if len(kvs) == 0 {
		return kvs
	}
	out := make([]*mvccpb.KeyValue, len(kvs))
	for i, kv := range kvs {
		out[i] = StripKV(p, kv)
	}
	return out
}

func RangeIn(p []byte, r *pb.RangeRequest) *pb.RangeRequest {
	if len(p) == 0 {
		return r
	}
	c := proto.Clone(r).(*pb.RangeRequest)
	c.Key, c.RangeEnd = kvInterval(p, r.GetKey(), r.GetRangeEnd())
	return c
}

func RangeOut(p []byte, r *pb.RangeResponse) *pb.RangeResponse {
	if len(p) == 0 || r == nil {
		return r
	}
	return &pb.RangeResponse{Header: r.GetHeader(), Kvs: stripKVs(p, r.GetKvs()), More: r.GetMore(), Count: r.GetCount()}
}

func PutIn(p []byte, r *pb.PutRequest) *pb.PutRequest {
	if len(p) == 0 {
		return r
	}
	c := proto.Clone(r).(*pb.PutRequest)
	c.Key = kvKey(p, r.GetKey())
	return c
}

func PutOut(p []byte, r *pb.PutResponse) *pb.PutResponse {
	if len(p) == 0 || r == nil {
		return r
	}
	return &pb.PutResponse{Header: r.GetHeader(), PrevKv: StripKV(p, r.GetPrevKv())}
}

func DeleteIn(p []byte, r *pb.DeleteRangeRequest) *pb.DeleteRangeRequest {
	if len(p) == 0 {
		return r
	}
	c := proto.Clone(r).(*pb.DeleteRangeRequest)
	c.Key, c.RangeEnd = kvInterval(p, r.GetKey(), r.GetRangeEnd())
	return c
}

func DeleteOut(p []byte, r *pb.DeleteRangeResponse) *pb.DeleteRangeResponse {
	if len(p) == 0 || r == nil {
		return r
	}
	return &pb.DeleteRangeResponse{Header: r.GetHeader(), Deleted: r.GetDeleted(), PrevKvs: stripKVs(p, r.GetPrevKvs())}
}

// TxnIn maps every compare and every op, at every nesting level.
func TxnIn(p []byte, r *pb.TxnRequest) *pb.TxnRequest {
	if len(p) == 0 {
		return r
	}
	c := &pb.TxnRequest{}
	for _, cmp := range r.GetCompare() {
		cc := proto.Clone(cmp).(*pb.Compare)
		cc.Key, cc.RangeEnd = kvInterval(p, cmp.GetKey(), cmp.GetRangeEnd())
		c.Compare = append(c.Compare, cc)
	}
	ops := func(in []*pb.RequestOp) []*pb.RequestOp {
		var out []*pb.RequestOp
		for _, op := range in {
			switch o := op.GetRequest().(type) {
			case *pb.RequestOp_RequestRange:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: RangeIn(p, o.RequestRange)}})
			case *pb.RequestOp_RequestPut:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: PutIn(p, o.RequestPut)}})
			case *pb.RequestOp_RequestDeleteRange:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: DeleteIn(p, o.RequestDeleteRange)}})
			case *pb.RequestOp_RequestTxn:
				out = append(out, &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: TxnIn(p, o.RequestTxn)}})
			default:
				out = append(out, op) // an empty op: the replica answers it as etcd does
			}
		}
		return out
	}
	c.Success, c.Failure = ops(r.GetSuccess()), ops(r.GetFailure())
	return c
}

func TxnOut(p []byte, r *pb.TxnResponse) *pb.TxnResponse {
	if len(p) == 0 || r == nil {
		return r
	}
	c := &pb.TxnResponse{Header: r.GetHeader(), Succeeded: r.GetSucceeded()}
	for _, op := range r.GetResponses() {
		switch o := op.GetResponse().(type) {
		case *pb.ResponseOp_ResponseRange:
			c.Responses = append(c.Responses, &pb.ResponseOp{Response: &pb.ResponseOp_ResponseRange{ResponseRange: RangeOut(p, o.ResponseRange)}})
		case *pb.ResponseOp_ResponsePut:
			c.Responses = append(c.Responses, &pb.ResponseOp{Response: &pb.ResponseOp_ResponsePut{ResponsePut: PutOut(p, o.ResponsePut)}})
		case *pb.ResponseOp_ResponseDeleteRange:
			c.Responses = append(c.Responses, &pb.ResponseOp{Response: &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: DeleteOut(p, o.ResponseDeleteRange)}})
		case *pb.ResponseOp_ResponseTxn:
			c.Responses = append(c.Responses, &pb.ResponseOp{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: TxnOut(p, o.ResponseTxn)}})
		default:
			c.Responses = append(c.Responses, op)
		}
	}
	return c
}

func WatchIn(p []byte, r *pb.WatchCreateRequest) *pb.WatchCreateRequest {
	if len(p) == 0 {
		return r
	}
	c := proto.Clone(r).(*pb.WatchCreateRequest)
	c.Key, c.RangeEnd = Interval(p, r.GetKey(), r.GetRangeEnd())
	return c
}

// EventsOut answers evs with their keys outside the namespace p (evs itself, shared and
// never modified, when p is empty).
func EventsOut(p []byte, evs []*mvccpb.Event) []*mvccpb.Event {
	if len(p) == 0 {
		return evs
	}
	out := make([]*mvccpb.Event, len(evs))
	for i, ev := range evs {
		out[i] = EventOut(p, ev)
	}
	return out
}

// EventOut is ev with its keys out of the namespace p (ev itself when p is empty).
func EventOut(p []byte, ev *mvccpb.Event) *mvccpb.Event {
	if len(p) == 0 {
		return ev
	}
	return &mvccpb.Event{Type: ev.GetType(), Kv: StripKV(p, ev.GetKv()), PrevKv: StripKV(p, ev.GetPrevKv())}
}

// LeaseKeysOut keeps a lease's keys inside the namespace p, without the prefix (as
// clientv3/namespace's TimeToLive: keys of other namespaces are not shown).
func LeaseKeysOut(p []byte, r *pb.LeaseTimeToLiveResponse) *pb.LeaseTimeToLiveResponse {
	if len(p) == 0 || r == nil || len(r.GetKeys()) == 0 {
		return r
	}
	c := &pb.LeaseTimeToLiveResponse{Header: r.GetHeader(), ID: r.GetID(), TTL: r.GetTTL(), GrantedTTL: r.GetGrantedTTL()}
	for _, k := range r.GetKeys() {
		if bytes.HasPrefix(k, p) {
			c.Keys = append(c.Keys, k[len(p):])
		}
	}
	return c
}
