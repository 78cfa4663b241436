package replicaapi

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/grpcsplit"
)

// Network dials replicas over grpc-go, on the port that serves their internal API
// (libs/grpcsplit routes the connection): at a third of the CPU per call of connect-go
// over net/http's HTTP/2 (see BENCHMARKS.md), which matters because every request
// through a gateway makes one. Range, Put, DeleteRange and Txn share one Batch stream
// per replica (batch.go).
type Network struct {
	// TLS is the mesh's client TLS, for https:// URLs (nil: plaintext only).
	TLS *tls.Config
	// Options are added to every link (telemetry).
	Options []grpc.DialOption
}

// Dial opens a link to the replica at url; it connects on first use.
func (n Network) Dial(url string) (Conn, error) {
	cc, err := grpcsplit.Dial(strings.TrimRight(url, "/"), n.TLS, n.Options...)
	if err != nil {
		return nil, err
	}
	kv := replicav1.NewKVServiceClient(cc)
	return &netConn{
		cc:      cc,
		kv:      kv,
		batch:   &batcher{client: kv},
		cluster: replicav1.NewClusterServiceClient(cc),
		maint:   replicav1.NewMaintenanceServiceClient(cc),
		lease:   replicav1.NewLeaseServiceClient(cc),
		auth:    replicav1.NewAuthServiceClient(cc),
		feed:    replicav1.NewFeedServiceClient(cc),
	}, nil
}

type netConn struct {
	cc      *grpc.ClientConn
	kv      replicav1.KVServiceClient
	batch   *batcher
	cluster replicav1.ClusterServiceClient
	maint   replicav1.MaintenanceServiceClient
	lease   replicav1.LeaseServiceClient
	auth    replicav1.AuthServiceClient
	feed    replicav1.FeedServiceClient
}

func (c *netConn) Close() error {
	c.batch.close()
	return c.cc.Close()
}

// fromGRPC is the typed error for what a grpc-go call to a replica failed with: a call
// that found no connection never arrived (NotSent); a status becomes etcd's error of
// that code and message (etcderr.FromWire).
func fromGRPC(err error) error {
	st, ok := status.FromError(err)
	if err == nil || !ok {
		return err
	}
	if msg := st.Message(); strings.Contains(msg, "Error while dialing") {
		return NotSent(msg)
	}
	return etcderr.FromWire(connect.Code(st.Code()), st.Message())
}

// outgoing carries the decision ctx holds in the call's metadata.
func outgoing(ctx context.Context) context.Context {
	if d, ok := authz.DecisionFrom(ctx); ok {
		return metadata.AppendToOutgoingContext(ctx, authz.MetadataKey, d.Encode())
	}
	return ctx
}

func unary[Req, Res any](ctx context.Context, f func(context.Context, *Req, ...grpc.CallOption) (*Res, error), req *Req) (*Res, error) {
	res, err := f(outgoing(ctx), req)
	if err != nil {
		return nil, fromGRPC(err)
	}
	return res, nil
}

func (c *netConn) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	return batched(ctx, c.batch, &replicav1.KVCall{Request: &replicav1.KVCall_Range{Range: r}}, (*replicav1.KVResult).GetRange)
}
func (c *netConn) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	return batched(ctx, c.batch, &replicav1.KVCall{Request: &replicav1.KVCall_Put{Put: r}}, (*replicav1.KVResult).GetPut)
}
func (c *netConn) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	return batched(ctx, c.batch, &replicav1.KVCall{Request: &replicav1.KVCall_DeleteRange{DeleteRange: r}}, (*replicav1.KVResult).GetDeleteRange)
}
func (c *netConn) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return batched(ctx, c.batch, &replicav1.KVCall{Request: &replicav1.KVCall_Txn{Txn: r}}, (*replicav1.KVResult).GetTxn)
}
func (c *netConn) Compact(ctx context.Context, r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	return unary(ctx, c.kv.Compact, r)
}

func (c *netConn) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	return unary(ctx, c.cluster.MemberList, r)
}
func (c *netConn) MemberAdd(ctx context.Context, r *pb.MemberAddRequest) (*pb.MemberAddResponse, error) {
	return unary(ctx, c.cluster.MemberAdd, r)
}
func (c *netConn) MemberRemove(ctx context.Context, r *pb.MemberRemoveRequest) (*pb.MemberRemoveResponse, error) {
	return unary(ctx, c.cluster.MemberRemove, r)
}
func (c *netConn) MemberUpdate(ctx context.Context, r *pb.MemberUpdateRequest) (*pb.MemberUpdateResponse, error) {
	return unary(ctx, c.cluster.MemberUpdate, r)
}
func (c *netConn) MemberPromote(ctx context.Context, r *pb.MemberPromoteRequest) (*pb.MemberPromoteResponse, error) {
	return unary(ctx, c.cluster.MemberPromote, r)
}

func (c *netConn) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	return unary(ctx, c.maint.Status, r)
}
func (c *netConn) HashKV(ctx context.Context, r *pb.HashKVRequest) (*pb.HashKVResponse, error) {
	return unary(ctx, c.maint.HashKV, r)
}
func (c *netConn) Hash(ctx context.Context, r *pb.HashRequest) (*pb.HashResponse, error) {
	return unary(ctx, c.maint.Hash, r)
}
func (c *netConn) MoveLeader(ctx context.Context, r *pb.MoveLeaderRequest) (*pb.MoveLeaderResponse, error) {
	return unary(ctx, c.maint.MoveLeader, r)
}
func (c *netConn) Alarm(ctx context.Context, r *pb.AlarmRequest) (*pb.AlarmResponse, error) {
	return unary(ctx, c.maint.Alarm, r)
}
func (c *netConn) Defragment(ctx context.Context, r *pb.DefragmentRequest) (*pb.DefragmentResponse, error) {
	return unary(ctx, c.maint.Defragment, r)
}

func (c *netConn) Snapshot(ctx context.Context, r *pb.SnapshotRequest, fn func(*pb.SnapshotResponse) error) error {
	return served(ctx, c.maint.Snapshot, r, fn)
}

func (c *netConn) LeaseGrant(ctx context.Context, r *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	return unary(ctx, c.lease.LeaseGrant, r)
}
func (c *netConn) LeaseRevoke(ctx context.Context, r *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	return unary(ctx, c.lease.LeaseRevoke, r)
}
func (c *netConn) LeaseTimeToLive(ctx context.Context, r *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	return unary(ctx, c.lease.LeaseTimeToLive, r)
}
func (c *netConn) LeaseLeases(ctx context.Context, r *pb.LeaseLeasesRequest) (*pb.LeaseLeasesResponse, error) {
	return unary(ctx, c.lease.LeaseLeases, r)
}

func (c *netConn) KeepAlive(ctx context.Context) (KeepAliveStream, error) {
	s, err := c.lease.KeepAlive(ctx)
	if err != nil {
		return nil, fromGRPC(err)
	}
	return netKeepAlive{s}, nil
}

type netKeepAlive struct {
	s grpc.BidiStreamingClient[replicav1.KeepAliveBatch, replicav1.KeepAliveResults]
}

// Send fails with io.EOF once the stream has ended; Recv has the reason.
func (k netKeepAlive) Send(b *replicav1.KeepAliveBatch) error {
	return fromGRPC(k.s.Send(b))
}

func (k netKeepAlive) Recv() (*replicav1.KeepAliveResults, error) {
	res, err := k.s.Recv()
	if err != nil {
		return nil, fromGRPC(err)
	}
	return res, nil
}

func (c *netConn) AuthState(ctx context.Context, r *replicav1.AuthStateRequest) (*replicav1.AuthStateResponse, error) {
	return unary(ctx, c.auth.State, r)
}
func (c *netConn) Authenticate(ctx context.Context, r *pb.AuthenticateRequest) (*pb.AuthenticateResponse, error) {
	return unary(ctx, c.auth.Authenticate, r)
}
func (c *netConn) AuthCall(ctx context.Context, r *replicav1.AuthRequest) (*replicav1.AuthResponse, error) {
	return unary(ctx, c.auth.Call, r)
}

func (c *netConn) Feed(ctx context.Context, r *replicav1.FeedRequest, fn func(*replicav1.FeedResponse) error) error {
	return served(ctx, c.feed.Feed, r, fn)
}

// served opens a server stream with open (a generated client's method) and hands
// every message to fn, until the stream ends, fn fails or ctx ends.
func served[Req, Res any](ctx context.Context, open func(context.Context, *Req, ...grpc.CallOption) (grpc.ServerStreamingClient[Res], error), r *Req, fn func(*Res) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := open(outgoing(ctx), r)
	if err != nil {
		return fromGRPC(err)
	}
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fromGRPC(err)
		}
		if err := fn(m); err != nil {
			return err
		}
	}
}

func (c *netConn) Position(ctx context.Context, r *replicav1.PositionRequest) (*replicav1.PositionResponse, error) {
	return unary(ctx, c.feed.Position, r)
}
