package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/libs/etcderr"
	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/gen/etcdserverpb/etcdserverpbconnect"
	healthv1 "google.golang.org/grpc/health/grpc_health_v1"
)

// forward calls a replica with the client's message and returns the replica's answer
// as the client's, with etcd's error code and message preserved.
func forward[Req, Res any](ctx context.Context, call func(context.Context, *connect.Request[Req]) (*connect.Response[Res], error), req *connect.Request[Req]) (*connect.Response[Res], error) {
	resp, err := call(ctx, connect.NewRequest(req.Msg))
	if err != nil {
		return nil, etcderr.ToConnect(err)
	}
	return connect.NewResponse(resp.Msg), nil
}

// kvHandler serves etcdserverpb.KV. RangeStream is etcd 3.7's streaming range; it is
// not built yet and answers Unimplemented.
type kvHandler struct{ g *Gateway }

func (h *kvHandler) Range(ctx context.Context, req *connect.Request[pb.RangeRequest]) (*connect.Response[pb.RangeResponse], error) {
	return forward(ctx, h.g.kv.Range, req)
}

func (h *kvHandler) RangeStream(ctx context.Context, req *connect.Request[pb.RangeRequest], stream *connect.ServerStream[pb.RangeStreamResponse]) error {
	return etcdserverpbconnect.UnimplementedKVHandler{}.RangeStream(ctx, req, stream)
}

func (h *kvHandler) Put(ctx context.Context, req *connect.Request[pb.PutRequest]) (*connect.Response[pb.PutResponse], error) {
	return forward(ctx, h.g.kv.Put, req)
}

func (h *kvHandler) DeleteRange(ctx context.Context, req *connect.Request[pb.DeleteRangeRequest]) (*connect.Response[pb.DeleteRangeResponse], error) {
	return forward(ctx, h.g.kv.DeleteRange, req)
}

func (h *kvHandler) Txn(ctx context.Context, req *connect.Request[pb.TxnRequest]) (*connect.Response[pb.TxnResponse], error) {
	return forward(ctx, h.g.kv.Txn, req)
}

func (h *kvHandler) Compact(ctx context.Context, req *connect.Request[pb.CompactionRequest]) (*connect.Response[pb.CompactionResponse], error) {
	return forward(ctx, h.g.kv.Compact, req)
}

// clusterHandler serves etcdserverpb.Cluster; membership changes come with the
// replicated-cluster work and answer Unimplemented until then.
type clusterHandler struct {
	etcdserverpbconnect.UnimplementedClusterHandler
	g *Gateway
}

func (h *clusterHandler) MemberList(ctx context.Context, req *connect.Request[pb.MemberListRequest]) (*connect.Response[pb.MemberListResponse], error) {
	return forward(ctx, h.g.cluster.MemberList, req)
}

// maintenanceHandler serves etcdserverpb.Maintenance; only Status is built so far.
type maintenanceHandler struct {
	etcdserverpbconnect.UnimplementedMaintenanceHandler
	g *Gateway
}

func (h *maintenanceHandler) Status(ctx context.Context, req *connect.Request[pb.StatusRequest]) (*connect.Response[pb.StatusResponse], error) {
	return forward(ctx, h.g.maint.Status, req)
}

// healthCheck serves grpc.health.v1.Health/Check: the server ("" service) is SERVING
// while its replica has a leader. The messages are grpc-go's: grpc-go is linked anyway
// (by the OTLP exporter) and registers them, so kvmesh cannot register its own copy.
func (g *Gateway) healthCheck(ctx context.Context, req *connect.Request[healthv1.HealthCheckRequest]) (*connect.Response[healthv1.HealthCheckResponse], error) {
	if req.Msg.GetService() != "" {
		return nil, connect.NewError(connect.CodeNotFound, errUnknownService)
	}
	status := healthv1.HealthCheckResponse_SERVING
	if err := g.check(ctx); err != nil {
		status = healthv1.HealthCheckResponse_NOT_SERVING
	}
	return connect.NewResponse(&healthv1.HealthCheckResponse{Status: status}), nil
}

var errUnknownService = errorString("unknown service")

type errorString string

func (e errorString) Error() string { return string(e) }

// check is etcd's health check: a leader exists and a serializable read succeeds.
func (g *Gateway) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := g.maint.Status(ctx, connect.NewRequest(&pb.StatusRequest{}))
	if err != nil {
		return err
	}
	if st.Msg.GetLeader() == 0 {
		return etcderr.ErrNoLeader
	}
	_, err = g.kv.Range(ctx, connect.NewRequest(&pb.RangeRequest{Key: []byte("health"), Serializable: true}))
	return err
}

// serveHealth answers /health as etcd does: {"health":"true","reason":""}.
func (g *Gateway) serveHealth(w http.ResponseWriter, r *http.Request) {
	type health struct {
		Health string `json:"health"`
		Reason string `json:"reason"`
	}
	w.Header().Set("Content-Type", "application/json")
	if err := g.check(r.Context()); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(health{Health: "false", Reason: err.Error()})
		return
	}
	json.NewEncoder(w).Encode(health{Health: "true"})
}

func (g *Gateway) serveReady(w http.ResponseWriter, r *http.Request) {
	if err := g.check(r.Context()); err != nil {
		http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte("ok"))
}
