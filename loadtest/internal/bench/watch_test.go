package bench

import (
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/gen/mvccpb"
)

// Every value lies in its bucket, buckets are ordered, and no bucket is wider than
// 1/16 of its values.
func TestLatBuckets(t *testing.T) {
	prev := -1
	for _, ns := range []int64{0, 1, 15, 16, 17, 31, 32, 33, 1000, 999_999, 1_000_000, 123_456_789, 5e9, 1 << 40} {
		b := latBucket(ns)
		if b < prev {
			t.Fatalf("bucket of %d is %d, below the previous %d", ns, b, prev)
		}
		prev = b
		up := latBucketUpper(b)
		lo := int64(0)
		if b > 0 {
			lo = latBucketUpper(b-1) + 1
		}
		if ns < lo || ns > up {
			t.Fatalf("%d is not in its bucket %d [%d, %d]", ns, b, lo, up)
		}
		if ns >= 16 && float64(up-lo+1) > float64(lo)/16+1 {
			t.Fatalf("bucket %d [%d, %d] is wider than 1/16", b, lo, up)
		}
	}
}

func TestLatQuantiles(t *testing.T) {
	h := &latHist{}
	for i := int64(1); i <= 1000; i++ {
		h.add(i * 1_000_000) // 1..1000 ms
	}
	p50, ok := h.quantile(0.5, 0)
	if !ok || p50 < 500_000_000 || p50 > 532_000_000 {
		t.Fatalf("p50 = %d, %v; want about 500ms", p50, ok)
	}
	if p100, _ := h.quantile(1, 0); p100 != 1000_000_000 {
		t.Fatalf("p100 = %d, want the maximum", p100)
	}
	// 20 missing values of 1020: p99 falls among them.
	if _, ok := h.quantile(0.99, 20); ok {
		t.Fatal("p99 with 2% missing was answered")
	}
	if v, ok := h.quantile(0.9, 20); !ok || v < 918_000_000 || v > 980_000_000 {
		t.Fatalf("p90 with 20 missing = %d, %v", v, ok)
	}
}

// The load generator's reading of a WatchResponse sees what protobuf encoded.
func TestWatchCodec(t *testing.T) {
	resp := &etcdserverpb.WatchResponse{
		Header:  &etcdserverpb.ResponseHeader{Revision: 99, ClusterId: 7},
		WatchId: 3, Created: true, CancelReason: "why",
		Events: []*mvccpb.Event{
			{Type: mvccpb.Event_PUT, Kv: &mvccpb.KeyValue{Key: []byte("a"), Value: []byte("v"), ModRevision: 41, CreateRevision: 40, Version: 2},
				PrevKv: &mvccpb.KeyValue{Key: []byte("a"), ModRevision: 40}},
			{Type: mvccpb.Event_DELETE, Kv: &mvccpb.KeyValue{Key: []byte("b"), ModRevision: 42}},
		},
	}
	b, err := proto.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	var r watchResp
	if err := (watchCodec{}).Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if !r.created || r.canceled || r.reason != "why" || len(r.revs) != 2 || r.revs[0] != 41 || r.revs[1] != 42 {
		t.Fatalf("read %+v", r)
	}
	if err := (watchCodec{}).Unmarshal(b[:len(b)-3], &r); err == nil {
		t.Fatal("a truncated response was read without an error")
	}
}
