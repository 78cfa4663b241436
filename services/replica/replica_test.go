package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"connectrpc.com/connect"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/kvmesh/kvmesh/libs/etcderr"
	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/gen/kvmesh/replica/v1/replicav1connect"
	"github.com/kvmesh/kvmesh/libs/inproc"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// testReplica is a replica in a temporary directory, reached over its internal Connect
// API through the in-process transport.
type testReplica struct {
	t     *testing.T
	cfg   Config
	r     *Replica
	kv    replicav1connect.KVServiceClient
	maint replicav1connect.MaintenanceServiceClient
	spans *tracetest.InMemoryExporter
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
	client := inproc.Client(r.Handler())
	tr := &testReplica{t: t, cfg: cfg, r: r, spans: spans,
		kv:    replicav1connect.NewKVServiceClient(client, "http://replica", tel.InternalClient()...),
		maint: replicav1connect.NewMaintenanceServiceClient(client, "http://replica", tel.InternalClient()...),
	}
	t.Cleanup(func() { tr.stop() })
	tr.waitLeader()
	return tr
}

func (tr *testReplica) stop() {
	if tr.r == nil {
		return
	}
	if err := tr.r.Stop(context.Background()); err != nil {
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
		st, err := tr.maint.Status(context.Background(), connect.NewRequest(&pb.StatusRequest{}))
		if err == nil && st.Msg.GetLeader() == tr.r.ID() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	tr.t.Fatal("the single replica did not become leader within 10s")
}

func (tr *testReplica) put(key, val string) *pb.PutResponse {
	tr.t.Helper()
	resp, err := tr.kv.Put(context.Background(), connect.NewRequest(&pb.PutRequest{Key: []byte(key), Value: []byte(val)}))
	if err != nil {
		tr.t.Fatalf("put %q: %v", key, err)
	}
	return resp.Msg
}

func (tr *testReplica) get(key string, rev int64) *pb.RangeResponse {
	tr.t.Helper()
	resp, err := tr.kv.Range(context.Background(), connect.NewRequest(&pb.RangeRequest{Key: []byte(key), Revision: rev}))
	if err != nil {
		tr.t.Fatalf("get %q at %d: %v", key, rev, err)
	}
	return resp.Msg
}

func testConfig(t *testing.T) Config {
	return Config{
		Name: "test", DataDir: t.TempDir(), Listen: "127.0.0.1:0",
		PeerURLs: []string{"http://127.0.0.1:2380"}, ClientURLs: []string{"http://127.0.0.1:2379"},
		ClusterToken: "test", TickInterval: 10 * time.Millisecond, ElectionTicks: 10,
		SnapshotCount: 10000, MaxRequestBytes: 1572864, MaxTxnOps: 128, RequestTimeout: 5 * time.Second,
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
			_, err := tr.kv.Put(ctx, connect.NewRequest(&pb.PutRequest{}))
			return err
		}, etcderr.ErrEmptyKey},
		{"request too large", func() error {
			_, err := tr.kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte("k"), Value: make([]byte, 2000)}))
			return err
		}, etcderr.ErrRequestTooLarge},
		{"too many ops", func() error {
			ops := make([]*pb.RequestOp, 5)
			for i := range ops {
				ops[i] = &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte{byte('a' + i)}}}}
			}
			_, err := tr.kv.Txn(ctx, connect.NewRequest(&pb.TxnRequest{Success: ops}))
			return err
		}, etcderr.ErrTooManyOps},
		{"invalid sort", func() error {
			_, err := tr.kv.Range(ctx, connect.NewRequest(&pb.RangeRequest{Key: []byte("k"), SortOrder: 9}))
			return err
		}, etcderr.ErrInvalidSortOption},
	}
	for _, c := range cases {
		err := c.call()
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != c.want.Code() || ce.Message() != c.want.Error() {
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
	tr.put("traced", "v")
	byName := map[string]tracetest.SpanStub{}
	for _, s := range tr.spans.GetSpans() {
		byName[s.Name] = s
	}
	for _, name := range []string{"kvmesh.replica.v1.KVService/Put", "raft.propose", "raft.commit", "mvcc.apply"} {
		if _, ok := byName[name]; !ok {
			t.Fatalf("no %q span among %v", name, byName)
		}
	}
	trace := byName["kvmesh.replica.v1.KVService/Put"].SpanContext.TraceID()
	for _, name := range []string{"raft.propose", "raft.commit", "mvcc.apply"} {
		if got := byName[name].SpanContext.TraceID(); got != trace {
			t.Errorf("span %q is in trace %s, want the request's trace %s", name, got, trace)
		}
	}
	if byName["mvcc.apply"].Parent.SpanID() != byName["raft.propose"].SpanContext.SpanID() {
		t.Errorf("mvcc.apply's parent is %s, want raft.propose %s", byName["mvcc.apply"].Parent.SpanID(), byName["raft.propose"].SpanContext.SpanID())
	}
}
