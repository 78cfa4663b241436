package replica

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.etcd.io/raft/v3"
	raftpb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
)

// Membership changes are Raft conf changes (ConfChangeV2, one change each): add a
// voter, add a learner, promote a learner (AddNode for a learner), remove. Each is
// checked twice, as etcd does: on the leader before it is proposed, against the
// leader's view of which members are up and caught up (errors a client can act on),
// and when applied, against the replicated membership only (deterministic on every
// member; a change that fails there is skipped and its proposer gets the error).
// Requests reaching a follower are forwarded to the leader.

// maxLearners is how many learners a cluster may have (etcd's --max-learners).
const maxLearners = 1

// promoteReadyRatio is how far a learner must have caught up with the leader's log to
// be promoted (etcd's readyPercentThreshold).
const promoteReadyRatio = 0.9

// applyConfChange validates and applies a committed conf change, recording the
// membership it produces in b. It returns the ID of the waiting proposal and the
// proposal's result; an error is fatal.
func (r *Replica) applyConfChange(b *pebble.Batch, cc raftpb.ConfChangeI) (uint64, error, error) {
	v2 := cc.AsV2()
	cctx := &replicav1.ConfChangeContext{}
	if len(v2.GetContext()) > 0 {
		if err := proto.Unmarshal(v2.GetContext(), cctx); err != nil {
			return 0, nil, fmt.Errorf("decode conf change context: %w", err)
		}
	}
	if err := r.validateConfChange(v2, cctx); err != nil {
		return cctx.GetRequestId(), err, nil
	}
	cs := r.node.ApplyConfChange(cc)
	t := r.members
	members, _ := t.current()
	for _, c := range v2.GetChanges() {
		id := c.GetNodeId()
		switch c.GetType() {
		case raftpb.ConfChangeType_ConfChangeAddNode, raftpb.ConfChangeType_ConfChangeAddLearnerNode:
			// A promotion keeps the member's record; an addition takes the proposed one.
			m := &pb.Member{}
			if old := members[id]; old != nil {
				m = proto.Clone(old).(*pb.Member)
			} else if p := cctx.GetMember(); p != nil {
				m = proto.Clone(p).(*pb.Member)
			}
			m.ID = id
			m.IsLearner = c.GetType() == raftpb.ConfChangeType_ConfChangeAddLearnerNode
			if err := t.stage(b, m); err != nil {
				return 0, nil, err
			}
		case raftpb.ConfChangeType_ConfChangeRemoveNode:
			if err := t.stageRemoval(b, id); err != nil {
				return 0, nil, err
			}
			if id == r.id {
				r.removedSelf()
			}
		}
	}
	if err := t.stageConf(b, cs); err != nil {
		return 0, nil, err
	}
	r.campaignIfAlone(cs)
	return cctx.GetRequestId(), nil, nil
}

// validateConfChange is the apply-time check of a conf change against the replicated
// membership (including earlier changes of the same batch).
func (r *Replica) validateConfChange(cc *raftpb.ConfChangeV2, cctx *replicav1.ConfChangeContext) error {
	members, gone := r.members.current()
	if len(cc.GetChanges()) == 0 {
		return nil
	}
	if len(cc.GetChanges()) != 1 {
		return fmt.Errorf("a conf change must change one member, not %d", len(cc.GetChanges()))
	}
	c := cc.GetChanges()[0]
	id := c.GetNodeId()
	if id == raft.None {
		return etcderr.ErrMemberNotFound
	}
	m, exists := members[id]
	if gone[id] {
		return etcderr.ErrMemberNotFound
	}
	switch c.GetType() {
	case raftpb.ConfChangeType_ConfChangeAddNode, raftpb.ConfChangeType_ConfChangeAddLearnerNode:
		if exists {
			// Adding an existing learner as a voter is a promotion.
			if c.GetType() == raftpb.ConfChangeType_ConfChangeAddNode && m.GetIsLearner() {
				return nil
			}
			if c.GetType() == raftpb.ConfChangeType_ConfChangeAddNode {
				return etcderr.ErrMemberNotLearner
			}
			return etcderr.ErrMemberExist
		}
		if len(members) == 0 {
			return nil // bootstrap
		}
		for _, o := range members {
			for _, u := range o.GetPeerURLs() {
				if slices.Contains(cctx.GetMember().GetPeerURLs(), u) {
					return etcderr.ErrPeerURLExist
				}
			}
		}
		if c.GetType() == raftpb.ConfChangeType_ConfChangeAddLearnerNode {
			n := 0
			for _, o := range members {
				if o.GetIsLearner() {
					n++
				}
			}
			if n >= maxLearners {
				return etcderr.ErrTooManyLearners
			}
		}
	case raftpb.ConfChangeType_ConfChangeRemoveNode:
		if !exists {
			return etcderr.ErrMemberNotFound
		}
	default:
		return fmt.Errorf("unsupported conf change type %v", c.GetType())
	}
	return nil
}

// applyMemberUpdate changes a member's peer URLs.
func (r *Replica) applyMemberUpdate(b *pebble.Batch, u *pb.MemberUpdateRequest) error {
	members, _ := r.members.current()
	m := members[u.GetID()]
	if m == nil {
		return etcderr.ErrMemberNotFound
	}
	for id, o := range members {
		if id == u.GetID() {
			continue
		}
		for _, p := range o.GetPeerURLs() {
			if slices.Contains(u.GetPeerURLs(), p) {
				return etcderr.ErrPeerURLExist
			}
		}
	}
	m = proto.Clone(m).(*pb.Member)
	m.PeerURLs = append([]string(nil), u.GetPeerURLs()...)
	return r.members.stage(b, m)
}

// removedSelf runs when this member's own removal is applied: it stops taking part.
func (r *Replica) removedSelf() {
	r.removeOnce.Do(func() {
		r.log.Warn("this member was removed from the cluster; it stops serving")
		close(r.removedc)
	})
}

// Removed is closed once this member has been removed from the cluster.
func (r *Replica) Removed() <-chan struct{} { return r.removedc }

func (r *Replica) isRemoved() bool {
	select {
	case <-r.removedc:
		return true
	default:
		return false
	}
}

// isLearner tells whether this member is a learner.
func (r *Replica) isLearner() bool {
	m := r.members.get(r.id)
	return m != nil && m.GetIsLearner()
}

// serving is the check every RPC but Status makes: a removed member answers nothing,
// and a learner only what etcd's learners answer (allowLearner).
func (r *Replica) serving(allowLearner bool) error {
	if r.isRemoved() {
		return etcderr.ErrStopped
	}
	if !allowLearner && r.isLearner() {
		return etcderr.ErrNotSupportedForLearner
	}
	return nil
}

// leaderConn is a link to the leader when another member leads (close it after use);
// nil when this member does.
func (r *Replica) leaderConn() (replicaapi.Conn, error) {
	lead := r.leader.Load()
	switch lead {
	case r.id:
		return nil, nil
	case raft.None:
		return nil, etcderr.ErrNoLeader
	}
	m := r.members.get(lead)
	if m == nil || len(m.GetPeerURLs()) == 0 {
		return nil, etcderr.ErrNoLeader
	}
	return r.peerAPI().Dial(m.GetPeerURLs()[0])
}

// proposeConfChange replicates a one-member conf change and waits until it is applied.
func (r *Replica) proposeConfChange(ctx context.Context, typ raftpb.ConfChangeType, m *pb.Member) error {
	ctx, span := r.tracer.Start(ctx, "raft.propose_conf_change")
	defer span.End()
	id := r.nextID.Add(1)
	enc, err := proto.Marshal(&replicav1.ConfChangeContext{Member: m, RequestId: id})
	if err != nil {
		return err
	}
	cc := &raftpb.ConfChangeV2{
		Changes: []*raftpb.ConfChangeSingle{{Type: typ.Enum(), NodeId: proto.Uint64(m.GetID())}},
		Context: enc,
	}
	_, err = r.submit(ctx, id, func(ctx context.Context) error { return r.node.ProposeConfChange(ctx, cc) })
	return err
}

// newMemberID picks the ID of a member being added: from its peer URLs, the cluster
// token and the time, so a member removed and added again gets a new ID (as etcd's).
func newMemberID(peerURLs []string, token string, now time.Time) uint64 {
	urls := append([]string(nil), peerURLs...)
	sort.Strings(urls)
	sum := sha256.Sum256([]byte(strings.Join(urls, ",") + "\x00" + token + "\x00" + now.UTC().Format(time.RFC3339Nano)))
	return binary.BigEndian.Uint64(sum[:8])
}

func validPeerURLs(urls []string) bool {
	if len(urls) == 0 {
		return false
	}
	for _, u := range urls {
		p, err := url.Parse(u)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" || (p.Path != "" && p.Path != "/") {
			return false
		}
	}
	return true
}

// activeVoters counts the voters this member heard from within two election
// timeouts (itself included), and all voters.
func (r *Replica) activeVoters() (active, voters int) {
	for _, id := range r.members.confState().GetVoters() {
		voters++
		if r.isActive(id) {
			active++
		}
	}
	return active, voters
}

func (r *Replica) isActive(id uint64) bool {
	return id == r.id || r.peers.heardFrom(id, 2*time.Duration(r.cfg.ElectionTicks)*r.cfg.TickInterval)
}

// mayAddMember is etcd's strict reconfiguration check before adding: every voter is
// up, and the voters that ever started form a quorum of the grown cluster.
func (r *Replica) mayAddMember(learner bool) error {
	if !learner {
		started, voters := 0, 0
		for _, m := range r.members.list() {
			if m.GetIsLearner() {
				continue
			}
			voters++
			if m.GetName() != "" {
				started++
			}
		}
		if !(started == 1 && voters == 1) && started < (voters+1)/2+1 {
			return etcderr.ErrMemberNotEnoughStarted
		}
	}
	if active, voters := r.activeVoters(); active < voters {
		return etcderr.ErrUnhealthy
	}
	return nil
}

// mayRemoveMember refuses a removal that would leave the active voters short of a
// quorum (etcd's strict reconfiguration check).
func (r *Replica) mayRemoveMember(id uint64) error {
	m := r.members.get(id)
	if m == nil {
		return etcderr.ErrMemberNotFound
	}
	if m.GetIsLearner() {
		return nil
	}
	active, voters := r.activeVoters()
	if !r.isActive(id) {
		return nil // a member that is down is safe to remove
	}
	if active-1 < (voters-1)/2+1 {
		return etcderr.ErrMemberNotEnoughStarted
	}
	return nil
}

// learnerReady is etcd's check before a promotion: the learner's log has caught up
// with the leader's to within 10%.
func (r *Replica) learnerReady(id uint64) error {
	st := r.node.Status()
	pr, ok := st.Progress[id]
	if !ok {
		if r.members.get(id) == nil {
			return etcderr.ErrMemberNotFound
		}
		return etcderr.ErrLearnerNotReady
	}
	if float64(pr.Match) < float64(st.Progress[r.id].Match)*promoteReadyRatio {
		return etcderr.ErrLearnerNotReady
	}
	return nil
}

// onLeader runs a membership change on the leader: here when this member leads,
// otherwise forwarded (forward calls the leader's ClusterService). Errors are etcd's.
func onLeader[Req, Res any](ctx context.Context, r *Replica, req *Req,
	forward func(replicaapi.API, context.Context, *Req) (*Res, error),
	local func() (*Res, error)) (*Res, error) {
	if err := r.serving(false); err != nil {
		return nil, err
	}
	fwd, err := r.leaderConn()
	if err != nil {
		return nil, err
	}
	if fwd != nil {
		defer fwd.Close()
		return forward(fwd, ctx, req)
	}
	res, err := local()
	if err != nil {
		return nil, err
	}
	return res, nil
}

func (s *clusterService) MemberAdd(ctx context.Context, req *pb.MemberAddRequest) (*pb.MemberAddResponse, error) {
	r := s.r
	return onLeader(ctx, r, req, replicaapi.API.MemberAdd, func() (*pb.MemberAddResponse, error) {
		if !validPeerURLs(req.GetPeerURLs()) {
			return nil, etcderr.ErrMemberBadURLs
		}
		for _, o := range r.members.list() {
			for _, u := range o.GetPeerURLs() {
				if slices.Contains(req.GetPeerURLs(), u) {
					return nil, etcderr.ErrPeerURLExist
				}
			}
		}
		if err := r.mayAddMember(req.GetIsLearner()); err != nil {
			return nil, err
		}
		m := &pb.Member{PeerURLs: req.GetPeerURLs(), IsLearner: req.GetIsLearner()}
		m.ID = newMemberID(m.GetPeerURLs(), r.cfg.ClusterToken, time.Now())
		typ := raftpb.ConfChangeType_ConfChangeAddNode
		if m.GetIsLearner() {
			typ = raftpb.ConfChangeType_ConfChangeAddLearnerNode
		}
		if err := r.proposeConfChange(ctx, typ, m); err != nil {
			return nil, err
		}
		return &pb.MemberAddResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Member: m, Members: r.members.list()}, nil
	})
}

func (s *clusterService) MemberRemove(ctx context.Context, req *pb.MemberRemoveRequest) (*pb.MemberRemoveResponse, error) {
	r := s.r
	return onLeader(ctx, r, req, replicaapi.API.MemberRemove, func() (*pb.MemberRemoveResponse, error) {
		if err := r.mayRemoveMember(req.GetID()); err != nil {
			return nil, err
		}
		if err := r.proposeConfChange(ctx, raftpb.ConfChangeType_ConfChangeRemoveNode, &pb.Member{ID: req.GetID()}); err != nil {
			return nil, err
		}
		return &pb.MemberRemoveResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Members: r.members.list()}, nil
	})
}

func (s *clusterService) MemberPromote(ctx context.Context, req *pb.MemberPromoteRequest) (*pb.MemberPromoteResponse, error) {
	r := s.r
	return onLeader(ctx, r, req, replicaapi.API.MemberPromote, func() (*pb.MemberPromoteResponse, error) {
		if err := r.learnerReady(req.GetID()); err != nil {
			return nil, err
		}
		if err := r.mayAddMember(false); err != nil {
			return nil, err
		}
		m := r.members.get(req.GetID())
		if m == nil {
			return nil, etcderr.ErrMemberNotFound
		}
		if err := r.proposeConfChange(ctx, raftpb.ConfChangeType_ConfChangeAddNode, m); err != nil {
			return nil, err
		}
		return &pb.MemberPromoteResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Members: r.members.list()}, nil
	})
}

func (s *clusterService) MemberUpdate(ctx context.Context, req *pb.MemberUpdateRequest) (*pb.MemberUpdateResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	if !validPeerURLs(req.GetPeerURLs()) {
		return nil, etcderr.ErrMemberBadURLs
	}
	if _, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_MemberUpdate{MemberUpdate: req}}); err != nil {
		return nil, err
	}
	return &pb.MemberUpdateResponse{
		Header: r.header(&pb.ResponseHeader{Revision: r.rev()}), Members: r.members.list()}, nil
}

func (s *maintenanceService) MoveLeader(ctx context.Context, req *pb.MoveLeaderRequest) (*pb.MoveLeaderResponse, error) {
	r := s.r
	if err := r.serving(false); err != nil {
		return nil, err
	}
	if r.leader.Load() != r.id {
		return nil, etcderr.ErrNotLeader
	}
	target := req.GetTargetID()
	if m := r.members.get(target); m == nil || m.GetIsLearner() {
		return nil, etcderr.ErrBadLeaderTransferee
	}
	if target != r.id {
		ctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
		defer cancel()
		r.node.TransferLeadership(ctx, r.id, target)
		tick := time.NewTicker(r.cfg.TickInterval / 2)
		defer tick.Stop()
		for r.leader.Load() != target {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return nil, etcderr.ErrTimeoutLeaderTransfer
			}
		}
	}
	return &pb.MoveLeaderResponse{Header: r.header(&pb.ResponseHeader{Revision: r.rev()})}, nil
}

// joinInfo asks the members listed in InitialCluster for the membership, finds this
// member in it by its peer URLs, and remembers the others' addresses for the
// transport until the membership is applied locally.
func (r *Replica) joinInfo() (*identity, error) {
	var errs []error
	for _, entry := range r.cfg.InitialCluster {
		_, u, _ := strings.Cut(entry, "=")
		if u == "" || slices.Contains(r.cfg.PeerURLs, u) {
			continue
		}
		c, err := r.peerAPI().Dial(u)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", u, err))
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.RequestTimeout)
		resp, err := c.MemberList(ctx, &pb.MemberListRequest{})
		cancel()
		c.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", u, err))
			continue
		}
		mine := append([]string(nil), r.cfg.PeerURLs...)
		sort.Strings(mine)
		var self *identity
		for _, m := range resp.GetMembers() {
			urls := append([]string(nil), m.GetPeerURLs()...)
			sort.Strings(urls)
			if slices.Equal(urls, mine) {
				self = &identity{member: m.GetID(), cluster: resp.GetHeader().GetClusterId()}
			} else if len(m.GetPeerURLs()) > 0 {
				r.peers.hint(m.GetID(), m.GetPeerURLs()[0])
			}
		}
		if self == nil {
			return nil, fmt.Errorf("KVMESH_REPLICA_PEER_URLS: no member of the cluster has peer URLs %v; add it first (MemberAdd)", r.cfg.PeerURLs)
		}
		return self, nil
	}
	return nil, fmt.Errorf("KVMESH_REPLICA_INITIAL_CLUSTER: no member answered: %w", errors.Join(errs...))
}
