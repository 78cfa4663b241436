package watch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"

	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/notify"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// The hub on its own: a real JetStream stream (an embedded NATS server) that the test
// publishes revisions to as the fanout does, a history of every revision standing for
// the replicas' feeds, and client streams served by Hub.Serve.

// history is the replicas' committed history, as their feeds give it.
type history struct {
	mu      sync.Mutex
	revs    map[int64]*replicav1.Revision
	compact int64
	auth    uint64
	feeds   int // Feed calls
	follows int // Follow calls
	befores int // Before calls
	// breakFollow fails the feed being followed at its next answer.
	breakFollow bool
	changed     notify.Notifier // a revision or the state changed (see changeState)
}

// last is the newest revision; the caller holds mu.
func (h *history) last() int64 {
	var last int64 = 1
	for r := range h.revs {
		last = max(last, r)
	}
	return last
}

// Follow answers as a replica's feed does: the revisions from from (0: after the
// newest), then every new revision and state as it comes, each answer with the state.
func (h *history) Follow(ctx context.Context, from int64, fn func(*replicav1.FeedResponse) error) error {
	h.mu.Lock()
	h.follows++
	h.mu.Unlock()
	for {
		h.mu.Lock()
		changed := h.changed.C()
		last := h.last()
		if from == 0 {
			from = last + 1
		}
		if from < h.compact {
			h.mu.Unlock()
			return &CompactedError{Rev: h.compact}
		}
		resp := &replicav1.FeedResponse{Header: &pb.ResponseHeader{Revision: last}, CompactRevision: h.compact, AuthRevision: h.auth}
		for r := from; r <= last; r++ {
			if x := h.revs[r]; x != nil {
				// As a replica's feed asked to omit prev_kv answers.
				bare := &replicav1.Revision{Revision: x.Revision, CompactRevision: x.CompactRevision, PrevKvOmitted: true}
				for _, ev := range x.Events {
					bare.Events = append(bare.Events, &mvccpb.Event{Type: ev.Type, Kv: ev.Kv})
				}
				resp.Revisions = append(resp.Revisions, bare)
			}
		}
		broken := h.breakFollow
		h.breakFollow = false
		h.mu.Unlock()
		if broken {
			return errors.New("the feed broke")
		}
		if err := fn(resp); err != nil {
			return err
		}
		from = last + 1
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (h *history) Feed(ctx context.Context, from, to int64, fn func(*replicav1.Revision) error) error {
	h.mu.Lock()
	h.feeds++
	if from < h.compact {
		h.mu.Unlock()
		return &CompactedError{Rev: h.compact}
	}
	var rs []*replicav1.Revision
	for r := from; r <= to; r++ {
		if x := h.revs[r]; x != nil {
			rs = append(rs, x)
		}
	}
	h.mu.Unlock()
	for _, r := range rs {
		if err := fn(r); err != nil {
			return err
		}
	}
	return nil
}

// Before replays the history up to rev - 1 for each key.
func (h *history) Before(_ context.Context, rev int64, keys [][]byte) ([]*mvccpb.KeyValue, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.befores++
	out := make([]*mvccpb.KeyValue, len(keys))
	for i, k := range keys {
		for r := int64(1); r < rev; r++ {
			for _, ev := range h.revs[r].GetEvents() {
				if string(ev.Kv.Key) == string(k) {
					out[i] = ev.Kv
					if ev.Type == mvccpb.Event_DELETE {
						out[i] = nil
					}
				}
			}
		}
	}
	return out, nil
}

func (h *history) Position(context.Context) (*replicav1.PositionResponse, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return &replicav1.PositionResponse{Header: &pb.ResponseHeader{Revision: h.last()}, CompactRevision: h.compact, AuthRevision: h.auth}, nil
}

// permitAll permits every watch, or refuses those of the key it refuses.
type permitAll struct{ refuse string }

func (p permitAll) WatchPermitted(_ context.Context, cr *pb.WatchCreateRequest) (*pb.WatchCreateRequest, []byte, error) {
	if p.refuse != "" && string(cr.GetKey()) == p.refuse {
		return nil, nil, &Refusal{Reason: "rpc error: code = PermissionDenied desc = etcdserver: permission denied"}
	}
	return cr, nil, nil
}

func (permitAll) Announce(uint64) {}

type cluster struct{}

func (cluster) ClusterID() uint64 { return 7 }
func (cluster) LeaderID() uint64  { return 9 }
func (cluster) Seen() int64       { return 0 }

type fixture struct {
	t      *testing.T
	hub    *Hub
	hist   *history
	js     jetstream.JetStream // nil when the hub follows the history's feed (ReplicaFeed)
	stream revstream.Config
	seq    uint64
	rev    int64
}

func testConfig() Config {
	return Config{RingRevisions: 16, RingBytes: 1 << 20, StreamQueue: 1024, FragmentBytes: 1 << 20}
}

// newFixture starts NATS and a hub (cfg: testConfig with changes) whose store is at
// revision 1.
func newFixture(t *testing.T, cfg Config, auth Authorizer) *fixture {
	t.Helper()
	return newFixtureAfter(t, cfg, auth, 0)
}

// newFixtureAfter is newFixture with n more revisions in the stream before the hub
// starts.
func newFixtureAfter(t *testing.T, cfg Config, auth Authorizer, n int) *fixture {
	t.Helper()
	tel, err := telemetry.New(context.Background(), "test", telemetry.Config{LogLevel: "warn", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, hist: &history{revs: map[int64]*replicav1.Revision{}}, rev: 1}
	srv, err := revstream.StartEmbedded(t.TempDir(), "", nil, false, tel.Log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	nc, err := nats.Connect("", nats.InProcessServer(srv))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream := revstream.Config{Stream: "TEST", Subject: "test.revisions", MaxMsgs: 1000, MaxBytes: 1 << 30, MaxAge: time.Hour}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if _, err := revstream.Ensure(ctx, js, stream); err != nil {
		t.Fatal(err)
	}
	f.js, f.stream = js, stream
	src, err := JetStream(nc, stream)
	if err != nil {
		t.Fatal(err)
	}
	f.start(ctx, cancel, cfg, src, auth, n, tel)
	return f
}

// newFeedFixture is newFixture with a hub that follows the history's feed
// (ReplicaFeed), as the all-in-one's does: no NATS.
func newFeedFixture(t *testing.T, cfg Config, auth Authorizer) *fixture {
	t.Helper()
	tel, err := telemetry.New(context.Background(), "test", telemetry.Config{LogLevel: "warn", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, hist: &history{revs: map[int64]*replicav1.Revision{}}, rev: 1}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	f.start(ctx, cancel, cfg, ReplicaFeed(), auth, 0, tel)
	return f
}

// start builds the hub over src, makes revision 2 and n more, and runs the hub until
// the test ends.
func (f *fixture) start(ctx context.Context, cancel context.CancelFunc, cfg Config, src Source, auth Authorizer, n int, tel *telemetry.Telemetry) {
	t := f.t
	t.Helper()
	if auth == nil {
		auth = permitAll{}
	}
	var err error
	if f.hub, err = New(cfg, src, Deps{Replicas: f.hist, Authorizer: auth, Cluster: cluster{}}, tel); err != nil {
		t.Fatal(err)
	}
	f.publish(f.put("init", "0")) // revision 2: the stream's first
	for i := range n {
		f.publish(f.put("before", fmt.Sprint(i)))
	}
	done := make(chan struct{})
	go func() { f.hub.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	f.waitHub(2 + int64(n))
}

// A hub started after revisions were published takes the newest of them (as many as
// its ring keeps) into memory: a watch from the recent past reads neither the stream
// nor a replica.
func TestHubSeedsItsHistoryFromTheStream(t *testing.T) {
	f := newFixtureAfter(t, testConfig(), nil, 30) // revisions 3..32; the ring keeps 16
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("before"), StartRevision: 20})
	c.created()
	if got := flat(c.revisions(32)); !slices.Equal(got, span(20, 32)) {
		t.Fatalf("revisions %v, want 20..32", got)
	}
	feeds := f.feedReads()
	if feeds != 0 {
		t.Fatalf("%d Feed calls for a watch the seeded ring holds", feeds)
	}
	if first := f.hub.ringFrom(17, 32); len(first) != 16 {
		t.Fatalf("the ring holds %d of revisions 17..32, want 16", len(first))
	}
}

// put makes the next revision: a put of each key=value pair given.
func (f *fixture) put(kvs ...string) *replicav1.Revision {
	f.rev++
	r := &replicav1.Revision{Revision: f.rev}
	for i := 0; i+1 < len(kvs); i += 2 {
		r.Events = append(r.Events, &mvccpb.Event{Type: mvccpb.Event_PUT, Kv: &mvccpb.KeyValue{Key: []byte(kvs[i]), Value: []byte(kvs[i+1]), ModRevision: f.rev, CreateRevision: f.rev, Version: 1}})
	}
	f.hist.mu.Lock()
	f.hist.revs[f.rev] = r
	f.hist.mu.Unlock()
	return r
}

// publish puts r in the stream, as the fanout does (with no stream: wakes the feed).
func (f *fixture) publish(r *replicav1.Revision) {
	f.t.Helper()
	if f.js == nil {
		f.hist.changed.Notify()
		return
	}
	msg, _, err := revstream.Message(f.stream.Subject, r, 1<<20)
	if err != nil {
		f.t.Fatal(err)
	}
	if _, err := f.js.PublishMsg(context.Background(), msg, jetstream.WithExpectLastSequence(f.seq)); err != nil {
		f.t.Fatalf("publish revision %d: %v", r.GetRevision(), err)
	}
	f.seq++
}

// feedReads is how many history reads the replicas have served.
func (f *fixture) feedReads() int {
	f.hist.mu.Lock()
	defer f.hist.mu.Unlock()
	return f.hist.feeds
}

// publishPuts puts n revisions of k=v and publishes each.
func (f *fixture) publishPuts(n int) {
	f.t.Helper()
	for range n {
		f.publish(f.put("k", "v"))
	}
}

// watchKey opens a client with a created watch of k from start (0: now).
func (f *fixture) watchKey(start int64) *client {
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("k"), StartRevision: start})
	c.created()
	return c
}

func (f *fixture) waitHub(rev int64) {
	f.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for f.hub.current() < rev {
		if time.Now().After(deadline) {
			f.t.Fatalf("the hub is at %d, not %d, after 10 s", f.hub.current(), rev)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// client is one client stream.
type client struct {
	t     *testing.T
	reqs  chan *pb.WatchRequest
	resps chan *pb.WatchResponse
	// gate, when set, holds every send until it is closed (a slow client).
	gate   chan struct{}
	cancel context.CancelFunc
	done   chan error
}

func (f *fixture) client(gate chan struct{}) *client {
	ctx, cancel := context.WithCancel(context.Background())
	c := &client{t: f.t, reqs: make(chan *pb.WatchRequest, 16), resps: make(chan *pb.WatchResponse, 100000), gate: gate, cancel: cancel, done: make(chan error, 1)}
	recv := func() (*pb.WatchRequest, error) {
		select {
		case r := <-c.reqs:
			return r, nil
		case <-ctx.Done():
			return nil, io.EOF
		}
	}
	send := func(r *pb.WatchResponse) error {
		if c.gate != nil {
			<-c.gate
		}
		c.resps <- r
		return nil
	}
	go func() { c.done <- f.hub.Serve(ctx, recv, send, nil) }()
	f.t.Cleanup(func() { cancel(); <-c.done })
	return c
}

func (c *client) create(cr *pb.WatchCreateRequest) {
	c.reqs <- &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: cr}}
}

func (c *client) next() *pb.WatchResponse {
	c.t.Helper()
	select {
	case r := <-c.resps:
		return r
	case <-time.After(10 * time.Second):
		c.t.Fatal("no response within 10 s")
		return nil
	}
}

// created reads the answer to a create: a valid watch id.
func (c *client) created() int64 {
	c.t.Helper()
	r := c.next()
	if !r.Created || r.Canceled || r.WatchId < 0 {
		c.t.Fatalf("answer to a create: %+v", r)
	}
	return r.WatchId
}

// revisions reads event responses until revision to and answers each response's
// revisions, checking that every revision's events are whole and in one response.
func (c *client) revisions(to int64) [][]int64 {
	c.t.Helper()
	var out [][]int64
	for last := int64(0); last < to; {
		r := c.next()
		if len(r.Events) == 0 {
			c.t.Fatalf("an empty response while waiting for revision %d: %+v", to, r)
		}
		var revs []int64
		for _, ev := range r.Events {
			rev := ev.Kv.ModRevision
			if rev < last || (rev == last && (len(revs) == 0 || revs[len(revs)-1] != rev)) {
				c.t.Fatalf("revision %d after %d, or split over responses", rev, last)
			}
			if len(revs) == 0 || revs[len(revs)-1] != rev {
				revs = append(revs, rev)
			}
			last = rev
		}
		out = append(out, revs)
	}
	return out
}

func flat(rs [][]int64) []int64 {
	var out []int64
	for _, r := range rs {
		out = append(out, r...)
	}
	return out
}

func span(from, to int64) []int64 {
	var out []int64
	for r := from; r <= to; r++ {
		out = append(out, r)
	}
	return out
}

// Live revisions reach a prefix watcher in order, each whole; a key watcher gets only
// its key's; both are created at once with a header at the hub's revision.
func TestHubDeliversInOrder(t *testing.T) {
	f := newFixture(t, testConfig(), nil)
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("a/"), RangeEnd: []byte("a0")})
	if id := c.created(); id != 0 {
		t.Fatalf("first watch id %d, want 0", id)
	}
	c.create(&pb.WatchCreateRequest{Key: []byte("a/2")})
	if id := c.created(); id != 1 {
		t.Fatalf("second watch id %d, want 1", id)
	}
	for i := range 30 {
		f.publish(f.put(fmt.Sprintf("a/%d", i%3), "v", fmt.Sprintf("a/x%d", i), "w"))
	}
	var prefix, key []int64
	for len(prefix) < 30 || len(key) < 10 {
		r := c.next()
		for _, ev := range r.Events {
			if r.WatchId == 0 {
				if n := len(prefix); n == 0 || prefix[n-1] != ev.Kv.ModRevision {
					prefix = append(prefix, ev.Kv.ModRevision)
				}
			} else {
				key = append(key, ev.Kv.ModRevision)
			}
		}
		if r.WatchId == 0 && len(r.Events) != 2 {
			t.Fatalf("revision %d not whole: %d events", r.Events[0].Kv.ModRevision, len(r.Events))
		}
	}
	if !slices.Equal(prefix, span(3, 32)) {
		t.Fatalf("prefix watcher's revisions %v", prefix)
	}
	for i, r := range key {
		if want := int64(5 + 3*i); r != want {
			t.Fatalf("key watcher's revisions %v, want every third from 5", key)
		}
	}
}

// A revision missing from the stream is read from the replicas before the one after
// it is delivered.
func TestHubRepairsAGap(t *testing.T) {
	f := newFixture(t, testConfig(), nil)
	c := f.watchKey(0)
	f.publish(f.put("k", "1"))
	f.put("k", "2") // revision 4: only the replicas have it
	f.publish(f.put("k", "3"))
	if got := flat(c.revisions(5)); !slices.Equal(got, []int64{3, 4, 5}) {
		t.Fatalf("revisions %v, want 3 4 5", got)
	}
}

// A watch from the past catches up from memory, the stream and the replicas (the
// ring keeps 16 revisions, the stream all of them, the replicas all), then takes
// the live revisions with no gap and no duplicate; the catch-up comes in one response
// per thousand revisions, under the hub's revision.
func TestHubCatchesUpThenGoesLive(t *testing.T) {
	f := newFixture(t, testConfig(), nil)
	f.publishPuts(60)
	f.waitHub(62)
	for _, start := range []int64{55, 10, 3} { // ring, stream, stream from its start
		c := f.client(nil)
		c.create(&pb.WatchCreateRequest{Key: []byte("k"), StartRevision: start})
		c.created()
		catchUp := c.next()
		if n := len(catchUp.Events); n != int(62-start+1) || catchUp.Header.Revision != 62 {
			t.Fatalf("from %d: catch-up of %d events at header revision %d, want %d at 62", start, n, catchUp.Header.Revision, 62-start+1)
		}
	}
	c := f.watchKey(40)
	f.publishPuts(5)
	if got := flat(c.revisions(67)); !slices.Equal(got, span(40, 67)) {
		t.Fatalf("catch-up then live: %v", got)
	}
	// Older than the stream keeps: from the replicas.
	st, err := f.js.Stream(context.Background(), f.stream.Stream)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Purge(context.Background(), jetstream.WithPurgeSequence(30)); err != nil {
		t.Fatal(err)
	}
	feeds := f.feedReads()
	c = f.watchKey(3)
	if got := flat(c.revisions(67)); !slices.Equal(got, span(3, 67)) {
		t.Fatalf("from before the stream: %v", got)
	}
	if f.feedReads() == feeds {
		t.Fatal("history older than the stream was not read from the replicas")
	}
}

// A client that does not read falls behind its queue; it is caught up from history
// once it reads again, every revision once, and the other client never waits for it.
func TestHubSlowClient(t *testing.T) {
	cfg := testConfig()
	cfg.StreamQueue = 2
	f := newFixture(t, cfg, nil)
	gate := make(chan struct{})
	slow, fast := f.client(nil), f.client(nil)
	slow.create(&pb.WatchCreateRequest{Key: []byte("k")})
	slow.created()
	fast.create(&pb.WatchCreateRequest{Key: []byte("k")})
	fast.created()
	slow.gate = gate // set before any event is sent to it
	f.publishPuts(40)
	if got := flat(fast.revisions(42)); !slices.Equal(got, span(3, 42)) {
		t.Fatalf("the fast client: %v", got)
	}
	close(gate)
	if got := flat(slow.revisions(42)); !slices.Equal(got, span(3, 42)) {
		t.Fatalf("the slow client: %v", got)
	}
}

// A watch that asked for fragments gets a catch-up larger than the fragment size in
// pieces, each but the last marked, whose events are the whole catch-up.
func TestHubFragments(t *testing.T) {
	cfg := testConfig()
	cfg.FragmentBytes = 600
	f := newFixture(t, cfg, nil)
	for i := range 20 {
		f.publish(f.put("k", fmt.Sprintf("%064d", i)))
	}
	f.waitHub(22)
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("k"), StartRevision: 3, Fragment: true})
	c.created()
	var revs []int64
	pieces := 0
	for {
		r := c.next()
		pieces++
		for _, ev := range r.Events {
			revs = append(revs, ev.Kv.ModRevision)
		}
		if !r.Fragment {
			break
		}
	}
	if pieces < 3 || !slices.Equal(revs, span(3, 22)) {
		t.Fatalf("%d pieces with revisions %v", pieces, revs)
	}
}

// A progress request is answered with the hub's revision and watch id -1; a watch that
// asked for progress notifications gets one per interval while nothing happens.
func TestHubProgress(t *testing.T) {
	cfg := testConfig()
	cfg.ProgressNotifyInterval = 100 * time.Millisecond
	f := newFixture(t, cfg, nil)
	f.publish(f.put("k", "v"))
	f.waitHub(3)
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("other")})
	c.created()
	c.reqs <- &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}
	if r := c.next(); r.WatchId != -1 || r.Header.Revision != 3 || len(r.Events) != 0 {
		t.Fatalf("progress answer %+v", r)
	}
	n := f.client(nil)
	n.create(&pb.WatchCreateRequest{Key: []byte("other"), ProgressNotify: true})
	id := n.created()
	for range 2 {
		if r := n.next(); r.WatchId != id || len(r.Events) != 0 || r.Header.Revision != 3 {
			t.Fatalf("progress notification %+v", r)
		}
	}
}

// A canceled watch is answered canceled and gets nothing more; a watch below the
// compacted revision the stream's state tells is created, then canceled with it; a
// refused one is created and canceled at once with the authorizer's reason.
func TestHubCancelCompactionRefusal(t *testing.T) {
	f := newFixture(t, testConfig(), permitAll{refuse: "secret"})
	c := f.client(nil)
	c.create(&pb.WatchCreateRequest{Key: []byte("k")})
	id := c.created()
	c.reqs <- &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: id}}}
	if r := c.next(); !r.Canceled || r.WatchId != id {
		t.Fatalf("answer to the cancel: %+v", r)
	}
	c.create(&pb.WatchCreateRequest{Key: []byte("k2")})
	id2 := c.created()
	f.publish(f.put("k", "v", "k2", "w"))
	if r := c.next(); r.WatchId != id2 || len(r.Events) != 1 {
		t.Fatalf("after the cancel: %+v (only the other watch's event is due)", r)
	}

	f.publishPuts(5)
	kv, err := revstream.EnsureState(context.Background(), f.js, f.stream)
	if err != nil {
		t.Fatal(err)
	}
	if err := revstream.PutState(context.Background(), kv, &replicav1.StreamState{CompactRevision: 6}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		f.hub.mu.Lock()
		known := f.hub.compactRev
		f.hub.mu.Unlock()
		if known == 6 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the hub did not learn the compaction from the stream's state")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.create(&pb.WatchCreateRequest{Key: []byte("k"), StartRevision: 5})
	cid := c.created()
	if r := c.next(); !r.Canceled || r.WatchId != cid || r.CompactRevision != 6 {
		t.Fatalf("a watch below the compaction: %+v", r)
	}
	c.create(&pb.WatchCreateRequest{Key: []byte("secret")})
	if r := c.next(); !r.Created || !r.Canceled || r.WatchId != -1 || r.CancelReason == "" {
		t.Fatalf("a refused watch: %+v", r)
	}
}

// A hub with no authorizer is not built: there is no watch without a decision.
func TestHubNeedsAnAuthorizer(t *testing.T) {
	tel, err := telemetry.New(context.Background(), "test", telemetry.Config{LogLevel: "warn", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(testConfig(), ReplicaFeed(), Deps{Replicas: &history{}, Cluster: cluster{}}, tel); err == nil {
		t.Fatal("a hub was built without an authorizer")
	}
}

// BenchmarkHubPublishPrefixWatchers is the hub's work for one revision that one of n
// prefix watchers (on n streams) watches: the same for 1,000 and for 100,000.
func BenchmarkHubPublishPrefixWatchers(b *testing.B) {
	for _, n := range []int{1000, 10000, 100000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			h := &Hub{cfg: testConfig(), keys: make(map[string][]streamRef)}
			h.cfg.RingRevisions = 1024
			h.m.watchers = prometheus.NewGauge(prometheus.GaugeOpts{Name: "w"})
			h.m.revisions = prometheus.NewCounter(prometheus.CounterOpts{Name: "r"})
			var match *wstream
			for i := range n {
				s := &wstream{h: h, notify: make(chan struct{}, 1), watchers: map[int64]*watcher{}, keyW: map[string]*watcher{}}
				p := fmt.Sprintf("/prefix/%06d/", i)
				w := &watcher{s: s, key: []byte(p), end: []byte(p[:len(p)-1] + "0")}
				h.register(w)
				s.add(w)
				if i == 777 {
					match = s
				}
			}
			key := []byte("/prefix/000777/k")
			b.ResetTimer()
			for i := range b.N {
				h.publish(newHrev(&replicav1.Revision{Revision: int64(i + 1), Events: []*mvccpb.Event{{Kv: &mvccpb.KeyValue{Key: key}}}}))
				match.qmu.Lock()
				match.queue = match.queue[:0]
				match.qmu.Unlock()
			}
		})
	}
}

// Revisions missing from the stream that a replica compacted before the hub could read
// them: the hub moves past them, and a watcher that needed them is canceled with the
// compacted revision (as etcd cancels a watcher that fell behind a compaction), never
// left waiting for them and never silently served what came after.
func TestHubSkipsACompactedGap(t *testing.T) {
	f := newFixture(t, testConfig(), nil)
	c := f.watchKey(0) // from revision 3
	f.put("k", "1")    // revisions 3 and 4: only the replicas had them,
	f.put("k", "2")
	f.hist.mu.Lock()
	f.hist.compact = 4 // and compacted them
	f.hist.mu.Unlock()
	f.publish(f.put("k", "3"))
	if r := c.next(); !r.Canceled || r.CompactRevision != 4 {
		t.Fatalf("the watcher behind the compacted gap got %+v, want a cancel at compaction 4", r)
	}
	f.waitHub(5)
	live := f.watchKey(0)
	f.publish(f.put("k", "4"))
	if got := flat(live.revisions(6)); !slices.Equal(got, []int64{6}) {
		t.Fatalf("a watch after the gap got revisions %v, want 6", got)
	}
	if got := testutil.ToFloat64(f.hub.m.skipped); got != 2 {
		t.Errorf("%v revisions counted as skipped, want 2", got)
	}
}

// waitFollowing waits until the hub follows the stream (1) or idles (0).
func (f *fixture) waitFollowing(want float64) {
	f.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(f.hub.m.following) != want {
		if time.Now().After(deadline) {
			f.t.Fatalf("kvmesh_gateway_watch_following is not %v after 10 s", want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A hub nobody watches through stops following the stream after IdleAfter, and costs
// nothing per revision while idle; the next stream starts it again at the stream's
// newest revision, a watch from a revision published while it idled catches up from
// the stream with no gap, and a watch from now sees only what follows.
func TestHubIdlesWithoutStreams(t *testing.T) {
	cfg := testConfig()
	cfg.IdleAfter = 300 * time.Millisecond
	f := newFixture(t, cfg, nil)
	f.waitFollowing(0)
	if cur := f.hub.current(); cur != 0 {
		t.Fatalf("an idle hub keeps revision %d", cur)
	}
	handed := testutil.ToFloat64(f.hub.m.revisions)
	f.publishPuts(10) // revisions 3..12, while idle
	time.Sleep(200 * time.Millisecond)
	if got := testutil.ToFloat64(f.hub.m.revisions); got != handed {
		t.Fatalf("an idle hub handed out %v revisions", got-handed)
	}

	past := f.watchKey(5) // published while the hub idled
	f.waitFollowing(1)
	now := f.watchKey(0)
	f.publishPuts(2) // 13, 14
	if got := flat(past.revisions(14)); !slices.Equal(got, span(5, 14)) {
		t.Fatalf("a watch from revision 5 after idling: %v, want 5..14", got)
	}
	if got := flat(now.revisions(14)); !slices.Equal(got, span(13, 14)) {
		t.Fatalf("a watch from now after idling: %v, want 13..14", got)
	}
	if f.feedReads() != 0 {
		t.Fatal("the catch-up after idling read a replica, not the stream")
	}

	// Both streams end: the hub idles again, and follows again for the next one.
	past.cancel()
	now.cancel()
	<-past.done
	<-now.done
	past.done <- nil // for the cleanups
	now.done <- nil
	f.waitFollowing(0)
	f.publishPuts(1) // 15
	again := f.watchKey(14)
	f.publishPuts(1) // 16
	if got := flat(again.revisions(16)); !slices.Equal(got, span(14, 16)) {
		t.Fatalf("a watch after the second idle: %v, want 14..16", got)
	}
}

// A hub whose source cannot idle (a replica's feed: it carries the state watch
// creations are decided on) follows it with no stream open.
func TestReplicaFeedHubNeverIdles(t *testing.T) {
	cfg := testConfig()
	cfg.IdleAfter = 50 * time.Millisecond
	f := newFeedFixture(t, cfg, nil)
	time.Sleep(300 * time.Millisecond)
	f.publishPuts(3)
	f.waitHub(5)
	if got := testutil.ToFloat64(f.hub.m.following); got != 1 {
		t.Fatalf("kvmesh_gateway_watch_following = %v with a feed source", got)
	}
}
