package replica

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.etcd.io/raft/v3"
	raftpb "go.etcd.io/raft/v3/raftpb"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// applyWork is what the Raft loop hands to the apply loop: committed entries, in
// order. done, when set, is closed once they are applied.
type applyWork struct {
	entries []*raftpb.Entry
	snap    *raftpb.Snapshot // a received snapshot to install instead of entries
	done    chan struct{}
}

// raftLoop drives the Raft node in raft's documented order: persist entries and
// HardState (one synced Pebble batch per Ready), send messages, hand committed entries
// to the apply loop, Advance. Apply runs in its own goroutine so the next Ready's fsync
// overlaps it; entries that change the configuration are applied before Advance.
func (r *Replica) raftLoop() {
	defer close(r.doneRaft)
	defer close(r.applyc)
	ticker := time.NewTicker(r.cfg.TickInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			r.node.Tick()
		case rd := <-r.node.Ready():
			if rd.SoftState != nil {
				r.setLeader(rd.SoftState.Lead)
			}
			if rd.HardState != nil && rd.HardState.GetTerm() != 0 {
				r.term.Store(rd.HardState.GetTerm())
			}
			// The leader may send while it persists (its own vote counts only once the
			// write is done); anyone else must persist first (raft's README).
			leader := r.leader.Load() == r.id
			if leader {
				r.peers.send(rd.Messages)
			}
			if !raft.IsEmptySnap(rd.Snapshot) {
				// Install the state first, then reset the log to it: a crash between
				// the two is repaired at start (reconcileLog), never the reverse.
				w := applyWork{snap: rd.Snapshot, done: make(chan struct{})}
				select {
				case r.applyc <- w:
				case <-r.stopc:
					return
				}
				select {
				case <-w.done:
				case <-r.stopc:
					return
				}
				if err := r.raftLog.ApplySnapshot(rd.Snapshot.GetMetadata()); err != nil {
					r.log.Error("resetting the raft log to a snapshot failed; stopping", "err", err)
					panic(fmt.Sprintf("raft log apply snapshot: %v", err))
				}
			}
			start := time.Now()
			if err := r.raftLog.Save(rd.HardState, rd.Entries, rd.MustSync); err != nil {
				// Without a durable log nothing can be acknowledged safely.
				r.log.Error("persisting raft log failed; stopping", "err", err)
				panic(fmt.Sprintf("raft log save: %v", err))
			}
			if rd.MustSync {
				r.m.walFsync.Observe(time.Since(start).Seconds())
			}
			if !leader {
				r.peers.send(rd.Messages)
			}
			for _, rs := range rd.ReadStates {
				r.read.deliver(rs)
			}
			if len(rd.CommittedEntries) > 0 {
				w := applyWork{entries: rd.CommittedEntries}
				if hasConfChange(rd.CommittedEntries) {
					w.done = make(chan struct{})
				}
				select {
				case r.applyc <- w:
				case <-r.stopc:
					return
				}
				if w.done != nil {
					select {
					case <-w.done:
					case <-r.stopc:
						return
					}
				}
			}
			r.node.Advance()
		case <-r.stopc:
			return
		}
	}
}

func hasConfChange(ents []*raftpb.Entry) bool {
	for _, e := range ents {
		if e.GetType() == raftpb.EntryType_EntryConfChange || e.GetType() == raftpb.EntryType_EntryConfChangeV2 {
			return true
		}
	}
	return false
}

func (r *Replica) setLeader(lead uint64) {
	old := r.leader.Swap(lead)
	if old == lead {
		return
	}
	if lead != raft.None {
		r.m.leaderChanges.Inc()
		r.log.Info("leader changed", "leader", fmt.Sprintf("%x", lead))
	}
	if lead == raft.None {
		r.m.hasLeader.Set(0)
	} else {
		r.m.hasLeader.Set(1)
	}
}

// result is what applying a proposal produced.
type result struct {
	resp proto.Message
	err  error
}

// waiter is a proposal waiting for its entry to be applied.
type waiter struct {
	ch  chan result
	ctx context.Context // carries the proposal's trace
	// commitSpan runs from the proposal until apply starts: the time to commit.
	commitSpan trace.Span
}

// applyLoop applies committed entries: every entry of one Ready in one Pebble batch,
// committed without sync together with the applied index (the Raft log is already
// durable, and replaying from the stored applied index is idempotent).
func (r *Replica) applyLoop() {
	defer close(r.doneApp)
	sinceTruncate := uint64(0)
	for w := range r.applyc {
		if w.snap != nil {
			r.installSnapshot(w.snap)
			close(w.done)
			sinceTruncate = 0
			continue
		}
		n := r.applyEntries(w.entries)
		if w.done != nil {
			close(w.done)
		}
		sinceTruncate += n
		if sinceTruncate >= r.cfg.SnapshotCount {
			sinceTruncate = 0
			r.truncateLog()
		}
	}
}

type applied struct {
	w   *waiter
	res result
}

func (r *Replica) applyEntries(ents []*raftpb.Entry) uint64 {
	last := ents[len(ents)-1].GetIndex()
	if last <= r.applied.Load() {
		return 0
	}
	st := r.st // only this goroutine replaces it
	b := st.db.NewIndexedBatch()
	defer b.Close()
	wr := st.kv.NewWriter(b)
	var done []applied
	var lops []leaseOp
	var n uint64
	for _, e := range ents {
		if e.GetIndex() <= r.applied.Load() {
			continue // replayed after a restart: already in the state machine
		}
		n++
		switch e.GetType() {
		case raftpb.EntryType_EntryNormal:
			if len(e.GetData()) == 0 {
				continue // a new leader's empty entry
			}
			req := &replicav1.RaftRequest{}
			if err := proto.Unmarshal(e.GetData(), req); err != nil {
				panic(fmt.Sprintf("decode raft entry %d: %v", e.GetIndex(), err))
			}
			w := r.takeWaiter(req.GetId())
			// Apply never sees the client's cancellation (it must be deterministic on
			// every member); it only joins the proposal's trace.
			ctx := context.Background()
			if w != nil {
				w.commitSpan.End()
			}
			span := noSpan
			if r.tel.Tracing() {
				if w != nil {
					ctx = trace.ContextWithSpanContext(ctx, trace.SpanContextFromContext(w.ctx))
				}
				_, span = r.tracer.Start(ctx, "mvcc.apply", trace.WithAttributes(attribute.Int64("raft.index", int64(e.GetIndex()))))
			}
			var res result
			if attrs := req.GetMemberAttributes(); attrs != nil {
				res.err = r.members.applyAttributes(b, attrs)
				res.resp = attrs
			} else if u := req.GetMemberUpdate(); u != nil {
				res.err = r.applyMemberUpdate(b, u)
			} else if t := req.GetLessorTerm(); t != 0 && t != e.GetTerm() {
				// A deposed leader's lessor decided this; the new leader decides alone.
				res.err = errNotPrimary
			} else if err := r.admit(wr, req); err != nil {
				res.err = err
			} else if a := req.GetAuth(); a != nil {
				res = r.applyAuth(b, a)
			} else if a := req.GetAlarm(); a != nil {
				res = r.applyAlarm(b, a)
			} else if err := r.alarms.refuses(req); err != nil {
				res.err = err
			} else {
				res = r.applyRequest(ctx, wr, req)
				if res.err == nil {
					lops = appendLeaseOp(lops, req)
				}
			}
			span.End()
			if w != nil {
				done = append(done, applied{w: w, res: res})
			}
		case raftpb.EntryType_EntryConfChange, raftpb.EntryType_EntryConfChangeV2:
			var cc raftpb.ConfChangeI
			if e.GetType() == raftpb.EntryType_EntryConfChange {
				v1 := &raftpb.ConfChange{}
				if err := proto.Unmarshal(e.GetData(), v1); err != nil {
					panic(fmt.Sprintf("decode conf change %d: %v", e.GetIndex(), err))
				}
				cc = v1
			} else {
				v2 := &raftpb.ConfChangeV2{}
				if err := proto.Unmarshal(e.GetData(), v2); err != nil {
					panic(fmt.Sprintf("decode conf change %d: %v", e.GetIndex(), err))
				}
				cc = v2
			}
			id, res, err := r.applyConfChange(b, cc)
			if err != nil {
				panic(fmt.Sprintf("apply conf change %d: %v", e.GetIndex(), err))
			}
			if w := r.takeWaiter(id); w != nil {
				w.commitSpan.End()
				done = append(done, applied{w: w, res: result{err: res}})
			}
		}
	}
	lastTerm := ents[len(ents)-1].GetTerm()
	if err := saveApplied(b, appliedPos{index: last, term: lastTerm}); err != nil {
		panic(fmt.Sprintf("record applied index: %v", err))
	}
	start := time.Now()
	if err := st.kv.Commit(wr, pebble.NoSync); err != nil {
		panic(fmt.Sprintf("commit applied batch: %v", err))
	}
	r.m.backendCommit.Observe(time.Since(start).Seconds())
	r.auth.publish()
	for _, id := range r.members.committed() {
		r.peers.forget(id)
	}
	if len(lops) > 0 {
		r.lessor.applied(lops)
	}
	r.applied.Store(last)
	r.appliedTerm.Store(lastTerm)
	r.m.applied.Add(float64(n))
	r.notifyApplied()
	for _, d := range done {
		d.w.ch <- d.res
	}
	return n
}

// notifyApplied wakes everyone waiting for the applied index to advance.
func (r *Replica) notifyApplied() {
	r.applyDone.Notify()
}

func (r *Replica) applyRequest(ctx context.Context, wr *mvcc.Writer, req *replicav1.RaftRequest) result {
	var res result
	switch op := req.GetRequest().(type) {
	case *replicav1.RaftRequest_Put:
		res.resp, res.err = wr.Put(ctx, op.Put)
	case *replicav1.RaftRequest_DeleteRange:
		res.resp, res.err = wr.DeleteRange(ctx, op.DeleteRange)
	case *replicav1.RaftRequest_Txn:
		res.resp, res.err = wr.Txn(ctx, op.Txn)
	case *replicav1.RaftRequest_Compaction:
		res.resp, res.err = wr.Compact(op.Compaction)
	case *replicav1.RaftRequest_LeaseGrant:
		res.resp, res.err = applyLeaseGrant(wr, op.LeaseGrant)
	case *replicav1.RaftRequest_LeaseRevoke:
		res.resp, res.err = wr.LeaseRevoke(ctx, op.LeaseRevoke.GetID())
	case *replicav1.RaftRequest_LeaseCheckpoint:
		res.resp, res.err = applyLeaseCheckpoint(wr, op.LeaseCheckpoint)
	default:
		res.err = fmt.Errorf("unknown raft request %T", op)
	}
	return res
}

// truncateLog drops applied entries from the log, keeping half of SnapshotCount
// (etcd's 5000 of 10000) for followers that are slightly behind. The applied state,
// committed without sync, is synced first: the log must never start after it.
func (r *Replica) truncateLog() {
	applied, keep := r.applied.Load(), r.cfg.SnapshotCount/2
	if applied <= keep {
		return
	}
	if err := r.st.db.LogData(nil, pebble.Sync); err != nil {
		r.log.Warn("syncing the state machine before log truncation failed", "err", err)
		return
	}
	if err := r.raftLog.Truncate(applied-keep, r.members.confState()); err != nil {
		r.log.Warn("raft log truncation failed", "err", err)
	}
}

func (r *Replica) takeWaiter(id uint64) *waiter {
	if id == 0 {
		return nil
	}
	r.waitMu.Lock()
	defer r.waitMu.Unlock()
	w := r.waiters[id]
	delete(r.waiters, id)
	return w
}

// noSpan is the span of work not traced: with no exporter configured, the hot paths
// skip starting spans (the no-op tracer still allocates a context per span).
var noSpan = trace.SpanFromContext(context.Background())

// propose replicates req through Raft and waits for the result of applying it.
func (r *Replica) propose(ctx context.Context, req *replicav1.RaftRequest) (proto.Message, error) {
	if r.tel.Tracing() {
		var span trace.Span
		ctx, span = r.tracer.Start(ctx, "raft.propose")
		defer span.End()
	}
	req.Id = r.nextID.Add(1)
	if d, ok := authz.DecisionFrom(ctx); ok {
		req.AuthStamp, req.AuthUser = d.Stamp, d.User
	}
	data, err := proto.Marshal(req)
	if err != nil {
		return nil, err
	}
	if len(data) > r.cfg.MaxRequestBytes {
		return nil, etcderr.ErrRequestTooLarge
	}
	return r.submit(ctx, req.Id, func(ctx context.Context) error { return r.node.Propose(ctx, data) })
}

// submit hands a proposal with the given id to Raft (propose) and waits for the result
// of applying it.
func (r *Replica) submit(ctx context.Context, id uint64, propose func(context.Context) error) (proto.Message, error) {
	if r.isRemoved() {
		return nil, etcderr.ErrStopped
	}
	cctx, cancel := context.WithTimeout(ctx, r.cfg.RequestTimeout)
	defer cancel()
	w := &waiter{ch: make(chan result, 1), ctx: cctx, commitSpan: noSpan}
	if r.tel.Tracing() {
		_, w.commitSpan = r.tracer.Start(ctx, "raft.commit")
	}
	r.waitMu.Lock()
	r.waiters[id] = w
	r.waitMu.Unlock()
	r.m.pending.Inc()
	defer r.m.pending.Dec()

	if err := propose(cctx); err != nil {
		r.takeWaiter(id)
		w.commitSpan.End()
		r.m.failed.Inc()
		return nil, r.proposeError(ctx, err)
	}
	select {
	case res := <-w.ch:
		return res.resp, res.err
	case <-cctx.Done():
		if r.takeWaiter(id) == nil {
			// Applied just now: the result is on its way.
			res := <-w.ch
			return res.resp, res.err
		}
		w.commitSpan.End()
		r.m.failed.Inc()
		return nil, r.proposeError(ctx, cctx.Err())
	case <-r.stopc:
		return nil, etcderr.ErrStopped
	}
}

// proposeError maps why a proposal did not finish to etcd's error: the client's own
// cancellation, or etcd's timeouts.
func (r *Replica) proposeError(ctx context.Context, err error) error {
	switch {
	case errors.Is(ctx.Err(), context.Canceled):
		return etcderr.ErrCanceled
	case errors.Is(err, raft.ErrStopped):
		return etcderr.ErrStopped
	case r.leader.Load() == raft.None:
		return etcderr.ErrTimeoutDueToLeaderFail
	}
	return etcderr.ErrTimeout
}

// waitAppliedInTerm blocks until index is applied and so is an entry of term or later.
func (r *Replica) waitAppliedInTerm(ctx context.Context, index, term uint64) error {
	for {
		ch := r.applyDone.C()
		if r.applied.Load() >= index && r.appliedTerm.Load() >= term {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-r.stopc:
			return etcderr.ErrStopped
		}
	}
}

// raftLogger adapts slog to raft's Logger.
type raftLogger struct{ l *slog.Logger }

func (l *raftLogger) Debug(v ...any)                 { l.l.Debug(fmt.Sprint(v...)) }
func (l *raftLogger) Debugf(format string, v ...any) { l.l.Debug(fmt.Sprintf(format, v...)) }
func (l *raftLogger) Info(v ...any)                  { l.l.Info(fmt.Sprint(v...)) }
func (l *raftLogger) Infof(format string, v ...any)  { l.l.Info(fmt.Sprintf(format, v...)) }
func (l *raftLogger) Warning(v ...any)               { l.l.Warn(fmt.Sprint(v...)) }
func (l *raftLogger) Warningf(format string, v ...any) {
	l.l.Warn(fmt.Sprintf(format, v...))
}
func (l *raftLogger) Error(v ...any)                 { l.l.Error(fmt.Sprint(v...)) }
func (l *raftLogger) Errorf(format string, v ...any) { l.l.Error(fmt.Sprintf(format, v...)) }
func (l *raftLogger) Fatal(v ...any)                 { l.l.Error(fmt.Sprint(v...)); panic(fmt.Sprint(v...)) }
func (l *raftLogger) Fatalf(format string, v ...any) {
	l.l.Error(fmt.Sprintf(format, v...))
	panic(fmt.Sprintf(format, v...))
}
func (l *raftLogger) Panic(v ...any) { panic(fmt.Sprint(v...)) }
func (l *raftLogger) Panicf(format string, v ...any) {
	panic(fmt.Sprintf(format, v...))
}
