package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	raftpb "go.etcd.io/raft/v3/raftpb"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/replica/raftlog"
)

// testReplica is a replica in a temporary directory, reached over its internal Connect
// API through the in-process transport.
type testReplica struct {
	t     *testing.T
	cfg   Config
	r     *Replica
	run   *running
	kv    replicaapi.API
	maint replicaapi.API
	spans *tracetest.InMemoryExporter
}

// running is a replica's Run under way.
type running struct {
	cancel context.CancelFunc
	done   chan error
}

// runReplica runs r until stop, and waits until it has started.
func runReplica(t *testing.T, r *Replica) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	rn := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { rn.done <- r.Run(ctx) }()
	select {
	case <-r.Ready():
	case err := <-rn.done:
		t.Fatalf("run replica: %v", err)
	}
	return rn
}

// stop ends the Run and returns its error.
func (rn *running) stop() error {
	rn.cancel()
	return <-rn.done
}

func startReplica(t *testing.T, cfg Config) *testReplica {
	t.Helper()
	tel, err := telemetry.New(context.Background(), "replica-test", telemetry.Config{LogLevel: "warn", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	spans := tracetest.NewInMemoryExporter()
	tel.WithTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans)))
	r, err := New(cfg, tel)
	if err != nil {
		t.Fatalf("start replica: %v", err)
	}
	// The test calls the replica in process, as the all-in-one's gateway does.
	api := r.services()
	tr := &testReplica{t: t, cfg: cfg, r: r, run: runReplica(t, r), spans: spans, kv: api, maint: api}
	t.Cleanup(func() { tr.stop() })
	tr.waitLeader()
	return tr
}

func (tr *testReplica) stop() {
	if tr.r == nil {
		return
	}
	if err := tr.run.stop(); err != nil {
		tr.t.Errorf("stop replica: %v", err)
	}
	tr.r = nil
}

func (tr *testReplica) restart() *testReplica {
	tr.stop()
	return startReplica(tr.t, tr.cfg)
}

func (tr *testReplica) waitLeader() {
	tr.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		st, err := tr.maint.Status(context.Background(), &pb.StatusRequest{})
		if err == nil && st.GetLeader() == tr.r.ID() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	tr.t.Fatal("the single replica did not become leader within 10s")
}

func (tr *testReplica) put(key, val string) *pb.PutResponse {
	tr.t.Helper()
	resp, err := tr.kv.Put(context.Background(), &pb.PutRequest{Key: []byte(key), Value: []byte(val)})
	if err != nil {
		tr.t.Fatalf("put %q: %v", key, err)
	}
	return resp
}

func (tr *testReplica) get(key string, rev int64) *pb.RangeResponse {
	tr.t.Helper()
	resp, err := tr.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte(key), Revision: rev})
	if err != nil {
		tr.t.Fatalf("get %q at %d: %v", key, rev, err)
	}
	return resp
}

func testConfig(t *testing.T) Config {
	return Config{
		Name: "test", DataDir: t.TempDir(), Listen: "127.0.0.1:0",
		PeerURLs: []string{"http://127.0.0.1:2380"}, ClientURLs: []string{"http://127.0.0.1:2379"},
		ClusterToken: "test", TickInterval: 10 * time.Millisecond, ElectionTicks: 10,
		SnapshotCount: 10000, MaxRequestBytes: 1572864, MaxTxnOps: 128, RequestTimeout: 5 * time.Second, InitialClusterState: "new",
		LeaseCheckpointInterval: time.Second, LeaseRevokeRate: 1000,
	}
}

func TestWritesSurviveRestartAndHeadersIdentifyTheMember(t *testing.T) {
	tr := startReplica(t, testConfig(t))
	for i := range 50 {
		if got := tr.put(fmt.Sprintf("k%02d", i), fmt.Sprint(i)).GetHeader().GetRevision(); got != int64(i+2) {
			t.Fatalf("put #%d answered revision %d, want %d", i, got, i+2)
		}
	}
	h := tr.get("k00", 0).GetHeader()
	if h.GetClusterId() == 0 || h.GetMemberId() != tr.r.ID() || h.GetRaftTerm() == 0 || h.GetRevision() != 51 {
		t.Fatalf("header %v: want cluster and member IDs, a raft term, revision 51", h)
	}
	id := tr.r.ID()

	tr = tr.restart()
	if tr.r.ID() != id {
		t.Fatalf("member ID changed across restart: %x → %x", id, tr.r.ID())
	}
	for i := range 50 {
		r := tr.get(fmt.Sprintf("k%02d", i), 0)
		if len(r.GetKvs()) != 1 || string(r.GetKvs()[0].GetValue()) != fmt.Sprint(i) || r.GetKvs()[0].GetModRevision() != int64(i+2) {
			t.Fatalf("after restart k%02d = %v", i, r.GetKvs())
		}
	}
	if got := tr.put("after", "restart").GetHeader().GetRevision(); got != 52 {
		t.Fatalf("first put after restart got revision %d, want 52 (nothing applied twice, nothing lost)", got)
	}
	if r := tr.get("k00", 2); len(r.GetKvs()) != 1 {
		t.Fatalf("history lost across restart: %v", r)
	}
}

func TestLogIsTruncatedAndReplicaRestartsFromTruncatedLog(t *testing.T) {
	cfg := testConfig(t)
	cfg.SnapshotCount = 40
	tr := startReplica(t, cfg)
	for i := range 200 {
		tr.put(fmt.Sprintf("k%d", i%7), fmt.Sprint(i))
	}
	first, _ := tr.r.raftLog.FirstIndex()
	if first <= 1 {
		t.Fatalf("after 200 entries with SnapshotCount 40 the log still starts at %d", first)
	}
	tr = tr.restart()
	if got := tr.put("k0", "x").GetHeader().GetRevision(); got != 202 {
		t.Fatalf("put after restart from a truncated log: revision %d, want 202", got)
	}
}

func TestRequestValidationAndLimits(t *testing.T) {
	cfg := testConfig(t)
	cfg.MaxRequestBytes = 1024
	cfg.MaxTxnOps = 4
	tr := startReplica(t, cfg)
	ctx := context.Background()
	cases := []struct {
		name string
		call func() error
		want *etcderr.Error
	}{
		{"empty key", func() error {
			_, err := tr.kv.Put(ctx, &pb.PutRequest{})
			return err
		}, etcderr.ErrEmptyKey},
		{"request too large", func() error {
			_, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte("k"), Value: make([]byte, 2000)})
			return err
		}, etcderr.ErrRequestTooLarge},
		{"too many ops", func() error {
			ops := make([]*pb.RequestOp, 5)
			for i := range ops {
				ops[i] = &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte{byte('a' + i)}}}}
			}
			_, err := tr.kv.Txn(ctx, &pb.TxnRequest{Success: ops})
			return err
		}, etcderr.ErrTooManyOps},
		{"invalid sort", func() error {
			_, err := tr.kv.Range(ctx, &pb.RangeRequest{Key: []byte("k"), SortOrder: 9})
			return err
		}, etcderr.ErrInvalidSortOption},
	}
	for _, c := range cases {
		if err := c.call(); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v %q", c.name, err, c.want.Code(), c.want.Error())
		}
	}
	if got := tr.get("k", 0).GetHeader().GetRevision(); got != 1 {
		t.Fatalf("rejected requests changed the store: revision %d, want 1", got)
	}
}

func TestAPutIsOneTraceFromProposalToApply(t *testing.T) {
	tr := startReplica(t, testConfig(t))
	tr.spans.Reset()
	// The caller's span (a gateway's request, over the network or in process).
	ctx, span := tr.r.tel.Tracer.Tracer("test").Start(context.Background(), "request")
	if _, err := tr.kv.Put(ctx, &pb.PutRequest{Key: []byte("traced"), Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	span.End()
	byName := map[string]tracetest.SpanStub{}
	for _, s := range tr.spans.GetSpans() {
		byName[s.Name] = s
	}
	for _, name := range []string{"request", "raft.propose", "raft.commit", "mvcc.apply"} {
		if _, ok := byName[name]; !ok {
			t.Fatalf("no %q span among %v", name, byName)
		}
	}
	trace := byName["request"].SpanContext.TraceID()
	for _, name := range []string{"raft.propose", "raft.commit", "mvcc.apply"} {
		if got := byName[name].SpanContext.TraceID(); got != trace {
			t.Errorf("span %q is in trace %s, want the request's trace %s", name, got, trace)
		}
	}
	if byName["mvcc.apply"].Parent.SpanID() != byName["raft.propose"].SpanContext.SpanID() {
		t.Errorf("mvcc.apply's parent is %s, want raft.propose %s", byName["mvcc.apply"].Parent.SpanID(), byName["raft.propose"].SpanContext.SpanID())
	}
}

// TestLinearizableReadAfterRestartSeesEveryLoggedWrite recreates what kill -9 can
// leave behind: entries durable in the Raft log while the commit index that covered
// them (written without sync) was lost. Those writes may have been acknowledged, so the
// first linearizable read after the restart must see them: a lone voter's ReadIndex
// answers with the stale commit index at once, and the read must still wait until the
// new term has committed (and applied) everything before it.
func TestLinearizableReadAfterRestartSeesEveryLoggedWrite(t *testing.T) {
	cfg := testConfig(t)
	cfg.TickInterval = 50 * time.Millisecond
	tr := startReplica(t, cfg)
	tr.put("before", "crash")
	tr.stop()

	log, err := raftlog.Open(filepath.Join(cfg.DataDir, walDirName), raftlog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	last, _ := log.LastIndex()
	term := log.HardState().GetTerm()
	var ents []*raftpb.Entry
	for i := range 3 {
		data, err := proto.Marshal(&replicav1.RaftRequest{Request: &replicav1.RaftRequest_Put{
			Put: &pb.PutRequest{Key: []byte(fmt.Sprintf("logged%d", i)), Value: []byte("acked")}}})
		if err != nil {
			t.Fatal(err)
		}
		ents = append(ents, &raftpb.Entry{Term: proto.Uint64(term), Index: proto.Uint64(last + 1 + uint64(i)),
			Type: raftpb.EntryType_EntryNormal.Enum(), Data: data})
	}
	if err := log.Save(nil, ents, true); err != nil {
		t.Fatal(err)
	}
	if err := log.Close(); err != nil {
		t.Fatal(err)
	}

	// Restart on a disk whose fsyncs take 300ms, and read at once: the read arrives
	// while the new term's first entry is still being persisted, which is when the
	// lone voter answers ReadIndex with the stale commit index.
	slow := &slowSyncFS{FS: vfs.Default, delay: 300 * time.Millisecond}
	cfg.fs = slow
	tel, err := telemetry.New(context.Background(), "replica-test", telemetry.Config{LogLevel: "warn", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(cfg, tel)
	if err != nil {
		t.Fatal(err)
	}
	defer runReplica(t, r).stop()
	slow.slow.Store(true)
	kv := r.services()
	for i := range 3 {
		resp, err := kv.Range(context.Background(), &pb.RangeRequest{Key: []byte(fmt.Sprintf("logged%d", i))})
		if err != nil {
			t.Fatalf("read after restart: %v", err)
		}
		if len(resp.GetKvs()) != 1 {
			t.Fatalf("linearizable read after restart misses logged write %d (revision %d)", i, resp.GetHeader().GetRevision())
		}
	}
}

// slowSyncFS delays every fsync once slow is set.
type slowSyncFS struct {
	vfs.FS
	delay time.Duration
	slow  atomic.Bool
}

func (fs *slowSyncFS) wrap(f vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	return &slowSyncFile{File: f, fs: fs}, nil
}

func (fs *slowSyncFS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	return fs.wrap(fs.FS.Create(name, c))
}

func (fs *slowSyncFS) ReuseForWrite(oldname, newname string, c vfs.DiskWriteCategory) (vfs.File, error) {
	return fs.wrap(fs.FS.ReuseForWrite(oldname, newname, c))
}

func (fs *slowSyncFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	return fs.wrap(fs.FS.OpenReadWrite(name, c, opts...))
}

type slowSyncFile struct {
	vfs.File
	fs *slowSyncFS
}

func (f *slowSyncFile) pause() {
	if f.fs.slow.Load() {
		time.Sleep(f.fs.delay)
	}
}

func (f *slowSyncFile) Sync() error     { f.pause(); return f.File.Sync() }
func (f *slowSyncFile) SyncData() error { f.pause(); return f.File.SyncData() }
func (f *slowSyncFile) SyncTo(n int64) (bool, error) {
	f.pause()
	return f.File.SyncTo(n)
}
