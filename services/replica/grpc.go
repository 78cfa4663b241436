package replica

import (
	"context"
	"math"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	peerv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/peer/v1"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/grpcsplit"
)

// The unary calls of the internal API are also served by grpc-go, on the same port
// (libs/grpcsplit routes each connection by its first request): gateways call them
// over grpc-go, which costs a third of the CPU per call of connect-go on net/http's
// HTTP/2 (see BENCHMARKS.md). These adapters are thin: the Connect handlers do the work.
// The streams (Feed, KeepAlive, the peer API) stay on Connect, where their clients are.

// newGRPCServer is the grpc-go face of the internal API.
func (r *Replica) newGRPCServer() *grpc.Server {
	limit := r.cfg.MaxRequestBytes + grpcOverheadBytes
	opts := append(r.tel.GRPCInternalServer(),
		// Peer batches may be large (many entries): the limit on one request is the
		// unary calls' (an interceptor), as the Connect handlers' read limit.
		grpc.MaxRecvMsgSize(math.MaxInt32),
		grpc.ChainUnaryInterceptor(authGRPCInterceptor, func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			if m, ok := req.(proto.Message); ok {
				if n := proto.Size(m); n > limit {
					return nil, status.Errorf(codes.ResourceExhausted, "grpc: received message larger than max (%d vs. %d)", n, limit)
				}
			}
			return next(ctx, req)
		}),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.MaxConcurrentStreams(math.MaxUint32))
	opts = append(opts, grpcsplit.ServerOptions()...)
	s := grpc.NewServer(opts...)
	replicav1.RegisterKVServiceServer(s, grpcKV{s: &kvService{r}})
	replicav1.RegisterClusterServiceServer(s, grpcCluster{s: &clusterService{r}})
	replicav1.RegisterMaintenanceServiceServer(s, grpcMaintenance{s: &maintenanceService{r}})
	replicav1.RegisterLeaseServiceServer(s, grpcLease{s: &leaseService{r}})
	replicav1.RegisterAuthServiceServer(s, grpcAuth{s: &authService{r}})
	peerv1.RegisterPeerServiceServer(s, grpcPeer{s: &peerService{r}})
	return s
}

// unary runs a Connect handler for a grpc-go call, with the error as a gRPC status of
// the same code and message.
func unary[Req, Res any](ctx context.Context, req *Req, h func(context.Context, *connect.Request[Req]) (*connect.Response[Res], error)) (*Res, error) {
	resp, err := h(ctx, connect.NewRequest(req))
	if err != nil {
		code, msg := etcderr.CodeMessage(err)
		return nil, status.Error(codes.Code(code), msg)
	}
	return resp.Msg, nil
}

type grpcKV struct {
	replicav1.UnimplementedKVServiceServer
	s *kvService
}

func (g grpcKV) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	return unary(ctx, r, g.s.Range)
}
func (g grpcKV) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	return unary(ctx, r, g.s.Put)
}
func (g grpcKV) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	return unary(ctx, r, g.s.DeleteRange)
}
func (g grpcKV) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return unary(ctx, r, g.s.Txn)
}
func (g grpcKV) Compact(ctx context.Context, r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	return unary(ctx, r, g.s.Compact)
}

type grpcCluster struct {
	replicav1.UnimplementedClusterServiceServer
	s *clusterService
}

func (g grpcCluster) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	return unary(ctx, r, g.s.MemberList)
}
func (g grpcCluster) MemberAdd(ctx context.Context, r *pb.MemberAddRequest) (*pb.MemberAddResponse, error) {
	return unary(ctx, r, g.s.MemberAdd)
}
func (g grpcCluster) MemberRemove(ctx context.Context, r *pb.MemberRemoveRequest) (*pb.MemberRemoveResponse, error) {
	return unary(ctx, r, g.s.MemberRemove)
}
func (g grpcCluster) MemberUpdate(ctx context.Context, r *pb.MemberUpdateRequest) (*pb.MemberUpdateResponse, error) {
	return unary(ctx, r, g.s.MemberUpdate)
}
func (g grpcCluster) MemberPromote(ctx context.Context, r *pb.MemberPromoteRequest) (*pb.MemberPromoteResponse, error) {
	return unary(ctx, r, g.s.MemberPromote)
}

type grpcMaintenance struct {
	replicav1.UnimplementedMaintenanceServiceServer
	s *maintenanceService
}

func (g grpcMaintenance) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	return unary(ctx, r, g.s.Status)
}
func (g grpcMaintenance) HashKV(ctx context.Context, r *pb.HashKVRequest) (*pb.HashKVResponse, error) {
	return unary(ctx, r, g.s.HashKV)
}
func (g grpcMaintenance) Hash(ctx context.Context, r *pb.HashRequest) (*pb.HashResponse, error) {
	return unary(ctx, r, g.s.Hash)
}
func (g grpcMaintenance) MoveLeader(ctx context.Context, r *pb.MoveLeaderRequest) (*pb.MoveLeaderResponse, error) {
	return unary(ctx, r, g.s.MoveLeader)
}

// grpcLease serves the unary lease calls; KeepAlive is served over Connect only, where
// the gateways' keepers call it.
type grpcLease struct {
	replicav1.UnimplementedLeaseServiceServer
	s *leaseService
}

func (g grpcLease) LeaseGrant(ctx context.Context, r *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	return unary(ctx, r, g.s.LeaseGrant)
}
func (g grpcLease) LeaseRevoke(ctx context.Context, r *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	return unary(ctx, r, g.s.LeaseRevoke)
}
func (g grpcLease) LeaseTimeToLive(ctx context.Context, r *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	return unary(ctx, r, g.s.LeaseTimeToLive)
}
func (g grpcLease) LeaseLeases(ctx context.Context, r *pb.LeaseLeasesRequest) (*pb.LeaseLeasesResponse, error) {
	return unary(ctx, r, g.s.LeaseLeases)
}
