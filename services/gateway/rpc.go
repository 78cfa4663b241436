package gateway

import (
	"context"
	"errors"
	"math"
	"net"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	healthv1 "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
	tenantv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/tenant/v1"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/tenant/v1/tenantv1connect"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/watch/v1/watchv1connect"
	"github.com/kvmesh/kvmesh/api/gen/v3electionpb"
	"github.com/kvmesh/kvmesh/api/gen/v3electionpb/v3electionpbconnect"
	"github.com/kvmesh/kvmesh/api/gen/v3lockpb"
	"github.com/kvmesh/kvmesh/api/gen/v3lockpb/v3lockpbconnect"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/libs/rpcmux"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
)

// The public API's two faces over one core. Each RPC is a Gateway method
// (ctx, *Req) (*Res, error) returning typed etcderr errors (api.go, authapi.go,
// lease.go, concurrency.go, tenant.go). What a call's metadata asks of the gateway
// (requestContext) and the error's wire form are done once per protocol, by one
// interceptor each: grpcUnaryRequest/grpcStreamRequest for grpc-go, connectRequest for
// connect-go. Only streams have a per-protocol adapter, since the two stream types
// differ.

// hasLeaderKey is the metadata by which clientv3 (WithRequireLeader) asks for a fast
// "no leader" failure.
const hasLeaderKey = "hasleader"

// requestContext carries what a call's metadata asks of the gateway: a leader
// (hasleader) and the caller's token.
func requestContext(ctx context.Context, get func(string) string) context.Context {
	if get(hasLeaderKey) == "true" {
		ctx = withRequireLeader(ctx)
	}
	return withCredentials(ctx, get)
}

// streamEnd is how a served stream ends: quietly when the client left, with etcd's
// error otherwise.
func streamEnd(err error) error {
	if err == nil || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// ---- grpc-go: the transport every etcd client uses (libs/grpcsplit hands it the
// connections whose first request is gRPC). grpc-go serves a unary call for about a
// third of the CPU that connect-go on net/http's HTTP/2 server needs (BENCHMARKS.md).

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
		// Protobuf, and watch responses already in wire form (package watch).
		grpc.ForceServerCodecV2(watch.Codec()),
		// Inside the telemetry's interceptors, so that they see the wire error.
		grpc.ChainUnaryInterceptor(grpcUnaryRequest),
		grpc.ChainStreamInterceptor(grpcStreamRequest),
	)
	s := grpc.NewServer(opts...)
	pb.RegisterKVServer(s, kvServer{Gateway: g})
	pb.RegisterClusterServer(s, clusterServer{Gateway: g})
	pb.RegisterMaintenanceServer(s, maintenanceServer{Gateway: g})
	pb.RegisterWatchServer(s, watchServer{Gateway: g})
	pb.RegisterLeaseServer(s, leaseServer{Gateway: g})
	pb.RegisterAuthServer(s, authServer{Gateway: g})
	tenantv1.RegisterTenantServiceServer(s, tenantServer{Gateway: g})
	v3lockpb.RegisterLockServer(s, lockServer{Gateway: g})
	v3electionpb.RegisterElectionServer(s, electionServer{Gateway: g})
	healthv1.RegisterHealthServer(s, healthServer{g: g})
	return s
}

// streamWorkers is how many goroutines grpc-go keeps for serving calls; calls beyond
// them get goroutines of their own. Calls wait for Raft, so many are in flight.
const streamWorkers = 1024

// The grpc-go services. Each embeds *Gateway, whose methods are the RPCs, and one
// level deeper the generated Unimplemented server, whose methods answer the RPCs not
// built yet: of two methods of one name Go promotes the shallower.
type (
	kvServer struct {
		*Gateway
		kvUnbuilt
	}
	kvUnbuilt     struct{ pb.UnimplementedKVServer }
	clusterServer struct {
		*Gateway
		clusterUnbuilt
	}
	clusterUnbuilt    struct{ pb.UnimplementedClusterServer }
	maintenanceServer struct {
		*Gateway
		maintenanceUnbuilt
	}
	maintenanceUnbuilt struct {
		pb.UnimplementedMaintenanceServer
	}
	watchServer struct {
		*Gateway
		watchUnbuilt
	}
	watchUnbuilt struct{ pb.UnimplementedWatchServer }
	leaseServer  struct {
		*Gateway
		leaseUnbuilt
	}
	leaseUnbuilt struct{ pb.UnimplementedLeaseServer }
	authServer   struct {
		*Gateway
		authUnbuilt
	}
	authUnbuilt  struct{ pb.UnimplementedAuthServer }
	tenantServer struct {
		*Gateway
		tenantUnbuilt
	}
	tenantUnbuilt struct {
		tenantv1.UnimplementedTenantServiceServer
	}
	lockServer struct {
		*Gateway
		lockUnbuilt
	}
	lockUnbuilt struct {
		v3lockpb.UnimplementedLockServer
	}
	electionServer struct {
		*Gateway
		electionUnbuilt
	}
	electionUnbuilt struct {
		v3electionpb.UnimplementedElectionServer
	}
)

func (s watchServer) Watch(stream pb.Watch_WatchServer) error {
	sendRaw := func(b watch.EncodedMsg) error { return stream.SendMsg(b) }
	return watchStreamError(s.watch(stream.Context(), stream.Recv, stream.Send, sendRaw))
}

func (s leaseServer) LeaseKeepAlive(stream pb.Lease_LeaseKeepAliveServer) error {
	return s.keepAlive(stream.Context(), stream.Recv, stream.Send)
}

func (s electionServer) Observe(r *v3electionpb.LeaderRequest, stream v3electionpb.Election_ObserveServer) error {
	return s.observe(stream.Context(), r, stream.Send)
}

type healthServer struct {
	healthv1.UnimplementedHealthServer
	g *Gateway
}

func (s healthServer) Check(ctx context.Context, r *healthv1.HealthCheckRequest) (*healthv1.HealthCheckResponse, error) {
	return s.g.healthCheck(ctx, r)
}

// grpcMetadata reads a gRPC call's metadata without copying all of it.
func grpcMetadata(ctx context.Context) func(string) string {
	return func(k string) string {
		if v := metadata.ValueFromIncomingContext(ctx, k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
}

func grpcUnaryRequest(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	ctx = requestContext(ctx, grpcMetadata(ctx))
	if info.FullMethod == etcdserverpbconnect.AuthAuthenticateProcedure {
		if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
			ctx = withPeerAddr(ctx, p.Addr.String())
		}
	}
	res, err := next(ctx, req)
	if err != nil {
		return nil, etcderr.ToGRPC(err)
	}
	return res, nil
}

func grpcStreamRequest(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, next grpc.StreamHandler) error {
	ctx := ss.Context()
	err := next(srv, contextStream{ServerStream: ss, ctx: requestContext(ctx, grpcMetadata(ctx))})
	return etcderr.ToGRPC(streamEnd(err))
}

// contextStream is a served stream with the context requestContext gave it.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s contextStream) Context() context.Context { return s.ctx }

// ---- connect-go: Connect, gRPC-Web, and gRPC over HTTP/1.1 or over h2c
// connections that start with another protocol.

// connectRoutes registers the public API's Connect handlers on mux.
func (g *Gateway) connectRoutes(mux *rpcmux.Mux, opts []connect.HandlerOption) {
	// Inside the telemetry's interceptors, so that they see the wire error.
	opts = append(opts, connect.WithInterceptors(connectRequest{}))

	unary(mux, opts, etcdserverpbconnect.KVRangeProcedure, g.Range)
	unary(mux, opts, etcdserverpbconnect.KVPutProcedure, g.Put)
	unary(mux, opts, etcdserverpbconnect.KVDeleteRangeProcedure, g.DeleteRange)
	unary(mux, opts, etcdserverpbconnect.KVTxnProcedure, g.Txn)
	unary(mux, opts, etcdserverpbconnect.KVCompactProcedure, g.Compact)

	unary(mux, opts, etcdserverpbconnect.ClusterMemberListProcedure, g.MemberList)
	unary(mux, opts, etcdserverpbconnect.ClusterMemberAddProcedure, g.MemberAdd)
	unary(mux, opts, etcdserverpbconnect.ClusterMemberRemoveProcedure, g.MemberRemove)
	unary(mux, opts, etcdserverpbconnect.ClusterMemberUpdateProcedure, g.MemberUpdate)
	unary(mux, opts, etcdserverpbconnect.ClusterMemberPromoteProcedure, g.MemberPromote)

	unary(mux, opts, etcdserverpbconnect.MaintenanceStatusProcedure, g.Status)
	unary(mux, opts, etcdserverpbconnect.MaintenanceHashProcedure, g.Hash)
	unary(mux, opts, etcdserverpbconnect.MaintenanceHashKVProcedure, g.HashKV)
	unary(mux, opts, etcdserverpbconnect.MaintenanceMoveLeaderProcedure, g.MoveLeader)
	unary(mux, opts, etcdserverpbconnect.MaintenanceAlarmProcedure, g.Alarm)
	unary(mux, opts, etcdserverpbconnect.MaintenanceDefragmentProcedure, g.Defragment)
	unary(mux, opts, etcdserverpbconnect.MaintenanceDowngradeProcedure, g.Downgrade)
	serverStream(mux, opts, etcdserverpbconnect.MaintenanceSnapshotProcedure, g.snapshot)

	unary(mux, opts, etcdserverpbconnect.LeaseLeaseGrantProcedure, g.LeaseGrant)
	unary(mux, opts, etcdserverpbconnect.LeaseLeaseRevokeProcedure, g.LeaseRevoke)
	unary(mux, opts, etcdserverpbconnect.LeaseLeaseTimeToLiveProcedure, g.LeaseTimeToLive)
	unary(mux, opts, etcdserverpbconnect.LeaseLeaseLeasesProcedure, g.LeaseLeases)
	bidiStream(mux, opts, etcdserverpbconnect.LeaseLeaseKeepAliveProcedure, g.keepAlive)

	bidiStream(mux, opts, etcdserverpbconnect.WatchWatchProcedure,
		func(ctx context.Context, recv func() (*pb.WatchRequest, error), send func(*pb.WatchResponse) error) error {
			return watchStreamError(g.watch(ctx, recv, send, nil))
		})
	serverStream(mux, opts, watchv1connect.WatchServiceWatchProcedure, g.watchOneCall)

	unary(mux, opts, etcdserverpbconnect.AuthAuthenticateProcedure, g.Authenticate)
	unary(mux, opts, etcdserverpbconnect.AuthAuthEnableProcedure, g.AuthEnable)
	unary(mux, opts, etcdserverpbconnect.AuthAuthDisableProcedure, g.AuthDisable)
	unary(mux, opts, etcdserverpbconnect.AuthAuthStatusProcedure, g.AuthStatus)
	unary(mux, opts, etcdserverpbconnect.AuthUserAddProcedure, g.UserAdd)
	unary(mux, opts, etcdserverpbconnect.AuthUserGetProcedure, g.UserGet)
	unary(mux, opts, etcdserverpbconnect.AuthUserListProcedure, g.UserList)
	unary(mux, opts, etcdserverpbconnect.AuthUserDeleteProcedure, g.UserDelete)
	unary(mux, opts, etcdserverpbconnect.AuthUserChangePasswordProcedure, g.UserChangePassword)
	unary(mux, opts, etcdserverpbconnect.AuthUserGrantRoleProcedure, g.UserGrantRole)
	unary(mux, opts, etcdserverpbconnect.AuthUserRevokeRoleProcedure, g.UserRevokeRole)
	unary(mux, opts, etcdserverpbconnect.AuthRoleAddProcedure, g.RoleAdd)
	unary(mux, opts, etcdserverpbconnect.AuthRoleGetProcedure, g.RoleGet)
	unary(mux, opts, etcdserverpbconnect.AuthRoleListProcedure, g.RoleList)
	unary(mux, opts, etcdserverpbconnect.AuthRoleDeleteProcedure, g.RoleDelete)
	unary(mux, opts, etcdserverpbconnect.AuthRoleGrantPermissionProcedure, g.RoleGrantPermission)
	unary(mux, opts, etcdserverpbconnect.AuthRoleRevokePermissionProcedure, g.RoleRevokePermission)

	unary(mux, opts, tenantv1connect.TenantServiceSetUserNamespaceProcedure, g.SetUserNamespace)
	unary(mux, opts, tenantv1connect.TenantServiceGetUserNamespaceProcedure, g.GetUserNamespace)

	unary(mux, opts, v3lockpbconnect.LockLockProcedure, g.Lock)
	unary(mux, opts, v3lockpbconnect.LockUnlockProcedure, g.Unlock)
	unary(mux, opts, v3electionpbconnect.ElectionCampaignProcedure, g.Campaign)
	unary(mux, opts, v3electionpbconnect.ElectionProclaimProcedure, g.Proclaim)
	unary(mux, opts, v3electionpbconnect.ElectionLeaderProcedure, g.Leader)
	unary(mux, opts, v3electionpbconnect.ElectionResignProcedure, g.Resign)
	serverStream(mux, opts, v3electionpbconnect.ElectionObserveProcedure, g.observe)

	unary(mux, opts, healthCheckProcedure, g.healthCheck)

	// The RPCs of these services not registered above answer Unimplemented.
	mux.Handle(etcdserverpbconnect.NewKVHandler(etcdserverpbconnect.UnimplementedKVHandler{}, opts...))
}

// unary registers fn as the Connect handler of procedure.
func unary[Req, Res any](mux *rpcmux.Mux, opts []connect.HandlerOption, procedure string, fn func(context.Context, *Req) (*Res, error)) {
	mux.Handle(procedure, connect.NewUnaryHandlerSimple(procedure, fn, opts...))
}

// serverStream registers fn, which sends its answers with send, as the Connect
// handler of a server-streaming procedure.
func serverStream[Req, Res any](mux *rpcmux.Mux, opts []connect.HandlerOption, procedure string, fn func(context.Context, *Req, func(*Res) error) error) {
	mux.Handle(procedure, connect.NewServerStreamHandlerSimple(procedure,
		func(ctx context.Context, r *Req, s *connect.ServerStream[Res]) error { return fn(ctx, r, s.Send) }, opts...))
}

// bidiStream registers fn, which reads requests with recv and answers with send, as
// the Connect handler of a bidirectional procedure.
func bidiStream[Req, Res any](mux *rpcmux.Mux, opts []connect.HandlerOption, procedure string, fn func(context.Context, func() (*Req, error), func(*Res) error) error) {
	mux.Handle(procedure, connect.NewBidiStreamHandler(procedure,
		func(ctx context.Context, s *connect.BidiStream[Req, Res]) error { return fn(ctx, s.Receive, s.Send) }, opts...))
}

const healthCheckProcedure = "/grpc.health.v1.Health/Check"

// connectRequest is requestContext and the wire error for connect-go.
type connectRequest struct{}

func (connectRequest) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		ctx = requestContext(ctx, req.Header().Get)
		if req.Spec().Procedure == etcdserverpbconnect.AuthAuthenticateProcedure {
			ctx = withPeerAddr(ctx, req.Peer().Addr)
		}
		res, err := next(ctx, req)
		if err != nil {
			return nil, etcderr.ToConnect(err)
		}
		return res, nil
	}
}

func (connectRequest) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (connectRequest) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		return etcderr.ToConnect(streamEnd(next(requestContext(ctx, conn.RequestHeader().Get), conn)))
	}
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

var errUnknownService = errors.New("unknown service")

// withPeerAddr records the client's address (its host) for Authenticate's failure
// count (see failureLimiter).
func withPeerAddr(ctx context.Context, addr string) context.Context {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		addr = host
	}
	return context.WithValue(ctx, peerAddrKey{}, addr)
}

type peerAddrKey struct{}
