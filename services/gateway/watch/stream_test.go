package watch

import (
	"bytes"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
)

// A watcher created when the store was compacted at C sees C's puts but not its
// deletions (compaction removed those tombstones), and no prev_kv whose revision is
// below C; later revisions are whole.
func TestWatcherTakeAtCompactedRevision(t *testing.T) {
	prev := &mvccpb.KeyValue{Key: []byte("a"), ModRevision: 3, CreateRevision: 3, Version: 1}
	at := func(rev int64) *hrev {
		return newHrev(&replicav1.Revision{Revision: rev, Events: []*mvccpb.Event{
			{Type: mvccpb.Event_DELETE, Kv: &mvccpb.KeyValue{Key: []byte("a"), ModRevision: rev}, PrevKv: prev},
			{Type: mvccpb.Event_PUT, Kv: &mvccpb.KeyValue{Key: []byte("b"), ModRevision: rev, CreateRevision: rev, Version: 1}, PrevKv: prev},
		}})
	}
	w := &watcher{key: []byte{0}, end: []byte{}, prevKV: true, next: 5, compactRev: 5}

	got := w.take(at(5))
	if len(got) != 1 || got[0].Type != mvccpb.Event_PUT || string(got[0].Kv.Key) != "b" {
		t.Fatalf("at the compacted revision: got %v, want only the put of b", got)
	}
	if got[0].PrevKv != nil {
		t.Fatalf("prev_kv below the compacted revision was sent: %v", got[0].PrevKv)
	}
	got = w.take(at(7))
	if len(got) != 2 || got[0].Type != mvccpb.Event_DELETE || got[0].PrevKv == nil {
		t.Fatalf("after the compacted revision: got %v, want both events with prev_kv", got)
	}
	if got := w.take(at(6)); got != nil {
		t.Fatalf("a revision the watcher is past was delivered again: %v", got)
	}
}

// The indexes follow watchers of one key on two streams through adds and removals
// from the head, the middle and the tail of a stream's list.
func TestWatchIndexes(t *testing.T) {
	h := &Hub{keys: make(map[string][]streamRef)}
	h.m.watchers = prometheus.NewGauge(prometheus.GaugeOpts{Name: "test_watchers"})
	newStream := func() *wstream {
		return &wstream{h: h, watchers: make(map[int64]*watcher), keyW: make(map[string]*watcher)}
	}
	s1, s2 := newStream(), newStream()
	var ws []*watcher
	for i, s := range []*wstream{s1, s1, s1, s2} {
		w := &watcher{s: s, id: int64(i), key: []byte("k")}
		h.register(w)
		s.add(w)
		ws = append(ws, w)
	}
	listed := func(s *wstream) (ids []int64) {
		for w := s.keyW["k"]; w != nil; w = w.sameKey {
			ids = append(ids, w.id)
		}
		slices.Sort(ids)
		return ids
	}
	counts := func() map[*wstream]int {
		m := map[*wstream]int{}
		for _, r := range h.keys["k"] {
			m[r.s] = r.n
		}
		return m
	}
	if got := listed(s1); !slices.Equal(got, []int64{0, 1, 2}) {
		t.Fatalf("stream 1 lists %v", got)
	}
	if c := counts(); c[s1] != 3 || c[s2] != 1 {
		t.Fatalf("hub counts %v", c)
	}
	for _, i := range []int{1, 2, 0} { // middle, then head, then the last one
		ws[i].s.remove(ws[i])
	}
	if got := listed(s1); got != nil {
		t.Fatalf("stream 1 still lists %v", got)
	}
	if _, ok := s1.keyW["k"]; ok {
		t.Fatal("stream 1 keeps an empty entry")
	}
	if c := counts(); len(c) != 1 || c[s2] != 1 {
		t.Fatalf("hub counts %v after stream 1's watchers left", c)
	}
	s2.remove(ws[3])
	if _, ok := h.keys["k"]; ok {
		t.Fatal("the hub keeps an empty entry")
	}
}

// A response written from the stream's wire cache has exactly the bytes protobuf
// gives the same WatchResponse, and the codec sends them unchanged.
func TestWireEncoding(t *testing.T) {
	evs := []*mvccpb.Event{
		{Type: mvccpb.Event_PUT, Kv: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("v"), CreateRevision: 4, ModRevision: 9, Version: 3, Lease: 77},
			PrevKv: &mvccpb.KeyValue{Key: []byte("k"), Value: []byte("u"), CreateRevision: 4, ModRevision: 8, Version: 2}},
		{Type: mvccpb.Event_DELETE, Kv: &mvccpb.KeyValue{Key: []byte("j"), ModRevision: 9}},
	}
	var c wireCache
	for _, tc := range []struct {
		id  int64
		hdr *pb.ResponseHeader
		evs []*mvccpb.Event
	}{
		{0, &pb.ResponseHeader{ClusterId: 1, MemberId: 2, Revision: 9}, evs},
		{7, &pb.ResponseHeader{ClusterId: 1, MemberId: 2, Revision: 9}, evs[:1]},
		{1 << 40, &pb.ResponseHeader{ClusterId: 1, MemberId: 3, Revision: 10}, evs[1:]},
		{5, &pb.ResponseHeader{}, evs},
	} {
		want, err := proto.Marshal(&pb.WatchResponse{Header: tc.hdr, WatchId: tc.id, Events: tc.evs})
		if err != nil {
			t.Fatal(err)
		}
		got := c.encode(c.header(tc.hdr.ClusterId, tc.hdr.MemberId, tc.hdr.Revision), tc.id, nil, tc.evs)
		if !bytes.Equal(got, want) {
			t.Fatalf("watch %d: wire form\n%x\nwant\n%x", tc.id, got, want)
		}
		sent, err := Codec().Marshal(got)
		if err != nil || !bytes.Equal(sent.Materialize(), want) {
			t.Fatalf("the codec changed the bytes: %v", err)
		}
	}
	// A namespaced watcher's events: the same bytes as the response with its keys out
	// of the namespace, and the cache, switching namespaces, never mixes them up.
	ns := []*mvccpb.Event{
		{Type: mvccpb.Event_PUT, Kv: &mvccpb.KeyValue{Key: []byte("/t/k"), Value: []byte("v"), ModRevision: 9}, PrevKv: &mvccpb.KeyValue{Key: []byte("/t/k"), ModRevision: 8}},
	}
	for _, p := range []string{"/t/", "", "/t/"} {
		want, err := proto.Marshal(&pb.WatchResponse{Header: &pb.ResponseHeader{Revision: 9}, WatchId: 1, Events: namespace.EventsOut([]byte(p), ns)})
		if err != nil {
			t.Fatal(err)
		}
		if got := c.encode(c.header(0, 0, 9), 1, []byte(p), ns); !bytes.Equal(got, want) {
			t.Fatalf("namespace %q: wire form\n%x\nwant\n%x", p, got, want)
		}
	}
	if string(ns[0].Kv.Key) != "/t/k" {
		t.Fatal("encoding modified the shared event")
	}
}
