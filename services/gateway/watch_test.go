package gateway

import (
	"testing"

	replicav1 "github.com/kvmesh/kvmesh/libs/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/gen/mvccpb"
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
