package replica

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"time"

	"github.com/kvmesh/kvmesh/libs/etcderr"
	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/libs/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// Leases, through Raft. A grant carries the ID its proposer chose, so every member
// applies the same lease; a revoke deletes the lease's keys in one revision.
//
// Not built yet (the lease issue's next part): the leader's expiry of leases,
// keep-alives, checkpoints proposed by the leader, and the public Lease API. Until
// then the gateway's Lease service answers Unimplemented.

// maxLeaseTTL is etcd's MaxLeaseTTL: 9,000,000,000 seconds.
const maxLeaseTTL = 9_000_000_000

// minLeaseTTL is the shortest TTL a lease gets, as etcd: 1.5 election timeouts,
// rounded up to a whole second, so a lease outlives a leader election.
func (r *Replica) minLeaseTTL() int64 {
	d := time.Duration(r.cfg.ElectionTicks) * r.cfg.TickInterval * 3 / 2
	return int64((d + time.Second - 1) / time.Second)
}

// applyLeaseGrant grants the lease of a committed grant request: its ID and TTL were
// settled by the proposer, so every member applies the same lease whatever its own
// configuration.
func applyLeaseGrant(wr *mvcc.Writer, req *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	if err := wr.LeaseGrant(req.GetID(), req.GetTTL()); err != nil {
		return nil, err
	}
	return &pb.LeaseGrantResponse{Header: &pb.ResponseHeader{Revision: wr.Rev()}, ID: req.GetID(), TTL: req.GetTTL()}, nil
}

// applyLeaseCheckpoint records the remaining TTLs of a committed checkpoint.
func applyLeaseCheckpoint(wr *mvcc.Writer, req *pb.LeaseCheckpointRequest) (*pb.LeaseCheckpointResponse, error) {
	for _, cp := range req.GetCheckpoints() {
		if err := wr.LeaseCheckpoint(cp.GetID(), cp.GetRemaining_TTL()); err != nil {
			return nil, err
		}
	}
	return &pb.LeaseCheckpointResponse{Header: &pb.ResponseHeader{Revision: wr.Rev()}}, nil
}

// LeaseGrant grants a lease: the client's ID, or a new random one.
func (r *Replica) LeaseGrant(ctx context.Context, req *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	if req.GetTTL() > maxLeaseTTL {
		return nil, etcderr.ErrLeaseTTLTooLarge
	}
	if req.GetID() < 0 {
		return nil, etcderr.ErrLeaseNotFound
	}
	g := &pb.LeaseGrantRequest{TTL: max(req.GetTTL(), r.minLeaseTTL()), ID: req.GetID()}
	for g.ID == 0 {
		var b [8]byte
		rand.Read(b[:])
		g.ID = int64(binary.BigEndian.Uint64(b[:]) >> 1) // positive, as etcd's IDs
	}
	resp, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_LeaseGrant{LeaseGrant: g}})
	if err != nil {
		return nil, err
	}
	out := resp.(*pb.LeaseGrantResponse)
	r.header(out.Header)
	return out, nil
}

// LeaseRevoke revokes a lease and deletes its keys.
func (r *Replica) LeaseRevoke(ctx context.Context, req *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	resp, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_LeaseRevoke{LeaseRevoke: &pb.LeaseRevokeRequest{ID: req.GetID()}}})
	if err != nil {
		return nil, err
	}
	out := resp.(*pb.LeaseRevokeResponse)
	r.header(out.Header)
	return out, nil
}
