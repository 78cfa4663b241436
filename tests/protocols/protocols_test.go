// Package protocols checks, black-box against the real all-in-one binary, that every
// protocol kvmesh serves on its one client port works: gRPC (grpc-go clients, as etcd's
// clients are), Connect binary and JSON over h2c and HTTP/1.1, gRPC-Web, the gRPC
// health service, the plain HTTP endpoints, and Unimplemented for what is not built.
//
// It uses kvmesh's own generated clients, so it never links etcd's client (both
// register the etcdserverpb protobuf names); package e2e does the opposite.
package protocols

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/watch/v1/watchv1connect"
	"github.com/kvmesh/kvmesh/api/gen/v3electionpb"
	"github.com/kvmesh/kvmesh/api/gen/v3electionpb/v3electionpbconnect"
	"github.com/kvmesh/kvmesh/api/gen/v3lockpb"
	"github.com/kvmesh/kvmesh/api/gen/v3lockpb/v3lockpbconnect"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/tests/harness"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func start(t *testing.T) *harness.Server {
	t.Helper()
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("protocol tests are about kvmesh's own server")
	}
	return harness.StartKvmesh(t, harness.Options{Name: "protocols"})
}

// TestEveryProtocolReadsWhatAnotherWrote writes through one protocol and reads through
// the next, so each sees the others' writes.
func TestEveryProtocolReadsWhatAnotherWrote(t *testing.T) {
	srv := start(t)
	base := srv.ClientURL()

	conn, err := grpc.NewClient(srv.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	grpcKV := pb.NewKVClient(conn)

	h1 := &http.Client{Transport: &http.Transport{}} // HTTP/1.1 only
	clients := []struct {
		name string
		kv   etcdserverpbconnect.KVClient
	}{
		{"connect binary over h2c", etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), base)},
		{"connect JSON over h2c", etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), base, connect.WithProtoJSON())},
		{"connect binary over HTTP/1.1", etcdserverpbconnect.NewKVClient(h1, base)},
		{"gRPC-Web over HTTP/1.1", etcdserverpbconnect.NewKVClient(h1, base, connect.WithGRPCWeb())},
		{"gRPC-Web over h2c", etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), base, connect.WithGRPCWeb())},
		{"gRPC (connect-go client) over h2c", etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), base, connect.WithGRPC())},
	}
	prev := []byte("start")
	put, err := grpcKV.Put(ctxT(t), &pb.PutRequest{Key: []byte("proto"), Value: prev, PrevKv: true})
	if err != nil {
		t.Fatalf("grpc-go Put: %v", err)
	}
	rev := put.GetHeader().GetRevision()
	for _, c := range clients {
		got, err := c.kv.Range(ctxT(t), connect.NewRequest(&pb.RangeRequest{Key: []byte("proto")}))
		if err != nil {
			t.Fatalf("%s: Range: %v", c.name, err)
		}
		if kvs := got.Msg.GetKvs(); len(kvs) != 1 || !bytes.Equal(kvs[0].GetValue(), prev) || got.Msg.GetHeader().GetRevision() != rev {
			t.Fatalf("%s: Range = %v at revision %d, want %q at %d", c.name, kvs, got.Msg.GetHeader().GetRevision(), prev, rev)
		}
		val := []byte(c.name)
		resp, err := c.kv.Put(ctxT(t), connect.NewRequest(&pb.PutRequest{Key: []byte("proto"), Value: val, PrevKv: true}))
		if err != nil {
			t.Fatalf("%s: Put: %v", c.name, err)
		}
		if !bytes.Equal(resp.Msg.GetPrevKv().GetValue(), prev) || resp.Msg.GetHeader().GetRevision() != rev+1 {
			t.Fatalf("%s: Put answered prev %q revision %d, want prev %q revision %d", c.name, resp.Msg.GetPrevKv().GetValue(), resp.Msg.GetHeader().GetRevision(), prev, rev+1)
		}
		prev, rev = val, rev+1
	}
	got, err := grpcKV.Range(ctxT(t), &pb.RangeRequest{Key: []byte("proto")})
	if err != nil || len(got.GetKvs()) != 1 || !bytes.Equal(got.GetKvs()[0].GetValue(), prev) {
		t.Fatalf("grpc-go Range after all writes: %v, %v; want %q", got, err, prev)
	}
}

// TestConnectJSONWithCurlShapes checks the JSON face that the README tour uses:
// base64 bytes, 64-bit integers as strings, camelCase field names.
func TestConnectJSONWithCurlShapes(t *testing.T) {
	srv := start(t)
	post := func(path, body string) map[string]any {
		t.Helper()
		resp, err := http.Post(srv.ClientURL()+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST %s: %s %s", path, resp.Status, raw)
		}
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("POST %s: %v in %s", path, err, raw)
		}
		return m
	}
	post("/etcdserverpb.KV/Put", `{"key":"Zm9v","value":"YmFy"}`)
	m := post("/etcdserverpb.KV/Range", `{"key":"Zm9v"}`)
	kvs, _ := m["kvs"].([]any)
	if len(kvs) != 1 {
		t.Fatalf("range answered %v", m)
	}
	kv := kvs[0].(map[string]any)
	if kv["key"] != "Zm9v" || kv["value"] != "YmFy" || kv["modRevision"] != "2" || m["count"] != "1" {
		t.Fatalf("JSON range = %v; want key Zm9v, value YmFy, modRevision \"2\", count \"1\"", m)
	}
	// An error is Connect's JSON error with etcd's code and message.
	resp, err := http.Post(srv.ClientURL()+"/etcdserverpb.KV/Range", "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e struct{ Code, Message string }
	json.NewDecoder(resp.Body).Decode(&e)
	if resp.StatusCode != http.StatusBadRequest || e.Code != "invalid_argument" || e.Message != "etcdserver: key is not provided" {
		t.Fatalf("empty key over JSON: %s %+v", resp.Status, e)
	}
}

func TestHealthAndUnbuiltServices(t *testing.T) {
	srv := start(t)
	conn, err := grpc.NewClient(srv.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	h, err := healthpb.NewHealthClient(conn).Check(ctxT(t), &healthpb.HealthCheckRequest{})
	if err != nil || h.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("grpc.health.v1 Check: %v, %v; want SERVING", h, err)
	}
	if _, err := healthpb.NewHealthClient(conn).Check(ctxT(t), &healthpb.HealthCheckRequest{Service: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("health of an unknown service: %v, want NotFound", err)
	}

	// Not built yet (etcd 3.7's streaming range): it says so, over every protocol.
	rs, err := pb.NewKVClient(conn).RangeStream(ctxT(t), &pb.RangeRequest{Key: []byte("a")})
	if err == nil {
		_, err = rs.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("gRPC RangeStream: %v, want Unimplemented", err)
	}
	crs, err := etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), srv.ClientURL()).RangeStream(ctxT(t), connect.NewRequest(&pb.RangeRequest{Key: []byte("a")}))
	if err == nil {
		for crs.Receive() {
		}
		err = crs.Err()
	}
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeUnimplemented {
		t.Fatalf("Connect RangeStream: %v, want Unimplemented", err)
	}
	// Lock and Election are served over every protocol: a lock taken over gRPC holds
	// its key; Connect JSON sees the election's errors as etcd's (Unknown); an Observe
	// over Connect streams the leader.
	l, err := v3lockpb.NewLockClient(conn).Lock(ctxT(t), &v3lockpb.LockRequest{Name: []byte("l")})
	if err != nil || !strings.HasPrefix(string(l.GetKey()), "l/") {
		t.Fatalf("gRPC Lock: %v, %v; want a key under l/", l, err)
	}
	if _, err := v3lockpbconnect.NewLockClient(h2c.NewClient(nil), srv.ClientURL()).Unlock(ctxT(t), connect.NewRequest(&v3lockpb.UnlockRequest{Key: l.GetKey()})); err != nil {
		t.Fatalf("Connect Unlock: %v", err)
	}
	elc := v3electionpbconnect.NewElectionClient(h2c.NewClient(nil), srv.ClientURL(), connect.WithProtoJSON())
	if _, err := elc.Leader(ctxT(t), connect.NewRequest(&v3electionpb.LeaderRequest{Name: []byte("e")})); !errors.As(err, &ce) || ce.Code() != connect.CodeUnknown || ce.Message() != "election: no leader" {
		t.Fatalf("Connect JSON Leader of no election: %v, want Unknown: election: no leader", err)
	}
	camp, err := v3electionpb.NewElectionClient(conn).Campaign(ctxT(t), &v3electionpb.CampaignRequest{Name: []byte("e"), Value: []byte("me")})
	if err != nil {
		t.Fatalf("gRPC Campaign: %v", err)
	}
	// (A Connect server stream answers its headers with its first message.)
	obs, err := elc.Observe(ctxT(t), connect.NewRequest(&v3electionpb.LeaderRequest{Name: []byte("e")}))
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()
	if !obs.Receive() || string(obs.Msg().GetKv().GetValue()) != "me" {
		t.Fatalf("Connect JSON Observe: %v %v", obs.Msg(), obs.Err())
	}
	if _, err := elc.Proclaim(ctxT(t), connect.NewRequest(&v3electionpb.ProclaimRequest{Leader: camp.GetLeader(), Value: []byte("again")})); err != nil {
		t.Fatalf("Connect JSON Proclaim: %v", err)
	}
	if !obs.Receive() || string(obs.Msg().GetKv().GetValue()) != "again" {
		t.Fatalf("Connect JSON Observe after Proclaim: %v %v", obs.Msg(), obs.Err())
	}
	// Auth is served over every protocol too.
	if st, err := pb.NewAuthClient(conn).AuthStatus(ctxT(t), &pb.AuthStatusRequest{}); err != nil || st.GetEnabled() || st.GetAuthRevision() != 1 {
		t.Fatalf("gRPC AuthStatus: %v, %v; want disabled at auth revision 1", st, err)
	}
	st, err := etcdserverpbconnect.NewAuthClient(h2c.NewClient(nil), srv.ClientURL(), connect.WithProtoJSON()).AuthStatus(ctxT(t), connect.NewRequest(&pb.AuthStatusRequest{}))
	if err != nil || st.Msg.GetEnabled() || st.Msg.GetAuthRevision() != 1 {
		t.Fatalf("Connect JSON AuthStatus: %v, %v; want disabled at auth revision 1", st, err)
	}

	for path, want := range map[string]string{
		"/health":         `{"health":"true","reason":""}`,
		"/livez":          "ok\n",
		"/readyz?verbose": "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nok\n",
		"/metrics":        "etcd_server_has_leader 1",
	} {
		resp, err := http.Get(srv.ClientURL() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Fatalf("GET %s: %s, body lacks %q:\n%.500s", path, resp.Status, want, body)
		}
	}
	resp, err := http.Get(srv.ClientURL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `grpc_server_handled_total{grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health",grpc_type="unary"} 1`) {
		t.Fatalf("/metrics does not count the health check under etcd's gRPC metric names")
	}
}

// TestBadConfigurationFailsWithOneLine starts the binary with bad settings: it must
// exit at once, with one line naming the variable.
// TestWatchOverConnect watches through the faces that etcd's clients do not use:
// etcd's bidi Watch over Connect on h2c, and kvmesh's server-streaming WatchService over
// HTTP/1.1 (what a browser can hold), in the Connect protocol with JSON.
func TestWatchOverConnect(t *testing.T) {
	srv := start(t)
	base := srv.ClientURL()
	kv := etcdserverpbconnect.NewKVClient(h2c.NewClient(nil), base)
	ctx := ctxT(t)

	bidi := etcdserverpbconnect.NewWatchClient(h2c.NewClient(nil), base).Watch(ctx)
	if err := bidi.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{Key: []byte("pw/"), RangeEnd: []byte("pw0"), PrevKv: true}}}); err != nil {
		t.Fatal(err)
	}
	created, err := bidi.Receive()
	if err != nil || !created.GetCreated() || created.GetWatchId() != 0 {
		t.Fatalf("Connect bidi Watch create: %v, %v", created, err)
	}

	one, err := watchv1connect.NewWatchServiceClient(http.DefaultClient, base, connect.WithProtoJSON()).Watch(ctx, connect.NewRequest(&pb.WatchCreateRequest{Key: []byte("pw/a")}))
	if err != nil {
		t.Fatal(err)
	}
	if !one.Receive() || !one.Msg().GetCreated() {
		t.Fatalf("server-streaming Watch over HTTP/1.1: %v, %v", one.Msg(), one.Err())
	}

	for _, v := range []string{"1", "2"} {
		if _, err := kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte("pw/a"), Value: []byte(v)})); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"1", "2"} {
		ev, err := bidi.Receive()
		if err != nil || len(ev.GetEvents()) != 1 || string(ev.GetEvents()[0].GetKv().GetValue()) != want {
			t.Fatalf("Connect bidi Watch: %v, %v; want the put of %s", ev, err, want)
		}
		if want == "2" && string(ev.GetEvents()[0].GetPrevKv().GetValue()) != "1" {
			t.Fatalf("Connect bidi Watch: prev_kv %v, want 1", ev.GetEvents()[0].GetPrevKv())
		}
		if !one.Receive() || len(one.Msg().GetEvents()) != 1 || string(one.Msg().GetEvents()[0].GetKv().GetValue()) != want {
			t.Fatalf("server-streaming Watch: %v, %v; want the put of %s", one.Msg(), one.Err(), want)
		}
	}
	bidi.CloseRequest()
	one.Close()
}

func TestBadConfigurationFailsWithOneLine(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("about kvmesh's own configuration")
	}
	bin, err := harness.KvmeshBinary()
	if err != nil {
		t.Fatal(err)
	}
	for variable, value := range map[string]string{
		"KVMESH_REPLICA_TICK_INTERVAL":     "soon",
		"KVMESH_REPLICA_ELECTION_TICKS":    "1",
		"KVMESH_GATEWAY_LISTEN":            "nowhere",
		"KVMESH_GATEWAY_MAX_REQUEST_BYTES": "-5",
		"KVMESH_LOG_LEVEL":                 "loud",
	} {
		cmd := exec.Command(bin)
		cmd.Env = append(cmd.Environ(), "KVMESH_REPLICA_DATA_DIR="+t.TempDir(), variable+"="+value)
		out, err := cmd.CombinedOutput()
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if err == nil || len(lines) != 1 || !strings.Contains(lines[0], variable) {
			t.Errorf("%s=%s: exit %v, output %q; want failure with one line naming %s", variable, value, err, out, variable)
		}
	}
}

// TestLeaseOverConnect grants a lease with Connect JSON, keeps it alive over a Connect
// bidi stream, and reads its TTL over gRPC-Web.
func TestLeaseOverConnect(t *testing.T) {
	srv := start(t)
	base := srv.ClientURL()
	ctx := ctxT(t)
	g, err := etcdserverpbconnect.NewLeaseClient(http.DefaultClient, base, connect.WithProtoJSON()).LeaseGrant(ctx, connect.NewRequest(&pb.LeaseGrantRequest{TTL: 30}))
	if err != nil || g.Msg.GetID() == 0 || g.Msg.GetTTL() != 30 {
		t.Fatalf("Connect JSON LeaseGrant: %v, %v", g, err)
	}
	id := g.Msg.GetID()
	bidi := etcdserverpbconnect.NewLeaseClient(h2c.NewClient(nil), base).LeaseKeepAlive(ctx)
	for range 3 {
		if err := bidi.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
			t.Fatal(err)
		}
		ka, err := bidi.Receive()
		if err != nil || ka.GetID() != id || ka.GetTTL() != 30 || ka.GetHeader().GetRevision() == 0 {
			t.Fatalf("Connect bidi LeaseKeepAlive: %v, %v", ka, err)
		}
	}
	bidi.CloseRequest()
	ttl, err := etcdserverpbconnect.NewLeaseClient(http.DefaultClient, base, connect.WithGRPCWeb()).LeaseTimeToLive(ctx, connect.NewRequest(&pb.LeaseTimeToLiveRequest{ID: id}))
	if err != nil || ttl.Msg.GetGrantedTTL() != 30 || ttl.Msg.GetTTL() < 28 {
		t.Fatalf("gRPC-Web LeaseTimeToLive: %v, %v", ttl, err)
	}
}
