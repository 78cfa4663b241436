package main

import (
	"context"
	"io"
	"testing"
	"time"

	"connectrpc.com/connect"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/libs/inproc"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway"
	"github.com/kvmesh/kvmesh/services/replica"
)

// A request through the gateway is one trace, from the gateway's public handler
// through the internal call to the replica, the Raft proposal, its commit and the
// apply: over Connect and over gRPC (grpc-go's face).
func TestARequestIsOneTraceFromGatewayToApply(t *testing.T) {
	spans := tracetest.NewInMemoryExporter()
	tel, err := telemetry.New(context.Background(), "trace-test", telemetry.Config{LogLevel: "error", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	tel.WithTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans)))
	rep, err := replica.New(replica.Config{
		Name: "trace", DataDir: t.TempDir(), Listen: "127.0.0.1:0",
		PeerURLs: []string{"http://127.0.0.1:2380"}, ClientURLs: []string{"http://127.0.0.1:2379"},
		ClusterToken: "trace", TickInterval: 10 * time.Millisecond, ElectionTicks: 10,
		SnapshotCount: 10000, MaxRequestBytes: 1572864, MaxTxnOps: 128, RequestTimeout: 5 * time.Second,
		InitialClusterState: "new", LeaseCheckpointInterval: time.Second, LeaseRevokeRate: 1000,
	}, tel)
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Listen(); err != nil {
		t.Fatal(err)
	}
	go rep.Serve()
	t.Cleanup(func() { rep.Stop(context.Background()) })
	gw, err := gateway.New(gateway.Config{Listen: "127.0.0.1:0", Replicas: []string{"http://" + rep.Addr()},
		MaxRequestBytes: 1572864, WatchProgressNotifyInterval: time.Minute, WatchRingRevisions: 100,
		WatchRingBytes: 1 << 20, WatchStreamQueue: 16}, tel, inproc.NewClient(rep.Handler()))
	if err != nil {
		t.Fatal(err)
	}
	if err := gw.Listen(); err != nil {
		t.Fatal(err)
	}
	go gw.Serve()
	t.Cleanup(func() { gw.Stop(context.Background()) })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	connectKV := etcdserverpbconnect.NewKVClient(inproc.NewClient(gw.Handler()), "http://gateway")
	for {
		_, err := connectKV.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte("warm"), Value: []byte("up")}))
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the gateway never answered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.NewClient(gw.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	grpcKV := pb.NewKVClient(conn)

	for _, face := range []struct {
		name   string
		public string // the gateway's server span
		put    func() error
	}{
		{"connect", "etcdserverpb.KV/Put", func() error {
			_, err := connectKV.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte("k"), Value: []byte("v")}))
			return err
		}},
		{"grpc", "etcdserverpb.KV/Put", func() error {
			_, err := grpcKV.Put(ctx, &pb.PutRequest{Key: []byte("k"), Value: []byte("v")})
			return err
		}},
	} {
		t.Run(face.name, func(t *testing.T) {
			spans.Reset()
			if err := face.put(); err != nil {
				t.Fatal(err)
			}
			got := spans.GetSpans()
			byID := map[string]tracetest.SpanStub{}
			for _, s := range got {
				byID[s.SpanContext.SpanID().String()] = s
			}
			// The apply's chain of parents, up to the root.
			var chain []string
			var apply *tracetest.SpanStub
			for i := range got {
				if got[i].Name == "mvcc.apply" {
					apply = &got[i]
				}
			}
			if apply == nil {
				t.Fatalf("no mvcc.apply span among %d spans", len(got))
			}
			for s, ok := *apply, true; ok; s, ok = byID[s.Parent.SpanID().String()] {
				chain = append(chain, s.Name)
				if s.SpanContext.TraceID() != apply.SpanContext.TraceID() {
					t.Fatalf("span %s is in another trace", s.Name)
				}
			}
			want := []string{"mvcc.apply", "raft.propose", "kvmesh.replica.v1.KVService/Put", "kvmesh.replica.v1.KVService/Put", face.public}
			if len(chain) != len(want) {
				t.Fatalf("the apply's ancestry is %q; want %q", chain, want)
			}
			for i := range want {
				if chain[i] != want[i] {
					t.Fatalf("the apply's ancestry is %q; want %q", chain, want)
				}
			}
			for _, s := range got {
				if s.Name == "raft.commit" && s.SpanContext.TraceID() != apply.SpanContext.TraceID() {
					t.Fatal("raft.commit is in another trace")
				}
			}
		})
	}
}
