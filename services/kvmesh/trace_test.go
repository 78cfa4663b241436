package main

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/fanout"
	"github.com/kvmesh/kvmesh/services/gateway"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
	"github.com/kvmesh/kvmesh/services/replica"
)

// A request through the gateway is one trace, from the gateway's public handler
// through the internal call to the replica (in process, or over grpc-go with the
// replica's span for the call), the Raft proposal, its commit and the apply: over Connect and
// over gRPC (grpc-go's face).
func TestARequestIsOneTraceFromGatewayToApply(t *testing.T) {
	tel, spans := tracedTelemetry(t)
	rcfg, gcfg, _, _ := defaultConfigs(t)
	rep := startReplica(t, rcfg, tel)
	gcfg.Replicas = []string{"http://" + rep.Addr()}
	network := replicaapi.Network{Options: tel.GRPCInternalClient()}
	for _, link := range []struct {
		name     string
		dial     replicaapi.Dialer
		internal []string // the internal call's spans
	}{
		{"in-process", rep.Dialer(network), nil},
		// The replica's span for the call on the gateway's Batch stream.
		{"network", network, []string{"kvmesh.replica.v1.KVService/Put"}},
	} {
		t.Run(link.name, func(t *testing.T) { testRequestTrace(t, tel, spans, gcfg, link.dial, link.internal) })
	}
}

func testRequestTrace(t *testing.T, rtel *telemetry.Telemetry, spans *tracetest.InMemoryExporter, gcfg gateway.Config, dial replicaapi.Dialer, internal []string) {
	// Each gateway its own metrics, the replica's spans too.
	tel, err := telemetry.New(context.Background(), "trace-test", telemetry.Config{LogLevel: "error", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	tel.WithTracerProvider(rtel.Tracer)
	gw, err := gateway.New(gcfg, tel, dial)
	if err != nil {
		t.Fatal(err)
	}
	if err := gw.Listen(); err != nil {
		t.Fatal(err)
	}
	runRole(t, gw)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	connectKV := etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), "http://"+gw.Addr())
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
			want := append(append([]string{"mvcc.apply", "raft.propose"}, internal...), face.public)
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

// A revision that a watcher receives is one trace from the fanout to the gateway:
// "fanout.publish" (the fanout, until JetStream acknowledges it), "watch.deliver" (the
// gateway's hub taking it from NATS, its context from the message's headers) and
// "watch.send" (the watch stream sending it to its client). Background polls between
// the services record no spans at all.
func TestAWatchedRevisionIsOneTraceFromFanoutToGateway(t *testing.T) {
	tel, spans := tracedTelemetry(t)
	rcfg, gcfg, fcfg, ncfg := defaultConfigs(t)
	rep := startReplica(t, rcfg, tel)
	embedded, err := revstream.StartEmbedded(filepath.Join(rcfg.DataDir, "nats"), "", nil, false, tel.Log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(embedded.Stop)
	nc, err := nats.Connect("", nats.InProcessServer(embedded))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)

	dial := rep.Dialer(replicaapi.Network{})
	gcfg.Replicas = []string{"http://" + rep.Addr()}
	fcfg.Replicas = gcfg.Replicas
	gw, err := gateway.New(gcfg, tel, dial)
	if err != nil {
		t.Fatal(err)
	}
	src, err := watch.JetStream(nc, ncfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := gw.EnableWatch(src); err != nil {
		t.Fatal(err)
	}
	if err := gw.Listen(); err != nil {
		t.Fatal(err)
	}
	runRole(t, gw)
	fo, err := fanout.New(fcfg, ncfg, tel, dial, nc)
	if err != nil {
		t.Fatal(err)
	}
	runRole(t, fo)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.NewClient(gw.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kv := pb.NewKVClient(conn)
	for {
		if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("warm"), Value: []byte("up")}); err == nil {
			break
		} else if ctx.Err() != nil {
			t.Fatalf("the gateway never answered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	w, err := pb.NewWatchClient(conn).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("watched")}}}); err != nil {
		t.Fatal(err)
	}
	if resp, err := w.Recv(); err != nil || !resp.GetCreated() {
		t.Fatalf("watch create: %v, %v", resp, err)
	}
	put, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("watched"), Value: []byte("v")})
	if err != nil {
		t.Fatal(err)
	}
	rev := put.GetHeader().GetRevision()
	resp, err := w.Recv()
	if err != nil || len(resp.GetEvents()) != 1 || resp.GetEvents()[0].GetKv().GetModRevision() != rev {
		t.Fatalf("watch: %v, %v; want the put at revision %d", resp, err, rev)
	}

	// watch.send ends just after the response is sent, and fanout.publish when
	// JetStream's acknowledgement reaches the fanout, which may be after the gateway
	// delivered the revision: wait for all three.
	var got []tracetest.SpanStub
	find := func(name string) *tracetest.SpanStub {
		for i := range got {
			if got[i].Name != name {
				continue
			}
			for _, a := range got[i].Attributes {
				if a.Key == "kvmesh.revision" && a.Value.AsInt64() == rev {
					return &got[i]
				}
			}
		}
		return nil
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		got = spans.GetSpans()
		if find("fanout.publish") != nil && find("watch.deliver") != nil && find("watch.send") != nil || time.Now().After(deadline) {
			break
		}
	}
	publish, deliver, send := find("fanout.publish"), find("watch.deliver"), find("watch.send")
	if publish == nil || deliver == nil || send == nil {
		var names []string
		for _, s := range got {
			names = append(names, s.Name)
		}
		t.Fatalf("spans for revision %d: publish %v, deliver %v, send %v; all spans: %q", rev, publish != nil, deliver != nil, send != nil, names)
	}
	if publish.Parent.IsValid() {
		t.Errorf("fanout.publish has a parent (%s); it starts the revision's trace", publish.Parent.SpanID())
	}
	if deliver.Parent.SpanID() != publish.SpanContext.SpanID() || deliver.SpanContext.TraceID() != publish.SpanContext.TraceID() {
		t.Errorf("watch.deliver is not a child of fanout.publish")
	}
	if send.Parent.SpanID() != deliver.SpanContext.SpanID() || send.SpanContext.TraceID() != publish.SpanContext.TraceID() {
		t.Errorf("watch.send is not a child of watch.deliver")
	}
	// Since the start, the gateway's view has polled the replica (MemberList, Status)
	// and the hub and fanout have asked for its position: none of it was recorded.
	for _, s := range got {
		for _, background := range []string{"MaintenanceService/Status", "ClusterService/MemberList", "FeedService/Position"} {
			if strings.HasSuffix(s.Name, background) {
				t.Errorf("a background poll recorded a span: %s", s.Name)
			}
		}
	}
}

// tracedTelemetry is telemetry whose spans go to an in-memory exporter.
func tracedTelemetry(t *testing.T) (*telemetry.Telemetry, *tracetest.InMemoryExporter) {
	t.Helper()
	spans := tracetest.NewInMemoryExporter()
	tel, err := telemetry.New(context.Background(), "trace-test", telemetry.Config{LogLevel: "error", LogFormat: "text"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	tel.WithTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans)))
	return tel, spans
}

// defaultConfigs are the services' configurations with their defaults, on free ports,
// with a fast Raft tick.
func defaultConfigs(t *testing.T) (rcfg replica.Config, gcfg gateway.Config, fcfg fanout.Config, ncfg revstream.Config) {
	t.Helper()
	defaults := config.MapLookuper(nil)
	for prefix, v := range map[string]any{"KVMESH_REPLICA_": &rcfg, "KVMESH_GATEWAY_": &gcfg, "KVMESH_FANOUT_": &fcfg, "KVMESH_NATS_": &ncfg} {
		if err := config.LoadFrom(context.Background(), prefix, defaults, v); err != nil {
			t.Fatal(err)
		}
	}
	// The replica's peer URL is where it listens: gateways reach it there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	rcfg.DataDir, rcfg.Listen, rcfg.TickInterval = t.TempDir(), addr, 10*time.Millisecond
	rcfg.PeerURLs = []string{"http://" + addr}
	gcfg.Listen, fcfg.Listen = "127.0.0.1:0", ""
	return
}

// startReplica starts a single-member replica, stopped when the test ends.
func startReplica(t *testing.T, cfg replica.Config, tel *telemetry.Telemetry) *replica.Replica {
	t.Helper()
	rep, err := replica.New(cfg, tel)
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Listen(); err != nil {
		t.Fatal(err)
	}
	runRole(t, rep)
	return rep
}

// runRole runs role until the test ends, once it is ready when it tells.
func runRole(t *testing.T, role lifecycle.Role) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- role.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	if r, ok := role.(lifecycle.Readier); ok {
		select {
		case <-r.Ready():
		case err := <-done:
			t.Fatalf("run: %v", err)
		}
	}
}
