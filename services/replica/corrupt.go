package replica

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
)

// The corruption check (etcd's initial and periodic corruption checks). Every member,
// once it has caught up after it starts and then every CorruptCheckInterval, hashes
// its key history (HashKV) at a revision every voter has reached and compares with the
// other voters' hashes at that revision. A member whose hash differs from one that a
// majority of the cluster shares is the corrupt one: it raises the CORRUPT alarm for
// itself through Raft, and the cluster refuses writes (alarm.go) until an operator
// replaces the member and disarms. A member that finds itself in the majority does
// nothing: the odd one raises its own alarm. With fewer than three voters no majority
// can tell which side is corrupt; the disagreement is logged.

// corruptCheckTimeout bounds one round of the check.
const corruptCheckTimeout = 30 * time.Second

// corruptionLoop runs the check at start and every CorruptCheckInterval, until Stop.
func (r *Replica) corruptionLoop() {
	defer r.loops.Done()
	// The first check waits for this member to catch up: its applied index at the
	// commit index the leader told it.
	for !r.caughtUp() {
		select {
		case <-r.quitc:
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), corruptCheckTimeout)
		go func() {
			select {
			case <-r.quitc:
				cancel()
			case <-ctx.Done():
			}
		}()
		if err := r.checkCorruption(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("corruption check did not complete", "err", err)
		}
		cancel()
		if r.cfg.CorruptCheckInterval <= 0 {
			return
		}
		select {
		case <-r.quitc:
			return
		case <-time.After(r.cfg.CorruptCheckInterval):
		}
	}
}

// caughtUp tells whether this member has a leader and has applied what Raft committed.
func (r *Replica) caughtUp() bool {
	st := r.node.Status()
	return st.Lead != 0 && r.applied.Load() >= st.GetCommit()
}

// errCorruptionUndecided: hashes differ, but no majority tells which side is corrupt.
var errCorruptionUndecided = errors.New("hashes differ between members, and no majority shares one")

// checkCorruption runs one round of the check.
func (r *Replica) checkCorruption(ctx context.Context) error {
	self := r.id
	var peers []*pb.Member
	voters := 0
	for _, m := range r.members.list() {
		if m.GetIsLearner() {
			continue
		}
		voters++
		if m.GetID() != self && len(m.GetPeerURLs()) > 0 {
			peers = append(peers, m)
		}
	}
	if len(peers) == 0 {
		return nil
	}
	// The revision: the lowest any voter is at (HashKV answers only up to its own).
	rev := r.rev()
	conns := make(map[uint64]hashKVer, len(peers))
	for _, m := range peers {
		c, err := r.peerAPI().Dial(m.GetPeerURLs()[0])
		if err != nil {
			return err
		}
		defer c.Close()
		st, err := c.Status(ctx, &pb.StatusRequest{})
		if err != nil {
			r.log.Debug("corruption check: a member did not answer", "member_id", fmt.Sprintf("%x", m.GetID()), "err", err)
			continue
		}
		rev = min(rev, st.GetHeader().GetRevision())
		conns[m.GetID()] = c
	}
	own, err := (&maintenanceService{r: r}).HashKV(ctx, &pb.HashKVRequest{Revision: rev})
	if err != nil {
		return err
	}
	// Members at the same compaction hash the same history.
	agree, others := 0, map[uint32]int{}
	for id, c := range conns {
		h, err := c.HashKV(ctx, &pb.HashKVRequest{Revision: rev})
		if err != nil || h.GetCompactRevision() != own.GetCompactRevision() {
			r.log.Debug("corruption check: no comparable hash", "member_id", fmt.Sprintf("%x", id), "err", err)
			continue
		}
		if h.GetHash() == own.GetHash() {
			agree++
		} else {
			others[h.GetHash()]++
		}
	}
	r.m.corruptChecks.Inc()
	if len(others) == 0 {
		return nil
	}
	quorum := voters/2 + 1
	for hash, n := range others {
		if n >= quorum {
			r.log.Error("this member's key history differs from the cluster's majority: raising the CORRUPT alarm",
				"revision", rev, "hash", own.GetHash(), "majority_hash", hash, "members_agreeing_with_it", n)
			return r.raiseAlarm(ctx, pb.AlarmType_CORRUPT)
		}
	}
	if agree+1 >= quorum {
		return nil // the majority is with this member; the odd ones raise their own alarm
	}
	r.log.Error("corruption check: hashes differ", "revision", rev, "hash", own.GetHash(), "other_hashes", others)
	return errCorruptionUndecided
}

// hashKVer is the part of a member's API the check calls.
type hashKVer interface {
	HashKV(context.Context, *pb.HashKVRequest) (*pb.HashKVResponse, error)
}

// raiseAlarm raises typ for this member through Raft, unless it is already raised.
func (r *Replica) raiseAlarm(ctx context.Context, typ pb.AlarmType) error {
	for _, a := range r.alarms.list(typ) {
		if a.GetMemberID() == r.id {
			return nil
		}
	}
	_, err := r.propose(ctx, &replicav1.RaftRequest{Request: &replicav1.RaftRequest_Alarm{Alarm: &pb.AlarmRequest{
		Action: pb.AlarmRequest_ACTIVATE, MemberID: r.id, Alarm: typ}}})
	return err
}
