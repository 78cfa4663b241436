package bench

import (
	"bytes"
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
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

// memWatch is a trivial Watch service over memKV, for tests only: exact-key watches,
// each put sent to every watch of its key.
type memWatch struct {
	etcdserverpbconnect.UnimplementedWatchHandler
	mu      sync.Mutex
	watches map[string][]memWatcher
}

type memWatcher struct {
	id   int64
	send func(*etcdserverpb.WatchResponse) error
}

func (m *memWatch) Watch(ctx context.Context, s *connect.BidiStream[etcdserverpb.WatchRequest, etcdserverpb.WatchResponse]) error {
	var smu sync.Mutex
	send := func(r *etcdserverpb.WatchResponse) error {
		smu.Lock()
		defer smu.Unlock()
		return s.Send(r)
	}
	for id := int64(0); ; id++ {
		req, err := s.Receive()
		if err != nil {
			return nil
		}
		key := string(req.GetCreateRequest().GetKey())
		m.mu.Lock()
		m.watches[key] = append(m.watches[key], memWatcher{id: id, send: send})
		m.mu.Unlock()
		if err := send(&etcdserverpb.WatchResponse{WatchId: id, Created: true}); err != nil {
			return err
		}
	}
}

func (m *memWatch) put(key []byte, rev int64) {
	m.mu.Lock()
	ws := m.watches[string(key)]
	m.mu.Unlock()
	for _, w := range ws {
		w.send(&etcdserverpb.WatchResponse{WatchId: w.id, Header: &etcdserverpb.ResponseHeader{Revision: rev},
			Events: []*mvccpb.Event{{Kv: &mvccpb.KeyValue{Key: key, ModRevision: rev}}}})
	}
}

func TestWatchBenchmark(t *testing.T) {
	for _, hot := range []bool{false, true} {
		mw := &memWatch{watches: map[string][]memWatcher{}}
		addr, _ := startServer(t, &memKV{watch: mw, onPut: mw.put})
		cfg := testConfig(addr)
		opts := WatchOptions{Watchers: 200, Streams: 4, Hot: hot, Prefix: "/w/", ValSize: 8, Writers: 4,
			Rates: []float64{200, 400}, Step: 500 * time.Millisecond, Drain: 5 * time.Second, Settle: 10 * time.Millisecond,
			ServerPIDs: []int{os.Getpid()}}
		rep, err := Watch(context.Background(), cfg, opts)
		if err != nil {
			t.Fatal(err)
		}
		perPut := int64(1)
		if hot {
			perPut = 200
		}
		if len(rep.Steps) != 2 || rep.Canceled != 0 || len(rep.Memory) != 1 || rep.Memory[0].RSSBefore <= 0 {
			t.Fatalf("hot=%v: report %+v", hot, rep)
		}
		for i, st := range rep.Steps {
			want := int64(opts.Rates[i] * opts.Step.Seconds())
			if st.Puts != want || st.PutErrors != 0 || st.Expected != want*perPut || st.Delivered != st.Expected || st.Missing != 0 {
				t.Fatalf("hot=%v step %d: %+v (want %d puts)", hot, i, st, want)
			}
			if st.P50 == nil || st.P99 == nil || st.Max == nil || *st.P99 > 1 || *st.P50 > *st.P99 || *st.P99 > *st.Max*1.07 {
				t.Fatalf("hot=%v step %d: latencies p50 %v p99 %v max %v", hot, i, st.P50, st.P99, st.Max)
			}
			if st.EventsPerSec <= 0 {
				t.Fatalf("hot=%v step %d: %v events/s", hot, i, st.EventsPerSec)
			}
		}
		var buf bytes.Buffer
		if err := rep.WriteText(&buf); err != nil || !strings.Contains(buf.String(), "memory per idle watch") {
			t.Fatalf("text report: %v\n%s", err, buf.String())
		}
	}
}
