package mvcc

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

func cmpValue(key string, res pb.Compare_CompareResult, v string) *pb.Compare {
	return &pb.Compare{Key: []byte(key), Target: pb.Compare_VALUE, Result: res, TargetUnion: &pb.Compare_Value{Value: []byte(v)}}
}

func cmpVersion(key string, res pb.Compare_CompareResult, v int64) *pb.Compare {
	return &pb.Compare{Key: []byte(key), Target: pb.Compare_VERSION, Result: res, TargetUnion: &pb.Compare_Version{Version: v}}
}

func cmpCreate(key string, res pb.Compare_CompareResult, v int64) *pb.Compare {
	return &pb.Compare{Key: []byte(key), Target: pb.Compare_CREATE, Result: res, TargetUnion: &pb.Compare_CreateRevision{CreateRevision: v}}
}

func cmpMod(key string, res pb.Compare_CompareResult, v int64) *pb.Compare {
	return &pb.Compare{Key: []byte(key), Target: pb.Compare_MOD, Result: res, TargetUnion: &pb.Compare_ModRevision{ModRevision: v}}
}

func cmpLease(key string, res pb.Compare_CompareResult, v int64) *pb.Compare {
	return &pb.Compare{Key: []byte(key), Target: pb.Compare_LEASE, Result: res, TargetUnion: &pb.Compare_Lease{Lease: v}}
}

func withEnd(c *pb.Compare, end string) *pb.Compare {
	c.RangeEnd = []byte(end)
	return c
}

const (
	eq  = pb.Compare_EQUAL
	neq = pb.Compare_NOT_EQUAL
	gt  = pb.Compare_GREATER
	lt  = pb.Compare_LESS
)

// compareFixture: a (value "m", lease 5, create 2, mod 4, version 2),
// b (value "x", create 3, mod 3, version 1), "a\x00" (value "z", create 5, version 1).
func compareFixture(t *testing.T) (*testEnv, *model) {
	t.Helper()
	leases := leaseSet{5: true}
	e := newEnvWithLeases(t, leases)
	m := newModel(leases)
	for _, r := range []*pb.PutRequest{
		{Key: []byte("a"), Value: []byte("k")},
		{Key: []byte("b"), Value: []byte("x")},
		{Key: []byte("a"), Value: []byte("m"), Lease: 5},
		{Key: []byte("a\x00"), Value: []byte("z")},
	} {
		if _, err := e.put(r); err != nil {
			t.Fatal(err)
		}
		m.apply(r)
	}
	return e, m
}

func TestTxnCompares(t *testing.T) {
	e, m := compareFixture(t)
	tests := []struct {
		cmp  *pb.Compare
		want bool
	}{
		// VALUE
		{cmpValue("a", eq, "m"), true},
		{cmpValue("a", eq, "n"), false},
		{cmpValue("a", neq, "n"), true},
		{cmpValue("a", gt, "l"), true},
		{cmpValue("a", gt, "m"), false},
		{cmpValue("a", lt, "n"), true},
		{cmpValue("a", lt, "m"), false},
		{cmpValue("a", gt, ""), true},
		// VERSION
		{cmpVersion("a", eq, 2), true},
		{cmpVersion("a", neq, 2), false},
		{cmpVersion("a", gt, 1), true},
		{cmpVersion("a", lt, 2), false},
		{cmpVersion("a", lt, 3), true},
		// CREATE
		{cmpCreate("a", eq, 2), true},
		{cmpCreate("b", eq, 3), true},
		{cmpCreate("b", gt, 3), false},
		{cmpCreate("b", lt, 4), true},
		{cmpCreate("b", neq, 3), false},
		// MOD
		{cmpMod("a", eq, 4), true},
		{cmpMod("a", gt, 3), true},
		{cmpMod("a", lt, 4), false},
		{cmpMod("b", neq, 4), true},
		// LEASE
		{cmpLease("a", eq, 5), true},
		{cmpLease("b", eq, 0), true},
		{cmpLease("a", gt, 4), true},
		{cmpLease("b", lt, 1), true},
		{cmpLease("a", neq, 5), false},
		// A missing key: VALUE always fails, other targets compare against zero.
		{cmpValue("missing", eq, ""), false},
		{cmpValue("missing", neq, "x"), false},
		{cmpValue("missing", lt, "x"), false},
		{cmpVersion("missing", eq, 0), true},
		{cmpVersion("missing", lt, 1), true},
		{cmpCreate("missing", eq, 0), true},
		{cmpMod("missing", eq, 0), true},
		{cmpMod("missing", gt, 0), false},
		{cmpLease("missing", eq, 0), true},
		// Ranges: every key in the range must match.
		{withEnd(cmpVersion("a", gt, 0), "c"), true},                // a, a\x00, b
		{withEnd(cmpVersion("a", eq, 1), "c"), false},               // a has version 2
		{withEnd(cmpVersion("a\x00", eq, 1), "c"), true},            // a\x00, b
		{withEnd(cmpCreate("a", lt, 6), "\x00"), true},              // everything from a
		{withEnd(cmpCreate("a\x00", gt, 2), "\x00"), true},          // a\x00 (5), b (3)
		{withEnd(cmpCreate("", gt, 2), "\x00"), false},              // a has create 2
		{withEnd(cmpValue("a", neq, ""), "a\x01"), true},            // a, a\x00
		{withEnd(cmpValue("c", eq, ""), "d"), false},                // empty range, VALUE
		{withEnd(cmpVersion("c", eq, 0), "d"), true},                // empty range, compared with zero
		{withEnd(cmpVersion("b", eq, 0), "a"), true},                // inverted range: nothing
		{withEnd(cmpValue("a", eq, "m"), "a\x00"), true},            // [a, a\x00) is just a
		{withEnd(cmpValue("a\x00", eq, "z"), "a\x00\x00"), true},    // just a\x00
		{withEnd(cmpLease("a", eq, 5), "b"), false},                 // a\x00 has no lease
		{withEnd(cmpMod("a\x00", eq, 5), prefixEnd("a\x00")), true}, // prefix a\x00
		{withEnd(cmpMod("a", eq, 5), prefixEnd("a")), false},        // prefix a: a has mod 4
		{withEnd(cmpMod("", neq, 0), "\x00"), true},                 // every key exists
		{withEnd(cmpValue("missing", eq, ""), "\x00"), false},       // nothing from "missing" on
		{withEnd(cmpVersion("missing", eq, 0), "\x00"), true},       // nothing there: zero
	}
	for i, tc := range tests {
		r := &pb.TxnRequest{
			Compare: []*pb.Compare{tc.cmp},
			Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("then")})},
			Failure: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("else")})},
		}
		resp, err := e.readTxn(r)
		if err != nil {
			t.Fatalf("compare %d %v: %v", i, tc.cmp, err)
		}
		if resp.GetSucceeded() != tc.want {
			t.Errorf("compare %d %v: succeeded = %v, want %v", i, tc.cmp, resp.GetSucceeded(), tc.want)
		}
		want, _ := m.readTxn(r)
		if !proto.Equal(resp, want) {
			t.Errorf("compare %d %v:%s", i, tc.cmp, protoDiff(resp, want))
		}
		// Through the write path too.
		wresp, err := e.txn(r)
		if err != nil || wresp.GetSucceeded() != tc.want {
			t.Errorf("compare %d %v through Writer.Txn: succeeded %v, err %v; want %v", i, tc.cmp, wresp.GetSucceeded(), err, tc.want)
		}
	}
	// All compares must hold: one failing compare picks the failure branch.
	r := &pb.TxnRequest{Compare: []*pb.Compare{cmpValue("a", eq, "m"), cmpVersion("b", eq, 1), cmpLease("a", eq, 6)}}
	if resp, _ := e.readTxn(r); resp.GetSucceeded() {
		t.Errorf("txn with one false compare among three succeeded")
	}
	r.Compare = r.Compare[:2]
	if resp, _ := e.readTxn(r); !resp.GetSucceeded() {
		t.Errorf("txn with two true compares failed")
	}
	if resp, _ := e.readTxn(&pb.TxnRequest{}); !resp.GetSucceeded() {
		t.Errorf("txn without compares failed")
	}
	if e.s.Rev() != 5 {
		t.Errorf("read-only txns moved the revision to %d", e.s.Rev())
	}
}

func TestTxnBranches(t *testing.T) {
	e := newEnv(t)
	e.mustPut("k", "v")
	r := &pb.TxnRequest{
		Compare: []*pb.Compare{cmpValue("k", eq, "v")},
		Success: []*pb.RequestOp{putOp("k", "then"), putOp("s", "1"), rangeOp(&pb.RangeRequest{Key: []byte("k")})},
		Failure: []*pb.RequestOp{putOp("k", "else"), delOp("s", "")},
	}
	resp := e.mustTxn(r)
	want := &pb.TxnResponse{
		Header:    &pb.ResponseHeader{Revision: 3},
		Succeeded: true,
		Responses: []*pb.ResponseOp{
			{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}}}},
			{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}}}},
			{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{
				Header: &pb.ResponseHeader{Revision: 3}, Count: 1, Kvs: []*mvccpb.KeyValue{kv("k", "then", 2, 3, 2)},
			}}},
		},
	}
	if !proto.Equal(resp, want) {
		t.Fatalf("success branch:%s", protoDiff(resp, want))
	}
	// k is now "then": the same txn takes the failure branch.
	resp = e.mustTxn(r)
	want = &pb.TxnResponse{
		Header:    &pb.ResponseHeader{Revision: 4},
		Succeeded: false,
		Responses: []*pb.ResponseOp{
			{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 4}}}},
			{Response: &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: &pb.DeleteRangeResponse{Header: &pb.ResponseHeader{Revision: 4}, Deleted: 1}}},
		},
	}
	if !proto.Equal(resp, want) {
		t.Fatalf("failure branch:%s", protoDiff(resp, want))
	}
	// Both changes of the txn share revision 4 (sub-revisions 0 and 1).
	if got := e.get("k", 0); !proto.Equal(got, kv("k", "else", 2, 4, 3)) {
		t.Errorf("k after the failure branch: %v", got)
	}
	if got := e.get("s", 0); got != nil {
		t.Errorf("s after the failure branch deleted it: %v", got)
	}
	if got := e.get("s", 3); !proto.Equal(got, kv("s", "1", 3, 3, 1)) {
		t.Errorf("s at 3: %v", got)
	}
	// An empty branch: nothing happens, the revision stays.
	resp = e.mustTxn(&pb.TxnRequest{Compare: []*pb.Compare{cmpValue("k", eq, "nope")}, Success: []*pb.RequestOp{putOp("x", "1")}})
	if resp.GetSucceeded() || len(resp.GetResponses()) != 0 || resp.GetHeader().GetRevision() != 4 || e.s.Rev() != 4 {
		t.Errorf("txn with an empty chosen branch: %v, store rev %d", resp, e.s.Rev())
	}
}

// Reads inside a txn see the txn's earlier writes, at revision rev+1; before any write
// they read at rev.
func TestTxnReadsOwnWrites(t *testing.T) {
	e := newEnv(t)
	e.mustPut("a", "1") // rev 2
	r := &pb.TxnRequest{Success: []*pb.RequestOp{
		rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("z")}), // before any write: rev 2
		putOp("a", "2"),
		rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("z")}), // sees a=2 at rev 3
		putOp("b", "1"),
		delOp("a", ""),
		rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("z")}),              // only b
		rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("z"), Revision: 2}), // the past: a=1
		putReqOp(&pb.PutRequest{Key: []byte("b"), Value: []byte("2"), PrevKv: true}),    // prev is b=1 from this txn
		delOp("zzz", ""), // deletes nothing, but the txn has changes: header rev 3
	}}
	resp := e.mustTxn(r)
	rng := func(count int64, kvs ...*mvccpb.KeyValue) *pb.ResponseOp {
		return &pb.ResponseOp{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 3}, Count: count, Kvs: kvs}}}
	}
	first := rng(1, kv("a", "1", 2, 2, 1))
	first.GetResponseRange().Header.Revision = 2
	past := rng(1, kv("a", "1", 2, 2, 1))
	want := &pb.TxnResponse{
		Header:    &pb.ResponseHeader{Revision: 3},
		Succeeded: true,
		Responses: []*pb.ResponseOp{
			first,
			{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}}}},
			rng(1, kv("a", "2", 2, 3, 2)),
			{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}}}},
			{Response: &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: &pb.DeleteRangeResponse{Header: &pb.ResponseHeader{Revision: 3}, Deleted: 1}}},
			rng(1, kv("b", "1", 3, 3, 1)),
			past,
			{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}, PrevKv: kv("b", "1", 3, 3, 1)}}},
			{Response: &pb.ResponseOp_ResponseDeleteRange{ResponseDeleteRange: &pb.DeleteRangeResponse{Header: &pb.ResponseHeader{Revision: 3}}}},
		},
	}
	if !proto.Equal(resp, want) {
		t.Fatalf("txn reading its own writes:%s", protoDiff(resp, want))
	}
	// After the commit: one revision, a gone, b=2 with version 2 (two changes of b in
	// one revision).
	if e.s.Rev() != 3 {
		t.Errorf("rev %d, want 3", e.s.Rev())
	}
	if got := e.get("a", 0); got != nil {
		t.Errorf("a after the txn: %v", got)
	}
	if got, want := e.get("b", 0), kv("b", "2", 3, 3, 2); !proto.Equal(got, want) {
		t.Errorf("b after the txn:%s", protoDiff(got, want))
	}
	if got, want := e.get("a", 2), kv("a", "1", 2, 2, 1); !proto.Equal(got, want) {
		t.Errorf("a at 2:%s", protoDiff(got, want))
	}
}

// A txn that changes nothing (reads only, or deletes of missing keys) keeps the
// revision; so does a txn of ops on missing keys.
func TestTxnWithoutChangesKeepsRevision(t *testing.T) {
	e := newEnv(t)
	e.mustPut("a", "1")
	for _, r := range []*pb.TxnRequest{
		{Success: []*pb.RequestOp{delOp("missing", ""), delOp("b", "c"), rangeOp(&pb.RangeRequest{Key: []byte("a")})}},
		{Success: []*pb.RequestOp{txnOp(&pb.TxnRequest{Success: []*pb.RequestOp{delOp("x", "\x00")}})}},
		{},
	} {
		resp := e.mustTxn(r)
		if resp.GetHeader().GetRevision() != 2 || e.s.Rev() != 2 {
			t.Errorf("txn %v: header %d, store %d; want both 2", r, resp.GetHeader().GetRevision(), e.s.Rev())
		}
		for _, op := range resp.GetResponses() {
			if dr := op.GetResponseDeleteRange(); dr != nil && dr.GetHeader().GetRevision() != 2 {
				t.Errorf("txn %v: delete response at revision %d, want 2", r, dr.GetHeader().GetRevision())
			}
		}
	}
	if resp := e.mustPut("a", "2"); resp.GetHeader().GetRevision() != 3 {
		t.Errorf("next put got revision %d, want 3", resp.GetHeader().GetRevision())
	}
}

func TestTxnNested(t *testing.T) {
	e := newEnv(t)
	e.mustPut("k", "v") // rev 2
	inner := func(cmpVal string) *pb.TxnRequest {
		return &pb.TxnRequest{
			Compare: []*pb.Compare{cmpValue("k", eq, cmpVal)},
			Success: []*pb.RequestOp{putOp("inner", "then"), rangeOp(&pb.RangeRequest{Key: []byte("outer")})},
			Failure: []*pb.RequestOp{putOp("inner", "else")},
		}
	}
	r := &pb.TxnRequest{
		Compare: []*pb.Compare{cmpValue("k", eq, "v")},
		Success: []*pb.RequestOp{
			putOp("outer", "1"),
			// Compares of nested txns are evaluated before the outer txn writes
			// anything: this one sees k=v, not the k=changed written just before it.
			putOp("k", "changed"),
			txnOp(inner("v")),
			txnOp(&pb.TxnRequest{
				Compare: []*pb.Compare{cmpValue("k", eq, "changed")}, // false: evaluated on k=v
				Success: []*pb.RequestOp{putOp("deep", "wrong")},
				Failure: []*pb.RequestOp{txnOp(inner("nope")), putOp("deep", "right")},
			}),
		},
		Failure: []*pb.RequestOp{putOp("never", "1")},
	}
	resp := e.mustTxn(r)
	put3 := &pb.ResponseOp{Response: &pb.ResponseOp_ResponsePut{ResponsePut: &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}}}}
	want := &pb.TxnResponse{
		Header:    &pb.ResponseHeader{Revision: 3},
		Succeeded: true,
		Responses: []*pb.ResponseOp{
			put3, put3,
			{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: &pb.TxnResponse{
				// A nested txn's header is present but empty, as in etcd.
				Header:    &pb.ResponseHeader{},
				Succeeded: true,
				Responses: []*pb.ResponseOp{
					put3,
					{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{
						Header: &pb.ResponseHeader{Revision: 3}, Count: 1, Kvs: []*mvccpb.KeyValue{kv("outer", "1", 3, 3, 1)},
					}}},
				},
			}}},
			{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: &pb.TxnResponse{
				Header:    &pb.ResponseHeader{},
				Succeeded: false,
				Responses: []*pb.ResponseOp{
					{Response: &pb.ResponseOp_ResponseTxn{ResponseTxn: &pb.TxnResponse{
						Header: &pb.ResponseHeader{}, Succeeded: false, Responses: []*pb.ResponseOp{put3},
					}}},
					put3,
				},
			}}},
		},
	}
	if !proto.Equal(resp, want) {
		t.Fatalf("nested txn:%s", protoDiff(resp, want))
	}
	nested := resp.GetResponses()[2].GetResponseTxn()
	if nested.GetHeader() == nil {
		t.Errorf("nested txn response has no header; etcd sends an empty one")
	}
	// The second inner txn ran its failure branch: inner=else written after inner=then
	// in the same revision, version 2.
	for key, want := range map[string]*mvccpb.KeyValue{
		"outer": kv("outer", "1", 3, 3, 1),
		"k":     kv("k", "changed", 2, 3, 2),
		"inner": kv("inner", "else", 3, 3, 2),
		"deep":  kv("deep", "right", 3, 3, 1),
		"never": nil,
	} {
		if got := e.get(key, 0); !proto.Equal(got, want) {
			t.Errorf("%s after the nested txn:%s", key, protoDiff(got, want))
		}
	}
	// The same through the model.
	m := newModel(leaseSet{})
	m.apply(&pb.PutRequest{Key: []byte("k"), Value: []byte("v")})
	if mresp, err := m.apply(r); err != nil || !proto.Equal(mresp, resp) {
		t.Errorf("model disagrees (err %v):%s", err, protoDiff(resp, mresp))
	}
}

// A failing check anywhere in the chosen branches fails the whole txn before anything
// is written.
func TestTxnFailingCheckWritesNothing(t *testing.T) {
	e := newEnv(t)
	e.mustPut("k", "v")  // rev 2
	e.mustPut("k2", "v") // rev 3
	e.mustCompact(3)
	e.waitCompacted(3)
	before := [3]int{e.countPrefix('c'), e.countPrefix('i'), e.countPrefix('r')}
	tests := []struct {
		name string
		r    *pb.TxnRequest
		want error
	}{
		{"ignore_value on a missing key after writes", &pb.TxnRequest{Success: []*pb.RequestOp{
			putOp("a", "1"), delOp("k", ""), putReqOp(&pb.PutRequest{Key: []byte("missing"), IgnoreValue: true}),
		}}, etcderr.ErrKeyNotFound},
		{"ignore_lease on a missing key in the failure branch", &pb.TxnRequest{
			Compare: []*pb.Compare{cmpValue("k", eq, "other")},
			Failure: []*pb.RequestOp{putOp("a", "1"), putReqOp(&pb.PutRequest{Key: []byte("missing"), IgnoreLease: true})},
		}, etcderr.ErrKeyNotFound},
		{"ignore_value on a key the same txn creates (checked before the writes)", &pb.TxnRequest{Success: []*pb.RequestOp{
			putOp("new", "1"), putReqOp(&pb.PutRequest{Key: []byte("new"), IgnoreValue: true}),
		}}, etcderr.ErrKeyNotFound},
		{"unknown lease in a nested txn", &pb.TxnRequest{Success: []*pb.RequestOp{
			putOp("a", "1"),
			txnOp(&pb.TxnRequest{Success: []*pb.RequestOp{putReqOp(&pb.PutRequest{Key: []byte("b"), Lease: 3})}}),
		}}, etcderr.ErrLeaseNotFound},
		{"range at a compacted revision", &pb.TxnRequest{Success: []*pb.RequestOp{
			putOp("a", "1"), rangeOp(&pb.RangeRequest{Key: []byte("k"), Revision: 2}),
		}}, etcderr.ErrCompacted},
		{"range at a future revision (rev+1 is future even after the txn's writes)", &pb.TxnRequest{Success: []*pb.RequestOp{
			putOp("a", "1"), rangeOp(&pb.RangeRequest{Key: []byte("a"), Revision: 4}),
		}}, etcderr.ErrFutureRev},
		{"range at a future revision in a nested txn", &pb.TxnRequest{Success: []*pb.RequestOp{
			delOp("k", ""), txnOp(&pb.TxnRequest{Failure: []*pb.RequestOp{}, Success: []*pb.RequestOp{
				rangeOp(&pb.RangeRequest{Key: []byte("a"), Revision: 9}),
			}}),
		}}, etcderr.ErrFutureRev},
	}
	for _, tc := range tests {
		_, err := e.txn(tc.r)
		if !isErr(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
		if e.s.Rev() != 3 {
			t.Fatalf("%s: revision moved to %d", tc.name, e.s.Rev())
		}
	}
	after := [3]int{e.countPrefix('c'), e.countPrefix('i'), e.countPrefix('r')}
	if before != after {
		t.Errorf("failed txns wrote: c/i/r key counts %v before, %v after", before, after)
	}
	if got := e.get("k", 0); string(got.GetValue()) != "v" {
		t.Errorf("k after failed txns: %v", got)
	}
	for _, k := range []string{"a", "new", "b", "missing"} {
		if got := e.get(k, 0); got != nil {
			t.Errorf("%s exists after failed txns: %v", k, got)
		}
	}
	// The failing check is on the branch not taken: the txn succeeds.
	resp, err := e.txn(&pb.TxnRequest{
		Compare: []*pb.Compare{cmpValue("k", eq, "v")},
		Success: []*pb.RequestOp{putOp("a", "1")},
		Failure: []*pb.RequestOp{putReqOp(&pb.PutRequest{Key: []byte("missing"), IgnoreValue: true})},
	})
	if err != nil || !resp.GetSucceeded() || resp.GetHeader().GetRevision() != 4 {
		t.Errorf("txn whose bad op is on the other branch: %v, %v", resp, err)
	}
}

// ReadTxn serves read-only txns from the committed state.
func TestReadTxn(t *testing.T) {
	e, m := compareFixture(t)
	e.mustDelete("b", "")
	m.apply(&pb.DeleteRangeRequest{Key: []byte("b")})
	e.mustCompact(3)
	m.apply(&pb.CompactionRequest{Revision: 3})
	for i, r := range []*pb.TxnRequest{
		{Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte{0}})}},
		{
			Compare: []*pb.Compare{cmpVersion("b", eq, 0)},
			Success: []*pb.RequestOp{
				rangeOp(&pb.RangeRequest{Key: []byte("b"), Revision: 4}),
				rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("b"), CountOnly: true}),
				txnOp(&pb.TxnRequest{
					Compare: []*pb.Compare{cmpLease("a", eq, 5)},
					Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a"), RangeEnd: []byte("c"), Revision: 3, SortOrder: pb.RangeRequest_DESCEND})},
				}),
			},
		},
		{Failure: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a")})}},
	} {
		got, err := e.readTxn(r)
		want, wantErr := m.readTxn(r)
		if err != nil || wantErr != nil || !proto.Equal(got, want) {
			t.Errorf("read txn %d: err %v (model %v)%s", i, err, wantErr, protoDiff(got, want))
		}
	}
	for _, tc := range []struct {
		rev  int64
		want error
	}{{2, etcderr.ErrCompacted}, {7, etcderr.ErrFutureRev}} {
		_, err := e.readTxn(&pb.TxnRequest{Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a"), Revision: tc.rev})}})
		if !isErr(err, tc.want) {
			t.Errorf("read txn at %d: err = %v, want %v", tc.rev, err, tc.want)
		}
	}
}

func TestIsTxnReadOnlyAndSerializable(t *testing.T) {
	ser := rangeOp(&pb.RangeRequest{Key: []byte("a"), Serializable: true})
	lin := rangeOp(&pb.RangeRequest{Key: []byte("a")})
	tests := []struct {
		r                *pb.TxnRequest
		readOnly, serial bool
	}{
		{&pb.TxnRequest{}, true, true},
		{&pb.TxnRequest{Success: []*pb.RequestOp{ser}, Failure: []*pb.RequestOp{ser}}, true, true},
		{&pb.TxnRequest{Success: []*pb.RequestOp{ser}, Failure: []*pb.RequestOp{lin}}, true, false},
		{&pb.TxnRequest{Success: []*pb.RequestOp{ser, putOp("a", "1")}}, false, false},
		{&pb.TxnRequest{Failure: []*pb.RequestOp{delOp("a", "")}}, false, false},
		{&pb.TxnRequest{Success: []*pb.RequestOp{txnOp(&pb.TxnRequest{})}}, false, false},
	}
	for i, tc := range tests {
		if got := IsTxnReadOnly(tc.r); got != tc.readOnly {
			t.Errorf("%d: IsTxnReadOnly = %v, want %v", i, got, tc.readOnly)
		}
		if got := IsTxnSerializable(tc.r); got != tc.serial {
			t.Errorf("%d: IsTxnSerializable = %v, want %v", i, got, tc.serial)
		}
	}
}

// Writing a key twice in one txn (which etcd's API layer rejects as a duplicate key,
// but the store accepts): the second write wins and both share one revision.
func TestTxnSameKeyTwice(t *testing.T) {
	e := newEnv(t)
	e.mustPut("k", "0") // rev 2
	resp := e.mustTxn(&pb.TxnRequest{Success: []*pb.RequestOp{putOp("k", "1"), putOp("k", "2"), putOp("d", "x"), delOp("d", "")}})
	if resp.GetHeader().GetRevision() != 3 {
		t.Fatalf("header revision %d, want 3", resp.GetHeader().GetRevision())
	}
	if got, want := e.get("k", 0), kv("k", "2", 2, 3, 3); !proto.Equal(got, want) {
		t.Errorf("k:%s", protoDiff(got, want))
	}
	if got, want := e.get("k", 3), kv("k", "2", 2, 3, 3); !proto.Equal(got, want) {
		t.Errorf("k at 3:%s", protoDiff(got, want))
	}
	if got := e.get("d", 3); got != nil {
		t.Errorf("d, put then deleted in the txn, reads %v at 3", got)
	}
	if got := e.get("d", 0); got != nil {
		t.Errorf("d, put then deleted in the txn, reads %v", got)
	}
}

func ExampleIsTxnReadOnly() {
	fmt.Println(IsTxnReadOnly(&pb.TxnRequest{Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a")})}}))
	// Output: true
}
