package replica

import (
	"context"
	"encoding/binary"
	"sync"
	"time"

	"go.etcd.io/raft/v3"

	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// readLoop serves linearizable reads with Raft's ReadIndex. Reads arriving while a
// round is in flight share the next round, so one ReadIndex (one heartbeat round on a
// multi-member cluster) serves any number of waiting reads.
type readLoop struct {
	r *Replica

	mu      sync.Mutex
	next    *readRound
	trigger chan struct{}
	states  chan raft.ReadState
	done    chan struct{}
}

type readRound struct {
	ch  chan struct{}
	err error
}

func newRound() *readRound { return &readRound{ch: make(chan struct{})} }

func (l *readLoop) init(r *Replica) {
	l.r = r
	l.next = newRound()
	l.trigger = make(chan struct{}, 1)
	l.states = make(chan raft.ReadState, 16)
	l.done = make(chan struct{})
}

// deliver hands a ReadState from a Ready to the loop; stale ones are dropped there.
func (l *readLoop) deliver(rs raft.ReadState) {
	select {
	case l.states <- rs:
	default:
	}
}

func (l *readLoop) wait() { <-l.done }

// linearizable blocks until this replica has applied everything committed before the
// call, so a local read that follows is linearizable.
func (l *readLoop) linearizable(ctx context.Context) error {
	l.mu.Lock()
	round := l.next
	l.mu.Unlock()
	select {
	case l.trigger <- struct{}{}:
	default:
	}
	select {
	case <-round.ch:
		return round.err
	case <-ctx.Done():
		return etcderr.ErrCanceled
	case <-l.r.stopc:
		return etcderr.ErrStopped
	}
}

func (l *readLoop) run() {
	defer close(l.done)
	var seq uint64
	for {
		select {
		case <-l.trigger:
		case <-l.r.stopc:
			return
		}
		l.mu.Lock()
		round := l.next
		l.next = newRound()
		l.mu.Unlock()
		seq++
		round.err = l.round(seq)
		close(round.ch)
	}
}

// round runs one ReadIndex exchange and waits for the apply to reach its index.
func (l *readLoop) round(seq uint64) error {
	r := l.r
	timeout := r.cfg.RequestTimeout
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	rctx := binary.BigEndian.AppendUint64(nil, seq)
	// Retry while the cluster has no leader or the request was dropped (raft drops
	// read requests it cannot serve yet, e.g. before the leader commits in its term).
	retry := time.NewTicker(max(r.cfg.TickInterval*2, 50*time.Millisecond))
	defer retry.Stop()
	if err := r.node.ReadIndex(ctx, rctx); err != nil {
		return etcderr.ErrStopped
	}
	for {
		select {
		case rs := <-l.states:
			if len(rs.RequestCtx) != 8 || binary.BigEndian.Uint64(rs.RequestCtx) != seq {
				continue // an older round's answer
			}
			// raft answers a lone voter's ReadIndex with its commit index at once,
			// even before it has committed an entry of its term; after a restart that
			// index can trail entries that were committed (and acknowledged) before
			// the crash. An applied entry of the current term proves every earlier
			// entry committed and applied.
			if err := r.waitAppliedInTerm(ctx, rs.Index, r.term.Load()); err != nil {
				return etcderr.ErrTimeoutWaitAppliedIndex
			}
			return nil
		case <-retry.C:
			if err := r.node.ReadIndex(ctx, rctx); err != nil {
				return etcderr.ErrStopped
			}
		case <-ctx.Done():
			if r.leader.Load() == raft.None {
				return etcderr.ErrNoLeader
			}
			return etcderr.ErrTimeout
		case <-r.stopc:
			return etcderr.ErrStopped
		}
	}
}
