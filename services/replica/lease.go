package replica

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// Leases, through Raft. A grant carries the ID its proposer chose, so every member
// applies the same lease; a revoke deletes the lease's keys in one revision.
//
// The leader's lease clocks (expiry, keep-alives, checkpoints) are in lessor.go.

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
	if err := r.checkQuota(leaseGrantCost); err != nil {
		return nil, err
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

// appendLeaseOp adds req to ops when it is a lease change the lessor follows.
func appendLeaseOp(ops []leaseOp, req *replicav1.RaftRequest) []leaseOp {
	switch op := req.GetRequest().(type) {
	case *replicav1.RaftRequest_LeaseGrant:
		return append(ops, leaseOp{grant: op.LeaseGrant})
	case *replicav1.RaftRequest_LeaseRevoke:
		return append(ops, leaseOp{revoke: op.LeaseRevoke.GetID()})
	case *replicav1.RaftRequest_LeaseCheckpoint:
		return append(ops, leaseOp{checkpoint: op.LeaseCheckpoint})
	}
	return ops
}

// leaseService is etcd's Lease API for gateways.
type leaseService struct {
	replicav1.UnimplementedLeaseServiceServer
	r *Replica
}

func (s *leaseService) LeaseGrant(ctx context.Context, req *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	resp, err := s.r.LeaseGrant(ctx, req)
	if err != nil {
		return nil, err
	}
	s.r.m.leasesGranted.Inc()
	return resp, nil
}

func (s *leaseService) LeaseRevoke(ctx context.Context, req *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	if err := s.r.serving(false); err != nil {
		return nil, err
	}
	resp, err := s.r.LeaseRevoke(ctx, req)
	if err != nil {
		return nil, err
	}
	s.r.m.leasesRevoked.Inc()
	return resp, nil
}

// LeaseTimeToLive answers on the leader only: it alone keeps the clocks. An unknown
// lease answers TTL -1, as etcd.
func (s *leaseService) LeaseTimeToLive(ctx context.Context, req *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	term, err := r.leaseLeader(ctx)
	if err != nil {
		return nil, err
	}
	id := req.GetID()
	left, ttl, ok, err := r.lessor.remaining(term, id)
	if err != nil {
		return nil, err
	}
	resp := &pb.LeaseTimeToLiveResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), ID: id, TTL: -1}
	if ok {
		resp.TTL, resp.GrantedTTL = left, ttl
		if req.GetKeys() {
			st := r.acquire()
			resp.Keys = st.kv.LeaseKeys(id)
			st.release()
			if err := r.checkLeaseRead(ctx, resp.Keys); err != nil {
				return nil, err
			}
		}
	}
	return resp, nil
}

// LeaseLeases lists the committed leases this member knows.
func (s *leaseService) LeaseLeases(ctx context.Context, req *pb.LeaseLeasesRequest) (*pb.LeaseLeasesResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	st := r.acquire()
	leases := st.kv.Leases()
	var keys [][]byte
	for _, l := range leases {
		keys = append(keys, st.kv.LeaseKeys(l.ID)...)
	}
	st.release()
	if err := r.checkLeaseRead(ctx, keys); err != nil {
		return nil, err
	}
	resp := &pb.LeaseLeasesResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Leases: make([]*pb.LeaseStatus, len(leases))}
	for i, l := range leases {
		resp.Leases[i] = &pb.LeaseStatus{ID: l.ID}
	}
	return resp, nil
}

// KeepAlive renews batches of leases; each batch is answered when it is done, in its
// own goroutine, so a batch that waits (for an expired lease's revoke) holds up no
// other.
func (s *leaseService) KeepAlive(stream replicav1.LeaseService_KeepAliveServer) error {
	return s.serveKeepAlive(stream.Context(), stream.Recv, stream.Send)
}

func (s *leaseService) serveKeepAlive(ctx context.Context, recv func() (*replicav1.KeepAliveBatch, error), send func(*replicav1.KeepAliveResults) error) error {
	var sendMu sync.Mutex
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		b, err := recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := s.r.keepAlive(ctx, b)
			sendMu.Lock()
			defer sendMu.Unlock()
			send(res) // a broken stream ends recv too
		}()
	}
}

// leaseLeader confirms that this member leads (a batched ReadIndex round, which also
// waits until everything committed before is applied) and keeps the lease clocks.
func (r *Replica) leaseLeader(ctx context.Context) (uint64, error) {
	if r.leader.Load() != r.id {
		return 0, errNotPrimary
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	defer cancel()
	if err := r.read.linearizable(ctx); err != nil {
		return 0, errNotPrimary
	}
	return r.lessor.primary(ctx)
}

// keepAlive renews a batch of leases on the leader.
func (r *Replica) keepAlive(ctx context.Context, b *replicav1.KeepAliveBatch) *replicav1.KeepAliveResults {
	out := &replicav1.KeepAliveResults{Seq: b.GetSeq()}
	term, err := r.leaseLeader(ctx)
	if err != nil {
		out.NotLeader = true
		return out
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	defer cancel()
	out.Ttls = make([]int64, len(b.GetIds()))
	out.Refused = r.checkRenewals(b)
	refused := out.Refused
	renewed := len(b.GetIds()) - len(refused)
	for i, id := range b.GetIds() {
		if len(refused) > 0 && refused[0].GetIndex() == uint32(i) {
			refused = refused[1:]
			continue
		}
		ttl, err := r.lessor.renew(ctx, term, id)
		switch {
		case err == nil:
			out.Ttls[i] = ttl
		case errors.Is(err, etcderr.ErrLeaseNotFound):
			out.Ttls[i] = 0
		default:
			return &replicav1.KeepAliveResults{Seq: b.GetSeq(), NotLeader: true}
		}
	}
	r.m.leasesRenewed.Add(float64(renewed))
	out.Header = r.header(&pb.ResponseHeader{Revision: r.rev()})
	return out
}

// checkRenewals is etcd's checkLeaseRenew for each keep-alive of b that carries its
// user, made on this leader's auth state (the newest: the leader has applied all that
// was committed before the batch): with auth enabled a user is needed, and a user who
// is not an admin must be allowed to write every key attached to the lease. It answers
// the refused keep-alives in batch order.
func (r *Replica) checkRenewals(b *replicav1.KeepAliveBatch) []*replicav1.KeepAliveRefusal {
	users := b.GetUsers()
	if len(users) != len(b.GetIds()) {
		return nil
	}
	a := r.auth.cur.Load()
	if !a.store.Enabled {
		return nil
	}
	var refused []*replicav1.KeepAliveRefusal
	var st *state
	for i, id := range b.GetIds() {
		var err error
		ai := &authz.Info{User: users[i], Revision: a.store.Revision}
		switch {
		case users[i] == "":
			err = etcderr.ErrUserEmpty
		case a.store.IsAdminPermitted(ai) != nil:
			if st == nil {
				st = r.acquire()
			}
			err = a.store.CheckLeaseKeys(ai, st.kv.LeaseKeys(id), true)
		}
		if err != nil {
			code, msg := etcderr.CodeMessage(err)
			refused = append(refused, &replicav1.KeepAliveRefusal{Index: uint32(i), Code: int32(code), Message: msg})
		}
	}
	if st != nil {
		st.release()
	}
	return refused
}
