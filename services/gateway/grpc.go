package gateway

import (
	"context"
	"math"

	"google.golang.org/grpc"
	healthv1 "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	tenantv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/tenant/v1"
	"github.com/kvmesh/kvmesh/api/gen/v3electionpb"
	"github.com/kvmesh/kvmesh/api/gen/v3lockpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
)

// The gRPC face of the public API, on grpc-go's own HTTP/2 transport. Connections whose
// first request is gRPC (every etcd client) are handed to this server by the listener
// in libs/grpcsplit: grpc-go serves a unary call for about a third of the CPU that connect-go
// on net/http's HTTP/2 server needs (BENCHMARKS.md), and that is the difference
// between keeping up with etcd and not.

func (g *Gateway) newGRPCServer() *grpc.Server {
	opts := append(g.tel.GRPCServer(),
		// The listener terminates TLS; handlers see the client's certificate.
		grpc.Creds(meshtls.TerminatedCredentials()),
		grpc.MaxRecvMsgSize(g.cfg.MaxRequestBytes+grpcOverheadBytes),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.MaxConcurrentStreams(math.MaxUint32),
		// Reused workers keep their grown stacks; a fresh goroutine per call would
		// grow its stack through the whole gateway-replica call chain every time.
		grpc.NumStreamWorkers(streamWorkers),
		// Protobuf, and watch responses already in wire form (watchenc.go).
		grpc.ForceServerCodecV2(watch.Codec()),
	)
	s := grpc.NewServer(opts...)
	pb.RegisterKVServer(s, grpcKV{g: g})
	pb.RegisterClusterServer(s, grpcCluster{g: g})
	pb.RegisterMaintenanceServer(s, grpcMaintenance{g: g})
	pb.RegisterWatchServer(s, grpcWatch{g: g})
	pb.RegisterLeaseServer(s, grpcLease{g: g})
	pb.RegisterAuthServer(s, grpcAuth{g: g})
	tenantv1.RegisterTenantServiceServer(s, grpcTenant{g: g})
	v3lockpb.RegisterLockServer(s, grpcLock{g: g})
	v3electionpb.RegisterElectionServer(s, grpcElection{g: g})
	healthv1.RegisterHealthServer(s, grpcHealth{g: g})
	return s
}

// streamWorkers is how many goroutines grpc-go keeps for serving calls; calls beyond
// them get goroutines of their own. Calls wait for Raft, so many are in flight.
const streamWorkers = 1024

// grpcContext carries what a gRPC call's metadata asks of the gateway (hasleader).
func grpcContext(ctx context.Context) context.Context {
	// ValueFromIncomingContext looks keys up without copying the whole metadata.
	get := func(k string) string {
		if v := metadata.ValueFromIncomingContext(ctx, k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	if get(hasLeaderKey) == "true" {
		ctx = withRequireLeader(ctx)
	}
	return withCredentials(ctx, get)
}

func grpcUnary[Req, Res any](ctx context.Context, req *Req, fn func(context.Context, *Req) (*Res, error)) (*Res, error) {
	res, err := fn(grpcContext(ctx), req)
	if err != nil {
		return nil, etcderr.ToGRPC(err)
	}
	return res, nil
}

type grpcKV struct {
	pb.UnimplementedKVServer
	g *Gateway
}

func (s grpcKV) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	return grpcUnary(ctx, r, s.g.Range)
}

func (s grpcKV) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	return grpcUnary(ctx, r, s.g.Put)
}

func (s grpcKV) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	return grpcUnary(ctx, r, s.g.DeleteRange)
}

func (s grpcKV) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return grpcUnary(ctx, r, s.g.Txn)
}

func (s grpcKV) Compact(ctx context.Context, r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	return grpcUnary(ctx, r, s.g.Compact)
}

type grpcCluster struct {
	pb.UnimplementedClusterServer
	g *Gateway
}

func (s grpcCluster) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	return grpcUnary(ctx, r, s.g.MemberList)
}

func (s grpcCluster) MemberAdd(ctx context.Context, r *pb.MemberAddRequest) (*pb.MemberAddResponse, error) {
	return grpcUnary(ctx, r, s.g.MemberAdd)
}

func (s grpcCluster) MemberRemove(ctx context.Context, r *pb.MemberRemoveRequest) (*pb.MemberRemoveResponse, error) {
	return grpcUnary(ctx, r, s.g.MemberRemove)
}

func (s grpcCluster) MemberUpdate(ctx context.Context, r *pb.MemberUpdateRequest) (*pb.MemberUpdateResponse, error) {
	return grpcUnary(ctx, r, s.g.MemberUpdate)
}

func (s grpcCluster) MemberPromote(ctx context.Context, r *pb.MemberPromoteRequest) (*pb.MemberPromoteResponse, error) {
	return grpcUnary(ctx, r, s.g.MemberPromote)
}

type grpcMaintenance struct {
	pb.UnimplementedMaintenanceServer
	g *Gateway
}

func (s grpcMaintenance) HashKV(ctx context.Context, r *pb.HashKVRequest) (*pb.HashKVResponse, error) {
	return grpcUnary(ctx, r, s.g.HashKV)
}

func (s grpcMaintenance) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	return grpcUnary(ctx, r, s.g.Status)
}

func (s grpcMaintenance) Hash(ctx context.Context, r *pb.HashRequest) (*pb.HashResponse, error) {
	return grpcUnary(ctx, r, s.g.Hash)
}

func (s grpcMaintenance) MoveLeader(ctx context.Context, r *pb.MoveLeaderRequest) (*pb.MoveLeaderResponse, error) {
	return grpcUnary(ctx, r, s.g.MoveLeader)
}

type grpcHealth struct {
	healthv1.UnimplementedHealthServer
	g *Gateway
}

func (s grpcHealth) Check(ctx context.Context, r *healthv1.HealthCheckRequest) (*healthv1.HealthCheckResponse, error) {
	return grpcUnary(ctx, r, s.g.healthCheck)
}
