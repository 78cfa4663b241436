package replica

import (
	"container/heap"
	"context"
	"errors"
	"sync"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// The lessor decides when leases expire. Only the leader keeps their clocks (it is the
// "primary" lessor, as etcd calls it); followers keep only the committed lease table
// (mvcc), from which a new leader starts the clocks:
//
//   - Promotion happens once the leader has applied an entry of its own term, so every
//     lease committed before is known. Each lease gets its checkpointed remaining TTL
//     (or its whole TTL) plus an election timeout, as etcd extends leases on promotion:
//     clients get the time an election took to find the new leader.
//   - Keep-alives renew a clock in memory: no Raft write. The leader first confirms it
//     still leads (a batched ReadIndex round, as etcd's ensureLeadership), so a deposed
//     leader never acknowledges a renewal the new leader does not know of.
//   - A lease that has gone half its TTL without a keep-alive (clientv3 renews every
//     third of it) has its remaining TTL checkpointed through Raft every
//     LeaseCheckpointInterval, so a leader change does not give a dying lease its whole
//     TTL again. A renewal of a checkpointed lease clears the checkpoint through Raft
//     before it is acknowledged, so a leader change never shortens a renewed lease.
//   - Expired leases are revoked through Raft, at most LeaseRevokeRate per second. A
//     keep-alive for an expired lease waits for the revoke and answers "not found".
//
// Everything the lessor proposes carries the term it leads in; apply ignores it in an
// entry of another term (a deposed leader's proposal forwarded to the new leader).

// expiredRetry is when the leader tries again to revoke an expired lease whose revoke
// did not go through.
const expiredRetry = 3 * time.Second

// maxCheckpointBatch bounds the checkpoints of one Raft entry (etcd's batch size).
const maxCheckpointBatch = 1000

// lessorTick is how often the lessor looks for expired leases and leadership changes.
const lessorTick = 50 * time.Millisecond

// errNotPrimary: this member is not (or no longer) the leader that keeps lease clocks.
var errNotPrimary = etcderr.ErrNotLeader

type lessor struct {
	r      *Replica
	extend time.Duration // added to every lease on promotion: an election timeout
	done   chan struct{}

	mu      sync.Mutex
	term    uint64 // the term this member is the primary in; 0 when it is not
	demotec chan struct{}
	clocks  map[int64]*leaseClock
	expiry  expiryHeap
	lastCP  time.Time
	budget  float64 // revokes allowed now (refilled at LeaseRevokeRate)
	lastRev time.Time
}

// leaseClock is one lease's clock on the primary.
type leaseClock struct {
	id, ttl int64
	expiry  time.Time
	index   int // in the expiry heap; -1 while its revoke is under way
	// expired is set once the lease expired: it is never renewed again.
	expired bool
	// gone is closed when the lease is revoked (demotion closes the lessor's demotec).
	gone chan struct{}
	// cp is the remaining TTL a new leader would start the lease from, as last proposed
	// or applied; 0 means its whole TTL.
	cp int64
}

func (l *lessor) init(r *Replica) {
	l.r = r
	l.extend = time.Duration(r.cfg.ElectionTicks) * r.cfg.TickInterval
	l.done = make(chan struct{})
}

func (l *lessor) wait() { <-l.done }

func (l *lessor) run() {
	defer close(l.done)
	t := time.NewTicker(lessorTick)
	defer t.Stop()
	for {
		select {
		case <-l.r.stopc:
			l.mu.Lock()
			l.demoteLocked()
			l.mu.Unlock()
			return
		case now := <-t.C:
			l.tick(now)
		}
	}
}

// tick follows leadership and, on the primary, revokes expired leases and
// checkpoints lapsing ones.
func (l *lessor) tick(now time.Time) {
	r := l.r
	l.mu.Lock()
	defer l.mu.Unlock()
	term := r.term.Load()
	if r.leader.Load() != r.id {
		l.demoteLocked()
		return
	}
	if !l.followLocked(term, now) {
		return
	}
	l.expireLocked(now)
	if now.Sub(l.lastCP) >= r.cfg.LeaseCheckpointInterval {
		l.lastCP = now
		l.checkpointLocked(now)
	}
}

// followLocked makes the clocks those of term, the term this member leads in: it
// promotes once the member has applied an entry of term (so every lease committed
// before is known), and answers false until then.
func (l *lessor) followLocked(term uint64, now time.Time) bool {
	if l.term == term {
		return true
	}
	l.demoteLocked()
	if l.r.appliedTerm.Load() < term {
		return false
	}
	l.promoteLocked(term, now)
	return true
}

// promoteLocked starts the clocks of every committed lease.
func (l *lessor) promoteLocked(term uint64, now time.Time) {
	st := l.r.acquire()
	leases := st.kv.Leases()
	st.release()
	l.term, l.demotec = term, make(chan struct{})
	l.clocks = make(map[int64]*leaseClock, len(leases))
	l.expiry = make(expiryHeap, 0, len(leases))
	l.budget, l.lastRev, l.lastCP = 0, now, now
	for _, ls := range leases {
		left := ls.TTL
		if ls.Remaining > 0 {
			left = ls.Remaining
		}
		c := &leaseClock{id: ls.ID, ttl: ls.TTL, cp: ls.Remaining, gone: make(chan struct{}),
			expiry: now.Add(time.Duration(left)*time.Second + l.extend)}
		l.clocks[ls.ID] = c
		l.expiry = append(l.expiry, c)
		c.index = len(l.expiry) - 1
	}
	heap.Init(&l.expiry)
	l.r.log.Info("lessor promoted", "term", term, "leases", len(leases))
}

func (l *lessor) demoteLocked() {
	if l.term == 0 {
		return
	}
	l.r.log.Info("lessor demoted", "term", l.term)
	l.term = 0
	close(l.demotec)
	l.clocks, l.expiry = nil, nil
}

// primary makes sure this member leads and keeps the lease clocks, promoting it if it
// has just become leader, and answers the term it leads in.
func (l *lessor) primary(ctx context.Context) (uint64, error) {
	r := l.r
	for {
		term := r.term.Load()
		if r.leader.Load() != r.id {
			return 0, errNotPrimary
		}
		l.mu.Lock()
		ok := l.followLocked(term, time.Now())
		l.mu.Unlock()
		if ok {
			return term, nil
		}
		wctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
		err := r.waitAppliedInTerm(wctx, 0, term)
		cancel()
		if err != nil {
			return 0, errNotPrimary
		}
	}
}

// leaseOp is a committed lease change the primary's clocks follow.
type leaseOp struct {
	grant      *pb.LeaseGrantRequest
	revoke     int64
	checkpoint *pb.LeaseCheckpointRequest
}

// applied follows committed lease changes (called by the apply loop after commit).
func (l *lessor) applied(ops []leaseOp) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.term == 0 {
		return
	}
	now := time.Now()
	for _, op := range ops {
		switch {
		case op.grant != nil:
			id := op.grant.GetID()
			if l.clocks[id] != nil {
				continue // promotion already saw it
			}
			c := &leaseClock{id: id, ttl: op.grant.GetTTL(), gone: make(chan struct{}),
				expiry: now.Add(time.Duration(op.grant.GetTTL()) * time.Second)}
			l.clocks[id] = c
			heap.Push(&l.expiry, c)
		case op.checkpoint != nil:
			for _, cp := range op.checkpoint.GetCheckpoints() {
				if c := l.clocks[cp.GetID()]; c != nil {
					c.cp = cp.GetRemaining_TTL()
				}
			}
		default:
			l.forgetLocked(op.revoke)
		}
	}
}

func (l *lessor) forgetLocked(id int64) {
	c := l.clocks[id]
	if c == nil {
		return
	}
	delete(l.clocks, id)
	if c.index >= 0 {
		heap.Remove(&l.expiry, c.index)
	}
	close(c.gone)
}

// renew renews lease id and answers its TTL; ErrLeaseNotFound when it does not exist
// (or expired: then once its revoke is applied). The caller has confirmed leadership.
func (l *lessor) renew(ctx context.Context, term uint64, id int64) (int64, error) {
	l.mu.Lock()
	if l.term != term {
		l.mu.Unlock()
		return 0, errNotPrimary
	}
	c := l.clocks[id]
	if c == nil {
		l.mu.Unlock()
		return 0, etcderr.ErrLeaseNotFound
	}
	now := time.Now()
	if c.expired || !now.Before(c.expiry) {
		// Expired: the revoke is (or is about to be) under way.
		gone, demoted := c.gone, l.demotec
		l.mu.Unlock()
		select {
		case <-gone:
			return 0, etcderr.ErrLeaseNotFound
		case <-demoted:
			return 0, errNotPrimary
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	c.expiry = now.Add(time.Duration(c.ttl) * time.Second)
	heap.Fix(&l.expiry, c.index)
	clear := c.cp > 0
	ttl := c.ttl
	l.mu.Unlock()
	if clear {
		// A new leader would start this lease from its checkpoint, shorter than the
		// renewal promises: clear the checkpoint before acknowledging.
		cp := &pb.LeaseCheckpointRequest{Checkpoints: []*pb.LeaseCheckpoint{{ID: id}}}
		if _, err := l.r.propose(ctx, &replicav1.RaftRequest{LessorTerm: term,
			Request: &replicav1.RaftRequest_LeaseCheckpoint{LeaseCheckpoint: cp}}); err != nil {
			return 0, errNotPrimary
		}
	}
	return ttl, nil
}

// remaining answers lease id's remaining TTL in seconds, as etcd (truncated), and its
// granted TTL; ok is false when there is no such lease.
func (l *lessor) remaining(term uint64, id int64) (left, ttl int64, ok bool, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.term != term {
		return 0, 0, false, errNotPrimary
	}
	c := l.clocks[id]
	if c == nil {
		return 0, 0, false, nil
	}
	return int64(time.Until(c.expiry).Seconds()), c.ttl, true, nil
}

// expireLocked proposes the revoke of expired leases, within the revoke rate.
func (l *lessor) expireLocked(now time.Time) {
	rate := float64(l.r.cfg.LeaseRevokeRate)
	l.budget = min(l.budget+now.Sub(l.lastRev).Seconds()*rate, max(rate/10, 1))
	l.lastRev = now
	for l.budget >= 1 && l.expiry.Len() > 0 && !l.expiry[0].expiry.After(now) {
		c := heap.Pop(&l.expiry).(*leaseClock)
		c.expired = true
		l.budget--
		go l.revokeExpired(l.term, c)
	}
}

func (l *lessor) revokeExpired(term uint64, c *leaseClock) {
	r := l.r
	r.m.leasesExpired.Inc()
	_, err := r.propose(context.Background(), &replicav1.RaftRequest{LessorTerm: term,
		Request: &replicav1.RaftRequest_LeaseRevoke{LeaseRevoke: &pb.LeaseRevokeRequest{ID: c.id}}})
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.term != term || l.clocks[c.id] != c {
		return // demoted, or the revoke was applied
	}
	if errors.Is(err, etcderr.ErrLeaseNotFound) {
		l.forgetLocked(c.id)
		return
	}
	r.log.Warn("revoking an expired lease failed; will retry", "lease", c.id, "err", err)
	c.expiry = time.Now().Add(expiredRetry)
	heap.Push(&l.expiry, c)
}

// checkpointLocked proposes the remaining TTL of leases that have gone half their TTL
// without a keep-alive.
func (l *lessor) checkpointLocked(now time.Time) {
	var cps []*pb.LeaseCheckpoint
	for _, c := range l.clocks {
		if c.expired {
			continue
		}
		left := int64((c.expiry.Sub(now) + time.Second - 1) / time.Second)
		base := c.cp
		if base == 0 {
			base = c.ttl
		}
		if left <= 0 || left*2 > c.ttl || left >= base {
			continue
		}
		c.cp = left
		cps = append(cps, &pb.LeaseCheckpoint{ID: c.id, Remaining_TTL: left})
		if len(cps) == maxCheckpointBatch {
			break
		}
	}
	if len(cps) == 0 {
		return
	}
	term := l.term
	go func() {
		if _, err := l.r.propose(context.Background(), &replicav1.RaftRequest{LessorTerm: term,
			Request: &replicav1.RaftRequest_LeaseCheckpoint{LeaseCheckpoint: &pb.LeaseCheckpointRequest{Checkpoints: cps}}}); err != nil {
			l.r.log.Debug("lease checkpoint failed", "leases", len(cps), "err", err)
		}
	}()
}

// expiryHeap orders lease clocks by expiry.
type expiryHeap []*leaseClock

func (h expiryHeap) Len() int           { return len(h) }
func (h expiryHeap) Less(i, j int) bool { return h[i].expiry.Before(h[j].expiry) }
func (h expiryHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *expiryHeap) Push(x any) {
	c := x.(*leaseClock)
	c.index = len(*h)
	*h = append(*h, c)
}
func (h *expiryHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	c.index = -1
	return c
}
