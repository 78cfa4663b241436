package mvcc

import (
	"context"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

func TestEmptyStoreIsAtRevisionOne(t *testing.T) {
	e := newEnv(t)
	if got := e.s.Rev(); got != 1 {
		t.Errorf("Rev() of an empty store = %d, want 1 (etcd starts at revision 1)", got)
	}
	if got := e.s.CompactRev(); got != -1 {
		t.Errorf("CompactRev() of an empty store = %d, want -1", got)
	}
	resp := e.mustRange(&pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}})
	want := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: 1}}
	if !proto.Equal(resp, want) {
		t.Errorf("range over everything of an empty store:%s", protoDiff(resp, want))
	}
	// Reading revision 1 explicitly works; 2 is in the future.
	if _, err := e.rangeReq(&pb.RangeRequest{Key: []byte("a"), Revision: 1}); err != nil {
		t.Errorf("range at revision 1 of an empty store: %v", err)
	}
	if _, err := e.rangeReq(&pb.RangeRequest{Key: []byte("a"), Revision: 2}); !isErr(err, etcderr.ErrFutureRev) {
		t.Errorf("range at revision 2 of an empty store: err = %v, want ErrFutureRev", err)
	}
}

func TestPutDeleteLifecycle(t *testing.T) {
	e := newEnv(t)

	// Each step: a write, the revision it must produce, and what "foo" must then hold.
	type step struct {
		name    string
		do      func() int64 // returns the header revision of the write
		wantRev int64
		want    *mvccpb.KeyValue
	}
	put := func(v string) func() int64 {
		return func() int64 { return e.mustPut("foo", v).GetHeader().GetRevision() }
	}
	del := func() int64 {
		return e.mustDelete("foo", "").GetHeader().GetRevision()
	}
	steps := []step{
		{"first put creates", put("v1"), 2, kv("foo", "v1", 2, 2, 1)},
		{"second put bumps version, keeps create", put("v2"), 3, kv("foo", "v2", 2, 3, 2)},
		{"third put", put("v3"), 4, kv("foo", "v3", 2, 4, 3)},
		{"delete removes", del, 5, nil},
		{"delete of a missing key changes nothing", del, 5, nil},
		{"re-create starts a new generation", put("v4"), 6, kv("foo", "v4", 6, 6, 1)},
		{"put of an empty value", put(""), 7, kv("foo", "", 6, 7, 2)},
	}
	for _, s := range steps {
		got := s.do()
		if got != s.wantRev {
			t.Fatalf("%s: header revision %d, want %d", s.name, got, s.wantRev)
		}
		if e.s.Rev() != s.wantRev {
			t.Fatalf("%s: store revision %d, want %d", s.name, e.s.Rev(), s.wantRev)
		}
		if kv := e.get("foo", 0); !proto.Equal(kv, s.want) {
			t.Fatalf("%s: foo is%s", s.name, protoDiff(kv, s.want))
		}
	}
	// Every past state stays readable.
	history := map[int64]*mvccpb.KeyValue{
		1: nil, 2: kv("foo", "v1", 2, 2, 1), 3: kv("foo", "v2", 2, 3, 2), 4: kv("foo", "v3", 2, 4, 3),
		5: nil, 6: kv("foo", "v4", 6, 6, 1), 7: kv("foo", "", 6, 7, 2),
	}
	for rev, want := range history {
		if got := e.get("foo", rev); !proto.Equal(got, want) {
			t.Errorf("foo at revision %d:%s", rev, protoDiff(got, want))
		}
	}
}

func TestDeleteMissingKeyKeepsRevision(t *testing.T) {
	e := newEnv(t)
	e.mustPut("a", "1")
	for _, tc := range []struct{ key, end string }{
		{"missing", ""},
		{"b", "c"},         // empty range
		{"b", "\x00"},      // everything from b on: nothing there
		{"a", "a"},         // end == key
		{"z", "a"},         // end < key
		{"a\x00", "a\x01"}, // just after a
	} {
		resp := e.mustDelete(tc.key, tc.end)
		if resp.GetDeleted() != 0 || resp.GetHeader().GetRevision() != 2 || e.s.Rev() != 2 {
			t.Errorf("delete [%q, %q): deleted %d, header %d, store rev %d; want 0, 2, 2",
				tc.key, tc.end, resp.GetDeleted(), resp.GetHeader().GetRevision(), e.s.Rev())
		}
	}
	if kv := e.get("a", 0); kv == nil {
		t.Errorf("a vanished after deletes that should not touch it")
	}
}

func TestDeleteRangeDeletesAllInOneRevision(t *testing.T) {
	e := newEnv(t)
	for _, k := range []string{"a", "a\x00", "a\x00b", "ab", "b"} {
		e.mustPut(k, "v-"+k)
	}
	resp, err := e.apply(&pb.DeleteRangeRequest{Key: []byte("a"), RangeEnd: []byte("b"), PrevKv: true})
	if err != nil {
		t.Fatal(err)
	}
	want := &pb.DeleteRangeResponse{
		Header:  &pb.ResponseHeader{Revision: 7},
		Deleted: 4,
		PrevKvs: []*mvccpb.KeyValue{
			kv("a", "v-a", 2, 2, 1), kv("a\x00", "v-a\x00", 3, 3, 1), kv("a\x00b", "v-a\x00b", 4, 4, 1), kv("ab", "v-ab", 5, 5, 1),
		},
	}
	if !proto.Equal(resp, want) {
		t.Fatalf("delete [a, b) with prev_kv:%s", protoDiff(resp, want))
	}
	all := e.mustRange(&pb.RangeRequest{Key: []byte{0}, RangeEnd: []byte{0}})
	if got := keysOf(all.GetKvs()); len(got) != 1 || got[0] != "b" {
		t.Errorf("keys after delete = %q, want [b]", got)
	}
	// Delete with range_end "\x00" deletes everything from the key on.
	resp2 := e.mustDelete("", "\x00")
	if resp2.GetDeleted() != 1 || resp2.GetHeader().GetRevision() != 8 {
		t.Errorf("delete everything: %v, want 1 deleted at revision 8", resp2)
	}
	// Without prev_kv, no prev kvs are returned.
	e.mustPut("x", "1")
	if resp3 := e.mustDelete("x", ""); len(resp3.GetPrevKvs()) != 0 || resp3.GetDeleted() != 1 {
		t.Errorf("delete without prev_kv: %v", resp3)
	}
}

func TestPutPrevKV(t *testing.T) {
	e := newEnv(t)
	resp, err := e.put(&pb.PutRequest{Key: []byte("k"), Value: []byte("v1"), PrevKv: true})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetPrevKv() != nil {
		t.Errorf("prev_kv of a put creating the key = %v, want none", resp.GetPrevKv())
	}
	resp, err = e.put(&pb.PutRequest{Key: []byte("k"), Value: []byte("v2"), PrevKv: true})
	if err != nil {
		t.Fatal(err)
	}
	want := &pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}, PrevKv: kv("k", "v1", 2, 2, 1)}
	if !proto.Equal(resp, want) {
		t.Errorf("put with prev_kv:%s", protoDiff(resp, want))
	}
	// Without prev_kv the previous value is not returned.
	if resp := e.mustPut("k", "v3"); resp.GetPrevKv() != nil {
		t.Errorf("put without prev_kv returned %v", resp.GetPrevKv())
	}
}

func TestPutIgnoreValueAndLease(t *testing.T) {
	leases := leaseSet{7: true, 8: true}
	e := newEnvWithLeases(t, leases)
	if _, err := e.put(&pb.PutRequest{Key: []byte("k"), Value: []byte("orig"), Lease: 7}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		req  *pb.PutRequest
		want *mvccpb.KeyValue // k afterwards
	}{
		{
			name: "ignore_value keeps the value, takes the new lease",
			req:  &pb.PutRequest{Key: []byte("k"), IgnoreValue: true, Lease: 8},
			want: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("orig"), Lease: 8, CreateRevision: 2, ModRevision: 3, Version: 2},
		},
		{
			name: "ignore_lease keeps the lease, takes the new value",
			req:  &pb.PutRequest{Key: []byte("k"), Value: []byte("new"), IgnoreLease: true},
			want: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("new"), Lease: 8, CreateRevision: 2, ModRevision: 4, Version: 3},
		},
		{
			name: "both keep both",
			req:  &pb.PutRequest{Key: []byte("k"), IgnoreValue: true, IgnoreLease: true},
			want: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("new"), Lease: 8, CreateRevision: 2, ModRevision: 5, Version: 4},
		},
		{
			name: "a plain put drops the lease",
			req:  &pb.PutRequest{Key: []byte("k"), Value: []byte("plain")},
			want: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("plain"), CreateRevision: 2, ModRevision: 6, Version: 5},
		},
	}
	for _, tc := range tests {
		if _, err := e.put(tc.req); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := e.get("k", 0); !proto.Equal(got, tc.want) {
			t.Fatalf("%s: k is%s", tc.name, protoDiff(got, tc.want))
		}
	}
}

func TestPutFailuresWriteNothing(t *testing.T) {
	e := newEnvWithLeases(t, leaseSet{1: true})
	e.mustPut("exists", "v")
	e.mustPut("gone", "v")
	e.mustDelete("gone", "")
	rev := e.s.Rev()
	before := [3]int{e.countPrefix('c'), e.countPrefix('i'), e.countPrefix('r')}

	tests := []struct {
		name string
		req  *pb.PutRequest
		want error
	}{
		{"ignore_value on a missing key", &pb.PutRequest{Key: []byte("missing"), IgnoreValue: true}, etcderr.ErrKeyNotFound},
		{"ignore_lease on a missing key", &pb.PutRequest{Key: []byte("missing"), Value: []byte("x"), IgnoreLease: true}, etcderr.ErrKeyNotFound},
		{"ignore_value on a deleted key", &pb.PutRequest{Key: []byte("gone"), IgnoreValue: true}, etcderr.ErrKeyNotFound},
		{"unknown lease", &pb.PutRequest{Key: []byte("exists"), Value: []byte("x"), Lease: 99}, etcderr.ErrLeaseNotFound},
		{"unknown lease on a new key", &pb.PutRequest{Key: []byte("new"), Value: []byte("x"), Lease: 2}, etcderr.ErrLeaseNotFound},
	}
	for _, tc := range tests {
		if _, err := e.put(tc.req); !isErr(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
		if e.s.Rev() != rev {
			t.Errorf("%s: revision moved from %d to %d", tc.name, rev, e.s.Rev())
		}
	}
	after := [3]int{e.countPrefix('c'), e.countPrefix('i'), e.countPrefix('r')}
	if before != after {
		t.Errorf("failed puts wrote to Pebble: c/i/r key counts %v before, %v after", before, after)
	}
	for _, k := range []string{"missing", "new", "gone"} {
		if kv := e.get(k, 0); kv != nil {
			t.Errorf("%q exists after failed puts: %v", k, kv)
		}
	}
	if got := e.get("exists", 0); got.GetVersion() != 1 || got.GetLease() != 0 {
		t.Errorf("exists changed by a failed put: %v", got)
	}
}

func TestPutWithUnknownLease(t *testing.T) {
	e := newEnv(t)
	_, err := e.put(&pb.PutRequest{Key: []byte("k"), Value: []byte("v"), Lease: 1})
	if !isErr(err, etcderr.ErrLeaseNotFound) {
		t.Fatalf("put with a lease never granted: err = %v, want ErrLeaseNotFound", err)
	}
	if e.s.Rev() != 1 || e.get("k", 0) != nil {
		t.Errorf("failed put changed the store: rev %d, k = %v", e.s.Rev(), e.get("k", 0))
	}
}

// Several requests in one batch: each gets its own revision and sees the earlier ones,
// and failing requests in between change nothing.
func TestBatchOfRequests(t *testing.T) {
	e := newEnv(t)
	res := e.applyBatch(
		// rev 2
		&pb.PutRequest{Key: []byte("a"), Value: []byte("1")},
		// rev 3, sees rev 2
		&pb.PutRequest{Key: []byte("a"), Value: []byte("2"), PrevKv: true},
		// fails: b missing
		&pb.PutRequest{Key: []byte("b"), IgnoreValue: true},
		// deletes nothing: the revision stays 3
		&pb.DeleteRangeRequest{Key: []byte("zzz")},
		// fails: no such lease
		&pb.PutRequest{Key: []byte("b"), Value: []byte("x"), Lease: 5},
		// rev 4
		&pb.DeleteRangeRequest{Key: []byte("a"), PrevKv: true},
		// rev 5: a new generation of a
		&pb.PutRequest{Key: []byte("a"), Value: []byte("3")},
		// a read-only txn: still rev 5
		&pb.TxnRequest{Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a")})}},
		// compaction at 4, header 5
		&pb.CompactionRequest{Revision: 4},
		// a read below the compaction, later in the same batch
		&pb.TxnRequest{Success: []*pb.RequestOp{rangeOp(&pb.RangeRequest{Key: []byte("a"), Revision: 3})}},
	)
	want := []result{
		{&pb.PutResponse{Header: &pb.ResponseHeader{Revision: 2}}, nil},
		{&pb.PutResponse{Header: &pb.ResponseHeader{Revision: 3}, PrevKv: kv("a", "1", 2, 2, 1)}, nil},
		{nil, etcderr.ErrKeyNotFound},
		{&pb.DeleteRangeResponse{Header: &pb.ResponseHeader{Revision: 3}}, nil},
		{nil, etcderr.ErrLeaseNotFound},
		{&pb.DeleteRangeResponse{Header: &pb.ResponseHeader{Revision: 4}, Deleted: 1, PrevKvs: []*mvccpb.KeyValue{kv("a", "2", 2, 3, 2)}}, nil},
		{&pb.PutResponse{Header: &pb.ResponseHeader{Revision: 5}}, nil},
		{&pb.TxnResponse{Header: &pb.ResponseHeader{Revision: 5}, Succeeded: true, Responses: []*pb.ResponseOp{
			{Response: &pb.ResponseOp_ResponseRange{ResponseRange: &pb.RangeResponse{
				Header: &pb.ResponseHeader{Revision: 5}, Count: 1, Kvs: []*mvccpb.KeyValue{kv("a", "3", 5, 5, 1)}}}},
		}}, nil},
		{&pb.CompactionResponse{Header: &pb.ResponseHeader{Revision: 5}}, nil},
		{nil, etcderr.ErrCompacted},
	}
	for i := range want {
		got := res[i]
		if !isErr(got.err, want[i].err) || (want[i].err == nil && got.err != nil) {
			t.Errorf("request %d: err = %v, want %v", i, got.err, want[i].err)
			continue
		}
		if want[i].err == nil && !proto.Equal(got.resp, want[i].resp) {
			t.Errorf("request %d:%s", i, protoDiff(got.resp, want[i].resp))
		}
	}
	if e.s.Rev() != 5 || e.s.CompactRev() != 4 {
		t.Errorf("after the batch: rev %d, compact rev %d; want 5, 4", e.s.Rev(), e.s.CompactRev())
	}
	// The same history is visible after the commit.
	for rev, want := range map[int64]*mvccpb.KeyValue{4: nil, 5: kv("a", "3", 5, 5, 1)} {
		if got := e.get("a", rev); !proto.Equal(got, want) {
			t.Errorf("a at %d:%s", rev, protoDiff(got, want))
		}
	}
}

// A Writer's batch that is never committed leaves no trace: the store publishes only
// what Committed reports.
func TestUncommittedWriterChangesNothing(t *testing.T) {
	e := newEnv(t)
	e.mustPut("a", "1")
	b := e.db.NewIndexedBatch()
	w := e.s.NewWriter(b)
	if _, err := w.Put(context.Background(), &pb.PutRequest{Key: []byte("a"), Value: []byte("2")}); err != nil {
		t.Fatal(err)
	}
	if w.Rev() != 3 {
		t.Errorf("Writer.Rev() after one put = %d, want 3", w.Rev())
	}
	if e.s.Rev() != 2 {
		t.Errorf("store revision moved to %d before the batch was committed", e.s.Rev())
	}
	if got := e.get("a", 0); string(got.GetValue()) != "1" {
		t.Errorf("a read %q from an uncommitted batch", got.GetValue())
	}
	b.Close()
	if resp := e.mustPut("a", "3"); resp.GetHeader().GetRevision() != 3 {
		t.Errorf("next put after a discarded batch got revision %d, want 3", resp.GetHeader().GetRevision())
	}
}

func rangeOp(r *pb.RangeRequest) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: r}}
}

func putOp(key, value string) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(key), Value: []byte(value)}}}
}

func putReqOp(r *pb.PutRequest) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: r}}
}

func delOp(key, end string) *pb.RequestOp {
	r := &pb.DeleteRangeRequest{Key: []byte(key)}
	if end != "" {
		r.RangeEnd = []byte(end)
	}
	return &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: r}}
}

func txnOp(r *pb.TxnRequest) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: r}}
}
