package gateway

import (
	"context"

	"connectrpc.com/connect"
	healthv1 "google.golang.org/grpc/health/grpc_health_v1"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// The Connect face of the public API (Connect, gRPC-Web, and gRPC over HTTP/1.1 or
// h2c connections that start with another protocol).

func unary[Req, Res any](ctx context.Context, req *connect.Request[Req], fn func(context.Context, *Req) (*Res, error)) (*connect.Response[Res], error) {
	if req.Header().Get(hasLeaderKey) == "true" {
		ctx = withRequireLeader(ctx)
	}
	ctx = withCredentials(ctx, req.Header().Get)
	res, err := fn(ctx, req.Msg)
	if err != nil {
		return nil, etcderr.ToConnect(err)
	}
	return connect.NewResponse(res), nil
}

// connectKV serves etcdserverpb.KV. RangeStream (etcd 3.7's streaming range) is not
// built yet and answers Unimplemented.
type connectKV struct {
	etcdserverpbconnect.UnimplementedKVHandler
	g *Gateway
}

func (h connectKV) Range(ctx context.Context, r *connect.Request[pb.RangeRequest]) (*connect.Response[pb.RangeResponse], error) {
	return unary(ctx, r, h.g.Range)
}

func (h connectKV) Put(ctx context.Context, r *connect.Request[pb.PutRequest]) (*connect.Response[pb.PutResponse], error) {
	return unary(ctx, r, h.g.Put)
}

func (h connectKV) DeleteRange(ctx context.Context, r *connect.Request[pb.DeleteRangeRequest]) (*connect.Response[pb.DeleteRangeResponse], error) {
	return unary(ctx, r, h.g.DeleteRange)
}

func (h connectKV) Txn(ctx context.Context, r *connect.Request[pb.TxnRequest]) (*connect.Response[pb.TxnResponse], error) {
	return unary(ctx, r, h.g.Txn)
}

func (h connectKV) Compact(ctx context.Context, r *connect.Request[pb.CompactionRequest]) (*connect.Response[pb.CompactionResponse], error) {
	return unary(ctx, r, h.g.Compact)
}

// connectCluster serves etcdserverpb.Cluster.
type connectCluster struct {
	etcdserverpbconnect.UnimplementedClusterHandler
	g *Gateway
}

func (h connectCluster) MemberList(ctx context.Context, r *connect.Request[pb.MemberListRequest]) (*connect.Response[pb.MemberListResponse], error) {
	return unary(ctx, r, h.g.MemberList)
}

func (h connectCluster) MemberAdd(ctx context.Context, r *connect.Request[pb.MemberAddRequest]) (*connect.Response[pb.MemberAddResponse], error) {
	return unary(ctx, r, h.g.MemberAdd)
}

func (h connectCluster) MemberRemove(ctx context.Context, r *connect.Request[pb.MemberRemoveRequest]) (*connect.Response[pb.MemberRemoveResponse], error) {
	return unary(ctx, r, h.g.MemberRemove)
}

func (h connectCluster) MemberUpdate(ctx context.Context, r *connect.Request[pb.MemberUpdateRequest]) (*connect.Response[pb.MemberUpdateResponse], error) {
	return unary(ctx, r, h.g.MemberUpdate)
}

func (h connectCluster) MemberPromote(ctx context.Context, r *connect.Request[pb.MemberPromoteRequest]) (*connect.Response[pb.MemberPromoteResponse], error) {
	return unary(ctx, r, h.g.MemberPromote)
}

// connectMaintenance serves etcdserverpb.Maintenance: Status, Hash, HashKV and
// MoveLeader so far (Alarm, Defragment, Snapshot and Downgrade answer Unimplemented).
type connectMaintenance struct {
	etcdserverpbconnect.UnimplementedMaintenanceHandler
	g *Gateway
}

func (h connectMaintenance) HashKV(ctx context.Context, r *connect.Request[pb.HashKVRequest]) (*connect.Response[pb.HashKVResponse], error) {
	return unary(ctx, r, h.g.HashKV)
}

func (h connectMaintenance) Status(ctx context.Context, r *connect.Request[pb.StatusRequest]) (*connect.Response[pb.StatusResponse], error) {
	return unary(ctx, r, h.g.Status)
}

func (h connectMaintenance) Hash(ctx context.Context, r *connect.Request[pb.HashRequest]) (*connect.Response[pb.HashResponse], error) {
	return unary(ctx, r, h.g.Hash)
}

func (h connectMaintenance) MoveLeader(ctx context.Context, r *connect.Request[pb.MoveLeaderRequest]) (*connect.Response[pb.MoveLeaderResponse], error) {
	return unary(ctx, r, h.g.MoveLeader)
}

// hasLeaderKey is the metadata by which clientv3 (WithRequireLeader) asks for a fast
// "no leader" failure.
const hasLeaderKey = "hasleader"

const healthCheckPath = "/grpc.health.v1.Health/Check"

// connectHealthCheck serves grpc.health.v1.Health/Check over Connect. The messages are
// grpc-go's: grpc-go is linked anyway and registers them, so kvmesh cannot register its
// own copy.
func (g *Gateway) connectHealthCheck(ctx context.Context, req *connect.Request[healthv1.HealthCheckRequest]) (*connect.Response[healthv1.HealthCheckResponse], error) {
	return unary(ctx, req, g.healthCheck)
}

// healthCheck: the server ("" service) is SERVING while its replica has a leader.
func (g *Gateway) healthCheck(ctx context.Context, req *healthv1.HealthCheckRequest) (*healthv1.HealthCheckResponse, error) {
	if req.GetService() != "" {
		return nil, connect.NewError(connect.CodeNotFound, errUnknownService)
	}
	status := healthv1.HealthCheckResponse_SERVING
	if err := g.check(ctx); err != nil {
		status = healthv1.HealthCheckResponse_NOT_SERVING
	}
	return &healthv1.HealthCheckResponse{Status: status}, nil
}

var errUnknownService = errorString("unknown service")

type errorString string

func (e errorString) Error() string { return string(e) }
