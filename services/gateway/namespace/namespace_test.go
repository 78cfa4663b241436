package namespace

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
)

func TestPrefixInterval(t *testing.T) {
	for _, c := range []struct{ p, key, end, wantKey, wantEnd string }{
		{"/t/", "a", "", "/t/a", ""},                   // one key
		{"/t/", "a", "b", "/t/a", "/t/b"},              // a range
		{"/t/", "a", "\x00", "/t/a", "/t0"},            // from a on: up to the namespace's end
		{"/t/", "\x00", "\x00", "/t/\x00", "/t0"},      // every key (etcdctl get "" --prefix)
		{"a\xff", "k", "\x00", "a\xffk", "b"},          // the end carries
		{"\xff\xff", "k", "\x00", "\xff\xffk", "\x00"}, // nothing after: the keyspace's end
	} {
		k, e := Interval([]byte(c.p), []byte(c.key), []byte(c.end))
		if string(k) != c.wantKey || string(e) != c.wantEnd {
			t.Errorf("Interval(%q, %q, %q) = %q, %q; want %q, %q", c.p, c.key, c.end, k, e, c.wantKey, c.wantEnd)
		}
	}
}

func TestTxnNamespaceMapsEveryKeyAndLeavesTheRequest(t *testing.T) {
	p := []byte("/acme/")
	req := &pb.TxnRequest{
		Compare: []*pb.Compare{{Key: []byte("a"), RangeEnd: []byte("\x00"), Target: pb.Compare_VERSION}},
		Success: []*pb.RequestOp{
			{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte("x"), Value: []byte("1"), PrevKv: true}}},
			{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{Failure: []*pb.RequestOp{
				{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{Key: []byte("d"), RangeEnd: []byte("e")}}},
			}}}},
		},
		Failure: []*pb.RequestOp{{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte("r")}}}},
	}
	orig := proto.Clone(req)
	got := TxnIn(p, req)
	if !proto.Equal(req, orig) {
		t.Fatal("TxnIn modified the client's request")
	}
	if c := got.Compare[0]; string(c.Key) != "/acme/a" || string(c.RangeEnd) != "/acme0" {
		t.Errorf("compare: %q %q", c.Key, c.RangeEnd)
	}
	if k := got.Success[0].GetRequestPut().GetKey(); string(k) != "/acme/x" {
		t.Errorf("put: %q", k)
	}
	if d := got.Success[1].GetRequestTxn().GetFailure()[0].GetRequestDeleteRange(); string(d.Key) != "/acme/d" || string(d.RangeEnd) != "/acme/e" {
		t.Errorf("nested delete: %q %q", d.Key, d.RangeEnd)
	}
	if k := got.Failure[0].GetRequestRange().GetKey(); string(k) != "/acme/r" {
		t.Errorf("range: %q", k)
	}

	kv := &mvccpb.KeyValue{Key: []byte("/acme/x"), Value: []byte("1"), ModRevision: 5}
	resp := &pb.TxnResponse{Succeeded: true, Responses: []*pb.ResponseOp{
		{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{PrevKv: kv}}},
		{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: &pb.TxnResponse{Responses: []*pb.ResponseOp{
			{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{Kvs: []*mvccpb.KeyValue{kv}, Count: 1}}},
		}}}},
	}}
	out := TxnOut(p, resp)
	if k := out.Responses[0].GetResponsePut().GetPrevKv().GetKey(); string(k) != "x" {
		t.Errorf("prev_kv: %q", k)
	}
	if r := out.Responses[1].GetResponseTxn().GetResponses()[0].GetResponseRange(); string(r.Kvs[0].Key) != "x" || r.Count != 1 || r.Kvs[0].ModRevision != 5 {
		t.Errorf("nested range: %v", r)
	}
	if !bytes.Equal(kv.Key, []byte("/acme/x")) {
		t.Error("TxnOut modified the replica's key-value")
	}
	if TxnIn(nil, req) != req || TxnOut(nil, resp) != resp {
		t.Error("without a namespace the messages are not passed as they are")
	}
}

// An empty key is invalid in KV requests: it stays empty, for the replica to refuse
// as etcd does, instead of naming the namespace itself. In a watch it means "\x00".
func TestEmptyKeysStayInvalid(t *testing.T) {
	p := []byte("/t/")
	txn := TxnIn(p, &pb.TxnRequest{
		Compare: []*pb.Compare{{}},
		Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{}}}},
	})
	if len(txn.Compare[0].Key) != 0 || len(txn.Success[0].GetRequestPut().GetKey()) != 0 {
		t.Errorf("empty txn keys mapped: %v", txn)
	}
	if r := RangeIn(p, &pb.RangeRequest{RangeEnd: []byte("z")}); len(r.Key) != 0 || string(r.RangeEnd) != "z" {
		t.Errorf("empty range key mapped: %v", r)
	}
	if w := WatchIn(p, &pb.WatchCreateRequest{}); string(w.Key) != "/t/" {
		t.Errorf("empty watch key: %q", w.Key)
	}
}

func TestLeaseKeysOutHidesOtherNamespaces(t *testing.T) {
	r := LeaseKeysOut([]byte("/a/"), &pb.LeaseTimeToLiveResponse{ID: 1, TTL: 5, Keys: [][]byte{[]byte("/a/x"), []byte("/b/y"), []byte("/a")}})
	if len(r.Keys) != 1 || string(r.Keys[0]) != "x" || r.ID != 1 || r.TTL != 5 {
		t.Fatalf("%v", r)
	}
}
