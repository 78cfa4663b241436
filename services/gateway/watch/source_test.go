package watch

import (
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// The hub over ReplicaFeed (the all-in-one's): the history's feed stands for the
// replica's, with no NATS anywhere.

// A hub that follows the feed delivers live revisions in order, each whole, and a
// watch older than its memory catches up from the replica's history, then goes live
// with no gap and no duplicate.
func TestReplicaFeedDeliversAndCatchesUp(t *testing.T) {
	f := newFeedFixture(t, testConfig(), nil)
	live := f.watchKey(0)
	f.publishPuts(40)
	if got := flat(live.revisions(42)); !slices.Equal(got, span(3, 42)) {
		t.Fatalf("live revisions %v, want 3..42", got)
	}
	feeds := f.feedReads()
	past := f.watchKey(3) // the ring keeps 16
	f.publishPuts(3)
	if got := flat(past.revisions(45)); !slices.Equal(got, span(3, 45)) {
		t.Fatalf("catch-up then live: %v", got)
	}
	if f.feedReads() == feeds {
		t.Fatal("history older than the hub's memory was not read from the replica")
	}
}

// announcer permits every watch and records the auth revisions it is told.
type announcer struct {
	permitAll
	rev atomic.Uint64
}

func (a *announcer) Announce(rev uint64) { a.rev.Store(rev) }

// The compacted and auth revisions come with the feed's answers: the hub cancels a
// watch below the compaction and tells the authorizer the auth store's revision,
// without a call of its own.
func TestReplicaFeedCarriesTheState(t *testing.T) {
	auth := &announcer{}
	f := newFeedFixture(t, testConfig(), auth)
	f.publishPuts(5)
	f.hist.mu.Lock()
	f.hist.compact, f.hist.auth = 6, 9
	f.hist.mu.Unlock()
	f.hist.changed.Notify()
	deadline := time.Now().Add(10 * time.Second)
	for {
		f.hub.mu.Lock()
		known := f.hub.compactRev
		f.hub.mu.Unlock()
		if known == 6 && auth.rev.Load() == 9 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the hub knows compaction %d and auth revision %d, want 6 and 9", known, auth.rev.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("k"), StartRevision: 5})
	id := c.created()
	if r := c.next(); !r.Canceled || r.WatchId != id || r.CompactRevision != 6 {
		t.Fatalf("a watch below the compaction: %+v", r)
	}
}

// A feed that fails is followed again from just after the hub's revision: the
// watchers see every revision once.
func TestReplicaFeedResumesAfterAFailure(t *testing.T) {
	f := newFeedFixture(t, testConfig(), nil)
	c := f.watchKey(0)
	f.publishPuts(5)
	f.waitHub(7)
	f.hist.mu.Lock()
	f.hist.breakFollow = true
	f.hist.mu.Unlock()
	f.publishPuts(5)
	if got := flat(c.revisions(12)); !slices.Equal(got, span(3, 12)) {
		t.Fatalf("revisions across the failure %v, want 3..12", got)
	}
	f.hist.mu.Lock()
	defer f.hist.mu.Unlock()
	if f.hist.follows < 2 {
		t.Fatalf("the feed was followed %d times, want a second time after the failure", f.hist.follows)
	}
}

// The feed leaves prev_kv out: a watcher that asked for it gets it read from the
// replica once per revision, whatever the number of such watchers; the others never
// cause a read.
func TestReplicaFeedReadsPrevKVOnlyForWatchersThatAsk(t *testing.T) {
	f := newFeedFixture(t, testConfig(), nil)
	plain := f.watchKey(0)
	for i := range 3 {
		f.publish(f.put("k", fmt.Sprint(i))) // revisions 3..5
	}
	if got := flat(plain.revisions(5)); !slices.Equal(got, span(3, 5)) {
		t.Fatalf("revisions %v", got)
	}
	f.hist.mu.Lock()
	if f.hist.befores != 0 {
		t.Fatalf("%d prev_kv reads for watchers that did not ask for prev_kv", f.hist.befores)
	}
	f.hist.mu.Unlock()
	a, b := f.client(nil), f.client(nil)
	for _, c := range []*client{a, b} {
		c.create(&pb.WatchCreateRequest{Key: []byte("k"), PrevKv: true})
		c.created()
	}
	f.publish(f.put("k", "new")) // revision 6
	for _, c := range []*client{a, b} {
		r := c.next()
		if len(r.Events) != 1 || r.Events[0].PrevKv == nil || string(r.Events[0].PrevKv.Value) != "2" || r.Events[0].PrevKv.ModRevision != 5 {
			t.Fatalf("an event for a prev_kv watcher: %+v", r)
		}
	}
	if r := plain.next(); len(r.Events) != 1 || r.Events[0].PrevKv != nil {
		t.Fatalf("an event for a watcher without prev_kv: %+v", r)
	}
	f.hist.mu.Lock()
	defer f.hist.mu.Unlock()
	if f.hist.befores != 1 {
		t.Fatalf("%d prev_kv reads for one revision and two watchers, want 1", f.hist.befores)
	}
}
