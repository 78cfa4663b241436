package e2e

import (
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/prototext"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// watchSpec is one watch opened the same way on both servers.
type watchSpec struct {
	name string
	key  string
	opts []clientv3.OpOption
}

// watchLog collects what one watch delivered.
type watchLog struct {
	mu     sync.Mutex
	lines  []string
	closed bool
}

func (l *watchLog) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, s)
}

func (l *watchLog) snapshot() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.lines)
}

func eventLine(ev *clientv3.Event) string {
	e := &mvccpb.Event{Type: ev.Type, Kv: ev.Kv, PrevKv: ev.PrevKv}
	return prototext.MarshalOptions{}.Format(e)
}

// collect reads a watch channel into a log: every event, and how it ended.
func collect(ch clientv3.WatchChan) *watchLog {
	l := &watchLog{}
	go func() {
		for resp := range ch {
			if resp.CompactRevision != 0 {
				l.add(fmt.Sprintf("compacted at %d", resp.CompactRevision))
			}
			if resp.Canceled {
				l.add("canceled")
				if err := resp.Err(); err != nil && resp.CompactRevision == 0 {
					l.add("error: " + err.Error())
				}
			}
			for _, ev := range resp.Events {
				l.add(eventLine(ev))
			}
			// Events of one revision arrive together: etcd never splits a revision
			// over responses unless asked to fragment.
			for i := 1; i < len(resp.Events); i++ {
				if resp.Events[i].Kv.ModRevision < resp.Events[i-1].Kv.ModRevision {
					l.add("OUT OF ORDER")
				}
			}
		}
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
	}()
	return l
}

// TestWatchDifferential applies the same random requests to kvmesh and to etcd while
// the same watches run on both (key, prefix, range, from-key, every key, prev_kv, the
// NOPUT and NODELETE filters), then starts more watches from past revisions, and
// requires every watch to deliver exactly the same events on both.
func TestWatchDifferential(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	target := harness.Start(t, kind, harness.Options{Name: "watch-target"})
	oracle := harness.StartEtcd(t, harness.Options{Name: "watch-oracle"})
	clis := [2]*clientv3.Client{etcdclient.NewClient(t, target), etcdclient.NewClient(t, oracle)}
	names := [2]string{string(kind), "etcd(oracle)"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	live := []watchSpec{
		{"key a", "a", nil},
		{"key b/1 prev_kv", "b/1", []clientv3.OpOption{clientv3.WithPrevKV()}},
		{"prefix a", "a", []clientv3.OpOption{clientv3.WithPrefix()}},
		{"prefix a prev_kv", "a", []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithPrevKV()}},
		{"range [b, e)", "b", []clientv3.OpOption{clientv3.WithRange("e")}},
		{"from key d", "d", []clientv3.OpOption{clientv3.WithFromKey()}},
		{"every key prev_kv", "", []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithPrevKV()}},
		{"every key noput", "", []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithFilterPut()}},
		{"every key nodelete", "", []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithFilterDelete(), clientv3.WithPrevKV()}},
	}
	type opened struct {
		spec watchSpec
		logs [2]*watchLog
	}
	var all []opened
	open := func(s watchSpec) {
		o := opened{spec: s}
		for i, cli := range clis {
			o.logs[i] = collect(cli.Watch(clientv3.WithRequireLeader(ctx), s.key, s.opts...))
		}
		all = append(all, o)
	}
	for _, s := range live {
		open(s)
	}
	// Let both servers register the watches before the writes begin.
	time.Sleep(500 * time.Millisecond)

	g := &diffGen{rng: rand.New(rand.NewPCG(seed, seed^0x5bd1e995)), rev: 1, physical: true}
	kvs := [2]pb.KVClient{pb.NewKVClient(clis[0].ActiveConnection()), pb.NewKVClient(clis[1].ActiveConnection())}
	for i := 0; i < 250; i++ {
		op := g.next()
		if op.compactRev > 0 && i < 200 {
			continue // compact only near the end, so that the past watches below see both cases
		}
		rt, et := op.run(t, kvs[0])
		ro, eo := op.run(t, kvs[1])
		if msg := compareResults(names[0], names[1], rt, et, ro, eo); msg != "" {
			t.Fatalf("op #%d (%s) differs; the watch comparison needs equal histories:\n%s", i, op.desc, msg)
		}
		if eo == nil {
			if h := headerOfMsg(ro); h != nil && h.Revision > g.rev {
				g.rev = h.Revision
			}
			if op.compactRev > 0 {
				g.compacted = op.compactRev
			}
		}
	}
	t.Logf("final revision %d, compacted at %d", g.rev, g.compacted)

	// Watches from the past: the first revision, a compacted one (when there is one),
	// the middle, the end, and the future.
	starts := []int64{1, 2, g.rev / 3, g.rev / 2, g.rev, g.rev + 1}
	if g.compacted > 1 {
		starts = append(starts, g.compacted-1, g.compacted)
	}
	for _, rev := range starts {
		open(watchSpec{fmt.Sprintf("every key from %d prev_kv", rev), "", []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithRev(rev), clientv3.WithPrevKV()}})
		open(watchSpec{fmt.Sprintf("prefix a from %d", rev), "a", []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithRev(rev)}})
	}
	// One more write that the future watches see too.
	for _, cli := range clis {
		if _, err := cli.Put(ctx, "a/last", "x"); err != nil {
			t.Fatal(err)
		}
	}

	// Wait until both sides agree and stay so, then compare.
	deadline := time.Now().Add(30 * time.Second)
	stable := 0
	for {
		same := true
		for _, o := range all {
			if !slices.Equal(o.logs[0].snapshot(), o.logs[1].snapshot()) {
				same = false
				break
			}
		}
		if same {
			if stable++; stable >= 5 {
				break
			}
		} else {
			stable = 0
		}
		if time.Now().After(deadline) {
			for _, o := range all {
				a, b := o.logs[0].snapshot(), o.logs[1].snapshot()
				if !slices.Equal(a, b) {
					t.Errorf("watch %q differs (seed %d): - %s, + %s:\n%s", o.spec.name, seed, names[1], names[0], lineDiff(strings.Join(b, "\n"), strings.Join(a, "\n")))
				}
			}
			t.FailNow()
		}
		time.Sleep(200 * time.Millisecond)
	}
	events := 0
	for _, o := range all {
		lines := o.logs[0].snapshot()
		events += len(lines)
		if slices.Contains(lines, "OUT OF ORDER") {
			t.Errorf("watch %q delivered a response out of revision order", o.spec.name)
		}
	}
	t.Logf("%d watches, %d events, identical on both", len(all), events)
}

// rawWatch is one raw etcd Watch stream.
type rawWatch struct {
	t      *testing.T
	name   string
	stream pb.Watch_WatchClient
	resps  chan *pb.WatchResponse
}

func openRawWatch(t *testing.T, name string, cli *clientv3.Client) *rawWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := pb.NewWatchClient(cli.ActiveConnection()).Watch(ctx)
	if err != nil {
		t.Fatalf("%s: open watch stream: %v", name, err)
	}
	w := &rawWatch{t: t, name: name, stream: s, resps: make(chan *pb.WatchResponse, 100)}
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				close(w.resps)
				return
			}
			w.resps <- r
		}
	}()
	return w
}

func (w *rawWatch) send(r *pb.WatchRequest) {
	w.t.Helper()
	if err := w.stream.Send(r); err != nil {
		w.t.Fatalf("%s: send: %v", w.name, err)
	}
}

// next returns the next response, with the header fields that differ between
// clusters zeroed; false when none came within 5s.
func (w *rawWatch) next() (string, bool) {
	w.t.Helper()
	select {
	case r, ok := <-w.resps:
		if !ok {
			w.t.Fatalf("%s: the watch stream ended", w.name)
		}
		r.Header.ClusterId, r.Header.MemberId, r.Header.RaftTerm = 0, 0, 0
		text := prototext.MarshalOptions{}.Format(r)
		if len(text) > 600 {
			text = fmt.Sprintf("%s… (%d bytes, sha256 %x)", text[:300], len(text), sha256.Sum256([]byte(text)))
		}
		return text, true
	case <-time.After(5 * time.Second):
		return "", false
	}
}

// TestWatchProtocolDifferential drives one raw Watch stream on kvmesh and on etcd with
// the same requests and requires the same responses: watch ids as etcd assigns them,
// created and canceled responses, the errors for an empty range and a duplicate id, a
// compacted start, progress requests, cancel of an unknown id, fragments.
func TestWatchProtocolDifferential(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	target := harness.Start(t, kind, harness.Options{Name: "watchproto-target"})
	oracle := harness.StartEtcd(t, harness.Options{Name: "watchproto-oracle"})
	clis := [2]*clientv3.Client{etcdclient.NewClient(t, target), etcdclient.NewClient(t, oracle)}
	names := [2]string{string(kind), "etcd"}
	var ws [2]*rawWatch
	for i := range clis {
		ws[i] = openRawWatch(t, names[i], clis[i])
	}
	create := func(c *pb.WatchCreateRequest) *pb.WatchRequest {
		return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: c}}
	}
	sortResponses := true
	step := func(what string, req *pb.WatchRequest, write func(*clientv3.Client), responses int) {
		t.Helper()
		var got [2][]string
		for i := range ws {
			if req != nil {
				ws[i].send(req)
			}
			if write != nil {
				write(clis[i])
			}
			for range responses {
				r, ok := ws[i].next()
				if !ok {
					t.Fatalf("%s: %s sent %d of %d responses:\n%s", what, names[i], len(got[i]), responses, strings.Join(got[i], "\n"))
				}
				got[i] = append(got[i], r)
			}
			if sortResponses {
				slices.Sort(got[i]) // watchers of one revision answer in any order
			}
		}
		if !slices.Equal(got[0], got[1]) {
			t.Fatalf("%s: responses differ (- etcd, + %s):\n%s", what, names[0], lineDiff(strings.Join(got[1], "\n"), strings.Join(got[0], "\n")))
		}
	}
	put := func(k, v string) func(*clientv3.Client) {
		return func(c *clientv3.Client) {
			if _, err := c.Put(context.Background(), k, v); err != nil {
				t.Fatal(err)
			}
		}
	}
	progress := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}

	step("put a", nil, put("a", "1"), 0)
	step("create a", create(&pb.WatchCreateRequest{Key: []byte("a")}), nil, 1)
	step("create b with id 7 and prev_kv", create(&pb.WatchCreateRequest{Key: []byte("b"), WatchId: 7, PrevKv: true}), nil, 1)
	step("duplicate id 7", create(&pb.WatchCreateRequest{Key: []byte("c"), WatchId: 7}), nil, 1)
	step("empty range", create(&pb.WatchCreateRequest{Key: []byte("b"), RangeEnd: []byte("a")}), nil, 1)
	step("next auto id", create(&pb.WatchCreateRequest{Key: []byte("a"), RangeEnd: []byte("b"), Filters: []pb.WatchCreateRequest_FilterType{pb.WatchCreateRequest_NODELETE}}), nil, 1)
	step("put a: two watchers", nil, put("a", "2"), 2)
	step("put b with prev_kv", nil, put("b", "1"), 1)
	step("put b again", nil, put("b", "2"), 1)
	step("progress", progress, nil, 1)
	step("cancel 0", &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 0}}}, nil, 1)
	step("cancel unknown, then progress", &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 99}}}, nil, 0)
	step("progress after unknown cancel", progress, nil, 1)
	step("watch from revision 2", create(&pb.WatchCreateRequest{Key: []byte("a"), StartRevision: 2}), nil, 2)
	// Three values of 1 MB: their catch-up response is over etcd's fragment size
	// (--max-request-bytes plus 512 KiB), so it comes in two fragments.
	for i := range 3 {
		step("large puts", nil, put(fmt.Sprintf("f/%d", i), strings.Repeat(string(rune('x'+i)), 1_000_000)), 0)
	}
	sortResponses = false // fragments come in order
	step("fragmented catch-up", create(&pb.WatchCreateRequest{Key: []byte("f/"), RangeEnd: []byte("f0"), StartRevision: 1, Fragment: true}), nil, 3)
	step("unfragmented catch-up", create(&pb.WatchCreateRequest{Key: []byte("f/"), RangeEnd: []byte("f0"), StartRevision: 1}), nil, 2)
	step("compact", nil, func(c *clientv3.Client) {
		if _, err := c.Compact(context.Background(), 7); err != nil {
			t.Fatal(err)
		}
	}, 0)
	step("watch from a compacted revision", create(&pb.WatchCreateRequest{Key: []byte("a"), StartRevision: 3}), nil, 2)
	step("watch from the compacted revision itself", create(&pb.WatchCreateRequest{Key: []byte("f/"), RangeEnd: []byte("f0"), StartRevision: 7}), nil, 2)
}

// TestWatchCatchesUpAfterRestart checks that history survives the all-in-one's
// restart (Pebble and the embedded NATS store), and that a watch resumed from a
// revision gets exactly what followed it.
func TestWatchCatchesUpAfterRestart(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	s := harness.Start(t, kind, harness.Options{Name: "watch-restart"})
	cli := etcdclient.NewClient(t, s)
	ctx := harness.WaitCtx(t, 60*time.Second)
	var revs []int64
	for i := range 50 {
		r, err := cli.Put(ctx, fmt.Sprintf("r/%d", i%5), fmt.Sprint(i))
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, r.Header.Revision)
	}
	s.Stop()
	s.Restart()
	cli = etcdclient.NewClient(t, s)
	from := revs[20]
	wch := cli.Watch(ctx, "r/", clientv3.WithPrefix(), clientv3.WithRev(from))
	if _, err := cli.Put(ctx, "r/after", "restart"); err != nil {
		t.Fatal(err)
	}
	want := from
	for want <= revs[len(revs)-1]+1 {
		resp, ok := <-wch
		if !ok || resp.Err() != nil {
			t.Fatalf("watch ended at revision %d: %v", want, resp.Err())
		}
		for _, ev := range resp.Events {
			if ev.Kv.ModRevision != want {
				t.Fatalf("event at revision %d, want %d", ev.Kv.ModRevision, want)
			}
			want++
		}
	}
}

// TestWatchSlowClientCatchesUp holds a watch stream's reader still (small HTTP/2
// windows, no Recv) while thousands of revisions are written, with a gateway whose
// per-stream queue and in-memory history are tiny: the stream overflows and must be
// caught up from the older history (JetStream, a replica) once the client reads again,
// with every revision delivered once, in order. Another watcher on another stream is
// not held back meanwhile.
func TestWatchSlowClientCatchesUp(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	s := harness.Start(t, kind, harness.Options{Name: "watch-slow", Env: []string{
		"KVMESH_GATEWAY_WATCH_STREAM_QUEUE=16", "KVMESH_GATEWAY_WATCH_RING_REVISIONS=64", "KVMESH_GATEWAY_WATCH_RING_BYTES=1048576",
	}})
	cli := etcdclient.NewClient(t, s)
	ctx := harness.WaitCtx(t, 120*time.Second)

	conn, err := grpc.NewClient(s.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	slow, err := pb.NewWatchClient(conn).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first, err := cli.Put(ctx, "slow/start", "x")
	if err != nil {
		t.Fatal(err)
	}
	from := first.Header.Revision + 1
	if err := slow.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("slow/"), RangeEnd: []byte("slow0"), StartRevision: from}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := slow.Recv(); err != nil || !r.Created {
		t.Fatalf("create: %v, %v", r, err)
	}
	fast := cli.Watch(ctx, "fast", clientv3.WithRev(from))

	const n = 2000
	value := strings.Repeat("v", 1024)
	var last, fastRev int64
	for i := range n {
		r, err := cli.Put(ctx, fmt.Sprintf("slow/%d", i%50), value)
		if err != nil {
			t.Fatal(err)
		}
		last = r.Header.Revision
		if i == n/2 {
			// Meanwhile a watcher on another stream is served at once.
			put, err := cli.Put(ctx, "fast", "1")
			if err != nil {
				t.Fatal(err)
			}
			fastRev = put.Header.Revision
			select {
			case resp := <-fast:
				if len(resp.Events) != 1 || resp.Events[0].Kv.ModRevision != put.Header.Revision {
					t.Fatalf("fast watcher: %+v", resp)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("a watcher on another stream was held back by the slow one")
			}
		}
	}
	want := from
	for want <= last {
		r, err := slow.Recv()
		if err != nil {
			t.Fatalf("slow watcher at revision %d: %v", want, err)
		}
		for _, ev := range r.Events {
			if want == fastRev { // the "fast" put is not in this watch's range
				want++
			}
			if ev.Kv.ModRevision != want {
				t.Fatalf("slow watcher: event at revision %d, want %d", ev.Kv.ModRevision, want)
			}
			want++
		}
	}
	if kind == harness.KindKvmesh {
		if v := metricOf(s.ClientURL(), "kvmesh_gateway_watch_stream_overflows_total"); v < 1 {
			t.Fatalf("the slow stream never overflowed (metric %v): the test did not test the catch-up", v)
		}
	}
}
