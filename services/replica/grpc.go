package replica

import (
	"context"
	"math"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	peerv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/peer/v1"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/grpcsplit"
)

// The internal API is served by grpc-go, on the replica's port (libs/grpcsplit routes
// each connection by its first request): the services' methods are the cores
// themselves, (ctx, *Req) (*Res, error) with etcd's errors, registered as they are; one
// interceptor turns their errors into gRPC statuses of the same code and message. In the
// all-in-one the gateway calls the same methods directly (local.go). The peers'
// snapshot stream is served over Connect (Handler).

// newGRPCServer is the grpc-go face of the internal API.
func (r *Replica) newGRPCServer() *grpc.Server {
	limit := r.cfg.MaxRequestBytes + grpcOverheadBytes
	opts := append(r.tel.GRPCInternalServer(),
		// Peer batches may be large (many entries): the limit on one request is the
		// unary calls' (an interceptor).
		grpc.MaxRecvMsgSize(math.MaxInt32),
		grpc.ChainUnaryInterceptor(authGRPCInterceptor, func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			if m, ok := req.(proto.Message); ok {
				if n := proto.Size(m); n > limit {
					return nil, status.Errorf(codes.ResourceExhausted, "grpc: received message larger than max (%d vs. %d)", n, limit)
				}
			}
			res, err := next(ctx, req)
			return res, etcderr.ToGRPC(err)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			return etcderr.ToGRPC(next(srv, ss))
		}),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.MaxConcurrentStreams(math.MaxUint32))
	opts = append(opts, grpcsplit.ServerOptions()...)
	s := grpc.NewServer(opts...)
	api := r.services()
	replicav1.RegisterKVServiceServer(s, api.kvService)
	replicav1.RegisterClusterServiceServer(s, api.clusterService)
	replicav1.RegisterMaintenanceServiceServer(s, api.maintenanceService)
	replicav1.RegisterLeaseServiceServer(s, api.leaseService)
	replicav1.RegisterAuthServiceServer(s, api.authService)
	replicav1.RegisterFeedServiceServer(s, api.feedService)
	peerv1.RegisterPeerServiceServer(s, grpcPeer{s: &peerService{r}})
	return s
}
