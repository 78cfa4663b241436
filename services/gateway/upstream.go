package gateway

import (
	"context"
	"errors"
	"net"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/kvmesh/kvmesh/libs/authz"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1/replicav1connect"
)

// The gateway's unary calls to a replica go over grpc-go: on the same port as the
// replica's Connect API (libs/grpcsplit routes the connection), at a third of the CPU
// per call of connect-go over net/http's HTTP/2 client and server (see BENCHMARKS.md),
// which matters because every request through a gateway makes one. The adapters below
// give grpc-go's clients the Connect clients' shape, so the routing code (api.go) is
// the same for both; streams (Feed, KeepAlive) stay on Connect. In the all-in-one the
// replica is reached in-process over Connect, without sockets.

// fromGRPC turns a grpc-go error into a Connect error of the same code and message.
// A call that failed because no connection could be made never reached the replica;
// it is marked as a dial error, so that it is retried on another one (neverArrived).
func fromGRPC(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	if msg := st.Message(); strings.Contains(msg, "Error while dialing") {
		return dialError(connect.Code(st.Code()), msg)
	}
	return connect.NewError(connect.Code(st.Code()), errors.New(st.Message()))
}

// dialError is a failure that call takes for a request that never arrived
// (neverArrived): it is sent to the next replica.
func dialError(code connect.Code, msg string) error {
	return connect.NewError(code, &net.OpError{Op: "dial", Net: "tcp", Err: errors.New(msg)})
}

func viaGRPC[Req, Res any](ctx context.Context, r *connect.Request[Req], f func(context.Context, *Req, ...grpc.CallOption) (*Res, error)) (*connect.Response[Res], error) {
	if v := decisionValue(ctx); v != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, authz.MetadataKey, v)
	}
	resp, err := f(ctx, r.Msg)
	if err != nil {
		return nil, fromGRPC(err)
	}
	return connect.NewResponse(resp), nil
}

// grpcKVClient sends Range, Put, DeleteRange and Txn over the replica's Batch stream
// (batch.go) and the rarer Compact as a unary call.
type grpcKVClient struct {
	c replicav1.KVServiceClient
	b *kvBatcher
}

func (a grpcKVClient) Range(ctx context.Context, r *connect.Request[pb.RangeRequest]) (*connect.Response[pb.RangeResponse], error) {
	return batched(ctx, a.b, r, &replicav1.KVCall{Request: &replicav1.KVCall_Range{Range: r.Msg}}, (*replicav1.KVResult).GetRange)
}
func (a grpcKVClient) Put(ctx context.Context, r *connect.Request[pb.PutRequest]) (*connect.Response[pb.PutResponse], error) {
	return batched(ctx, a.b, r, &replicav1.KVCall{Request: &replicav1.KVCall_Put{Put: r.Msg}}, (*replicav1.KVResult).GetPut)
}
func (a grpcKVClient) DeleteRange(ctx context.Context, r *connect.Request[pb.DeleteRangeRequest]) (*connect.Response[pb.DeleteRangeResponse], error) {
	return batched(ctx, a.b, r, &replicav1.KVCall{Request: &replicav1.KVCall_DeleteRange{DeleteRange: r.Msg}}, (*replicav1.KVResult).GetDeleteRange)
}
func (a grpcKVClient) Txn(ctx context.Context, r *connect.Request[pb.TxnRequest]) (*connect.Response[pb.TxnResponse], error) {
	return batched(ctx, a.b, r, &replicav1.KVCall{Request: &replicav1.KVCall_Txn{Txn: r.Msg}}, (*replicav1.KVResult).GetTxn)
}
func (a grpcKVClient) Compact(ctx context.Context, r *connect.Request[pb.CompactionRequest]) (*connect.Response[pb.CompactionResponse], error) {
	return viaGRPC(ctx, r, a.c.Compact)
}

type grpcClusterClient struct {
	c replicav1.ClusterServiceClient
}

func (a grpcClusterClient) MemberList(ctx context.Context, r *connect.Request[pb.MemberListRequest]) (*connect.Response[pb.MemberListResponse], error) {
	return viaGRPC(ctx, r, a.c.MemberList)
}
func (a grpcClusterClient) MemberAdd(ctx context.Context, r *connect.Request[pb.MemberAddRequest]) (*connect.Response[pb.MemberAddResponse], error) {
	return viaGRPC(ctx, r, a.c.MemberAdd)
}
func (a grpcClusterClient) MemberRemove(ctx context.Context, r *connect.Request[pb.MemberRemoveRequest]) (*connect.Response[pb.MemberRemoveResponse], error) {
	return viaGRPC(ctx, r, a.c.MemberRemove)
}
func (a grpcClusterClient) MemberUpdate(ctx context.Context, r *connect.Request[pb.MemberUpdateRequest]) (*connect.Response[pb.MemberUpdateResponse], error) {
	return viaGRPC(ctx, r, a.c.MemberUpdate)
}
func (a grpcClusterClient) MemberPromote(ctx context.Context, r *connect.Request[pb.MemberPromoteRequest]) (*connect.Response[pb.MemberPromoteResponse], error) {
	return viaGRPC(ctx, r, a.c.MemberPromote)
}

type grpcMaintenanceClient struct {
	c replicav1.MaintenanceServiceClient
}

func (a grpcMaintenanceClient) Status(ctx context.Context, r *connect.Request[pb.StatusRequest]) (*connect.Response[pb.StatusResponse], error) {
	return viaGRPC(ctx, r, a.c.Status)
}
func (a grpcMaintenanceClient) HashKV(ctx context.Context, r *connect.Request[pb.HashKVRequest]) (*connect.Response[pb.HashKVResponse], error) {
	return viaGRPC(ctx, r, a.c.HashKV)
}
func (a grpcMaintenanceClient) Hash(ctx context.Context, r *connect.Request[pb.HashRequest]) (*connect.Response[pb.HashResponse], error) {
	return viaGRPC(ctx, r, a.c.Hash)
}
func (a grpcMaintenanceClient) MoveLeader(ctx context.Context, r *connect.Request[pb.MoveLeaderRequest]) (*connect.Response[pb.MoveLeaderResponse], error) {
	return viaGRPC(ctx, r, a.c.MoveLeader)
}

// grpcLeaseClient carries the unary lease calls over grpc-go and KeepAlive, a
// long-lived stream whose per-call cost does not matter, over Connect.
type grpcLeaseClient struct {
	replicav1connect.LeaseServiceClient
	c replicav1.LeaseServiceClient
}

func (a grpcLeaseClient) LeaseGrant(ctx context.Context, r *connect.Request[pb.LeaseGrantRequest]) (*connect.Response[pb.LeaseGrantResponse], error) {
	return viaGRPC(ctx, r, a.c.LeaseGrant)
}
func (a grpcLeaseClient) LeaseRevoke(ctx context.Context, r *connect.Request[pb.LeaseRevokeRequest]) (*connect.Response[pb.LeaseRevokeResponse], error) {
	return viaGRPC(ctx, r, a.c.LeaseRevoke)
}
func (a grpcLeaseClient) LeaseTimeToLive(ctx context.Context, r *connect.Request[pb.LeaseTimeToLiveRequest]) (*connect.Response[pb.LeaseTimeToLiveResponse], error) {
	return viaGRPC(ctx, r, a.c.LeaseTimeToLive)
}
func (a grpcLeaseClient) LeaseLeases(ctx context.Context, r *connect.Request[pb.LeaseLeasesRequest]) (*connect.Response[pb.LeaseLeasesResponse], error) {
	return viaGRPC(ctx, r, a.c.LeaseLeases)
}

type grpcAuthClient struct{ c replicav1.AuthServiceClient }

func (a grpcAuthClient) State(ctx context.Context, r *connect.Request[replicav1.AuthStateRequest]) (*connect.Response[replicav1.AuthStateResponse], error) {
	return viaGRPC(ctx, r, a.c.State)
}
func (a grpcAuthClient) Authenticate(ctx context.Context, r *connect.Request[pb.AuthenticateRequest]) (*connect.Response[pb.AuthenticateResponse], error) {
	return viaGRPC(ctx, r, a.c.Authenticate)
}
func (a grpcAuthClient) Call(ctx context.Context, r *connect.Request[replicav1.AuthRequest]) (*connect.Response[replicav1.AuthResponse], error) {
	return viaGRPC(ctx, r, a.c.Call)
}
