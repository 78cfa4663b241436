// Package replicaapi is a replica's internal API as its callers (gateways, the fanout,
// other replicas forwarding a membership change) see it: plain Go methods, typed
// errors (etcderr), the same whether the replica is across the network (Network: grpc-go,
// KV calls batched on one stream) or in this process (the replica's own value, called
// directly: no serialization, no transport). A caller picks its Dialer once; nothing
// after that knows which it has.
package replicaapi

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// API is one replica's internal API. The decision a gateway made for a request travels
// in its context (authz.WithDecision); errors are etcd's (etcderr), whatever carried
// them.
type API interface {
	Range(context.Context, *pb.RangeRequest) (*pb.RangeResponse, error)
	Put(context.Context, *pb.PutRequest) (*pb.PutResponse, error)
	DeleteRange(context.Context, *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error)
	Txn(context.Context, *pb.TxnRequest) (*pb.TxnResponse, error)
	Compact(context.Context, *pb.CompactionRequest) (*pb.CompactionResponse, error)

	MemberList(context.Context, *pb.MemberListRequest) (*pb.MemberListResponse, error)
	MemberAdd(context.Context, *pb.MemberAddRequest) (*pb.MemberAddResponse, error)
	MemberRemove(context.Context, *pb.MemberRemoveRequest) (*pb.MemberRemoveResponse, error)
	MemberUpdate(context.Context, *pb.MemberUpdateRequest) (*pb.MemberUpdateResponse, error)
	MemberPromote(context.Context, *pb.MemberPromoteRequest) (*pb.MemberPromoteResponse, error)

	Status(context.Context, *pb.StatusRequest) (*pb.StatusResponse, error)
	HashKV(context.Context, *pb.HashKVRequest) (*pb.HashKVResponse, error)
	Hash(context.Context, *pb.HashRequest) (*pb.HashResponse, error)
	MoveLeader(context.Context, *pb.MoveLeaderRequest) (*pb.MoveLeaderResponse, error)
	Alarm(context.Context, *pb.AlarmRequest) (*pb.AlarmResponse, error)
	Defragment(context.Context, *pb.DefragmentRequest) (*pb.DefragmentResponse, error)
	// Snapshot streams a snapshot of the replica's state: fn gets each blob, in order,
	// until it fails, ctx ends or the snapshot is complete.
	Snapshot(ctx context.Context, req *pb.SnapshotRequest, fn func(*pb.SnapshotResponse) error) error

	LeaseGrant(context.Context, *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error)
	LeaseRevoke(context.Context, *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error)
	LeaseTimeToLive(context.Context, *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error)
	LeaseLeases(context.Context, *pb.LeaseLeasesRequest) (*pb.LeaseLeasesResponse, error)
	// KeepAlive opens a stream of keep-alive batches; it ends with ctx.
	KeepAlive(ctx context.Context) (KeepAliveStream, error)

	// AuthState is the auth state (AuthService.State).
	AuthState(context.Context, *replicav1.AuthStateRequest) (*replicav1.AuthStateResponse, error)
	Authenticate(context.Context, *pb.AuthenticateRequest) (*pb.AuthenticateResponse, error)
	// AuthCall runs one of etcd's Auth RPCs (AuthService.Call).
	AuthCall(context.Context, *replicav1.AuthRequest) (*replicav1.AuthResponse, error)

	// Feed streams the committed history from req's revision: fn gets each answer
	// until it fails, ctx ends, or the feed does (req.ToRevision reached, or an error).
	Feed(ctx context.Context, req *replicav1.FeedRequest, fn func(*replicav1.FeedResponse) error) error
	Position(context.Context, *replicav1.PositionRequest) (*replicav1.PositionResponse, error)
}

// KeepAliveStream carries keep-alive batches to a replica and its answers back.
type KeepAliveStream interface {
	Send(*replicav1.KeepAliveBatch) error
	Recv() (*replicav1.KeepAliveResults, error)
}

// Conn is the link to one replica.
type Conn interface {
	API
	// Close ends the link; calls after it fail.
	Close() error
}

// Dialer opens links to replicas by their internal API URL.
type Dialer interface {
	Dial(url string) (Conn, error)
}

// notSent is the failure of a call that provably never reached the replica (no
// connection could be made, or the stream broke before the call was written): safe to
// send to another replica, whatever it does.
type notSent struct{ err error }

func (e *notSent) Error() string { return e.err.Error() }
func (e *notSent) Unwrap() error { return e.err }

// NotSent marks the failure of a call that never reached the replica; clients see it as
// Unavailable with msg.
func NotSent(msg string) error {
	return &notSent{err: etcderr.FromWire(connect.CodeUnavailable, msg)}
}

// IsNotSent tells a call that never reached the replica (see NotSent).
func IsNotSent(err error) bool {
	var ns *notSent
	return errors.As(err, &ns)
}
