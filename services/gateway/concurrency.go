package gateway

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/api/gen/v3electionpb"
	"github.com/kvmesh/kvmesh/api/gen/v3lockpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
)

// etcd's Lock and Election services. etcd serves them by running its client recipes
// (clientv3/concurrency) inside the server, against its own API, with the caller's
// credentials. The gateway does the same against its own API: every step is a Range,
// Txn, DeleteRange, LeaseGrant or Watch of the caller's, decided for the caller and
// mapped into the caller's namespace. So the permission checks are etcd's (Lock needs
// write on its key and read on the lock's prefix, and so on), lock and election keys
// live in the namespace like any other key, and waiting for a lock is a watch served
// by the gateway's hub, never by a replica. The keys and revisions are etcd's too: a
// lock's key is "name/<lease in hex>", and the oldest key under "name/" holds it.

// sessionTTL is the lease a lock or a campaign takes when given none
// (concurrency.defaultSessionTTL).
const sessionTTL = 60

// cleanupTimeout bounds the delete that takes back the key of a lock or campaign its
// caller gave up on.
const cleanupTimeout = 5 * time.Second

// The recipes' own errors, with etcd's messages (code Unknown).
var (
	errElectionNotLeader = errors.New("election: not leader")
	errElectionNoLeader  = errors.New("election: no leader")
	errMissingLeaderKey  = errors.New(`"leader" field must be provided`)
	errSessionExpired    = errors.New("mutex: session is expired")
	errLostWatcher       = errors.New("lost watcher waiting for delete")
)

// recipeErr is the error etcd answers when a step fails: its recipe got the error as
// a client does and handed it back as a plain error, so the code is Unknown and the
// message the step's (clientv3 maps it back by message). A missing leader stays
// Unavailable, so clients retry it; the end of the caller's context stays what it is.
func recipeErr(err error) error {
	if err == nil {
		return nil
	}
	switch code, msg := etcderr.CodeMessage(err); code {
	case connect.CodeUnavailable, connect.CodeCanceled, connect.CodeDeadlineExceeded, connect.CodeUnknown:
		return err
	default:
		return errors.New(msg)
	}
}

// sessionLease is concurrency.NewSession's lease: the one given, or a new one of
// sessionTTL seconds for 0. As etcd's servers, the gateway does not keep it alive.
func (g *Gateway) sessionLease(ctx context.Context, lease int64) (int64, error) {
	if lease != 0 {
		return lease, nil
	}
	r, err := g.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: sessionTTL})
	if err != nil {
		return 0, err
	}
	return r.GetID(), nil
}

// sessionKey is the key of a session's lock or campaign under pfx ("%s%x").
func sessionKey(pfx []byte, lease int64) []byte {
	return strconv.AppendInt(bytes.Clone(pfx), lease, 16)
}

func recipePrefix(name []byte) []byte { return append(bytes.Clone(name), '/') }

func createRevIs(key []byte, rev int64) *pb.Compare {
	return &pb.Compare{Target: pb.Compare_CREATE, Result: pb.Compare_EQUAL, Key: key, TargetUnion: &pb.Compare_CreateRevision{CreateRevision: rev}}
}

func opPut(key, value []byte, lease int64) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: key, Value: value, Lease: lease}}}
}

func opGet(key []byte) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: key}}}
}

func opRange(r *pb.RangeRequest) *pb.RequestOp {
	return &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: r}}
}

// oldest is clientv3's Get(pfx, WithFirstCreate()): the key under pfx created first.
func oldest(pfx []byte) *pb.RangeRequest {
	return &pb.RangeRequest{Key: pfx, RangeEnd: namespace.End(pfx), Limit: 1, SortOrder: pb.RangeRequest_ASCEND, SortTarget: pb.RangeRequest_CREATE}
}

// cleanupContext outlives the caller's context (the caller may be gone) but keeps its
// credentials, so the cleanup is decided for the same user.
func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
}

// joined is a session's key under "name/" after join.
type joined struct {
	pfx, key []byte
	lease    int64
	rev      int64 // the key's create revision
	txn      *pb.TxnResponse
}

// join is the first step of a lock or a campaign (concurrency.Mutex.tryAcquire,
// Election.Campaign): the session's lease, and its key under "name/" put with value
// unless it is there already. The extra ops run in both branches, after the put or
// after the read of the key that was there.
func (g *Gateway) join(ctx context.Context, name []byte, lease int64, value []byte, extra ...*pb.RequestOp) (joined, error) {
	lease, err := g.sessionLease(ctx, lease)
	if err != nil {
		return joined{}, recipeErr(err)
	}
	j := joined{pfx: recipePrefix(name), lease: lease}
	j.key = sessionKey(j.pfx, lease)
	j.txn, err = g.Txn(ctx, &pb.TxnRequest{
		Compare: []*pb.Compare{createRevIs(j.key, 0)},
		Success: append([]*pb.RequestOp{opPut(j.key, value, lease)}, extra...),
		Failure: append([]*pb.RequestOp{opGet(j.key)}, extra...),
	})
	if err != nil {
		return joined{}, recipeErr(err)
	}
	if j.rev, err = joinedRevision(j.txn); err != nil {
		return joined{}, err
	}
	return j, nil
}

// Lock is concurrency.Mutex.Lock on a session with r's lease.
func (g *Gateway) Lock(ctx context.Context, r *v3lockpb.LockRequest) (*v3lockpb.LockResponse, error) {
	// Join the waiters (or find our key there already); the oldest waiter holds the
	// lock, and the same round trip tells who that is.
	j, err := g.join(ctx, r.GetName(), r.GetLease(), nil, opRange(oldest(recipePrefix(r.GetName()))))
	if err != nil {
		return nil, err
	}
	t, pfx, key, myRev := j.txn, j.pfx, j.key, j.rev
	if len(t.GetResponses()) != 2 {
		return nil, errTxnShape
	}
	owner := t.GetResponses()[1].GetResponseRange().GetKvs()
	if len(owner) == 0 || owner[0].GetCreateRevision() == myRev {
		return &v3lockpb.LockResponse{Header: t.GetHeader(), Key: key}, nil
	}
	unlock := func() {
		ctx, cancel := cleanupContext(ctx)
		defer cancel()
		if _, err := g.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: key}); err != nil {
			g.log.Warn("lock: could not delete the key of a waiter that gave up", "err", err)
		}
	}
	if err := g.waitDeletes(ctx, "Lock", pfx, myRev-1); err != nil {
		unlock()
		return nil, recipeErr(err)
	}
	// The waiters before us are gone; is our key still there (the lease may have
	// expired while we waited)?
	gr, err := g.Range(ctx, &pb.RangeRequest{Key: key})
	if err != nil {
		unlock()
		return nil, recipeErr(err)
	}
	if len(gr.GetKvs()) == 0 {
		return nil, errSessionExpired
	}
	return &v3lockpb.LockResponse{Header: gr.GetHeader(), Key: key}, nil
}

// joinedRevision is the create revision of the key a lock or campaign txn put (its
// revision) or found (its first range).
func joinedRevision(t *pb.TxnResponse) (int64, error) {
	if t.GetSucceeded() {
		return t.GetHeader().GetRevision(), nil
	}
	if len(t.GetResponses()) == 0 || len(t.GetResponses()[0].GetResponseRange().GetKvs()) == 0 {
		return 0, errTxnShape
	}
	return t.GetResponses()[0].GetResponseRange().GetKvs()[0].GetCreateRevision(), nil
}

// errTxnShape is a txn answer without the responses its ops must have given (a
// replica's bug: the compare failed, so the key was there).
var errTxnShape = errors.New("kvmesh: txn answered without its ops' responses")

// Unlock deletes the lock's key, as etcd's (a key that is not there is no error).
func (g *Gateway) Unlock(ctx context.Context, r *v3lockpb.UnlockRequest) (*v3lockpb.UnlockResponse, error) {
	d, err := g.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: r.GetKey()})
	if err != nil {
		return nil, recipeErr(err)
	}
	return &v3lockpb.UnlockResponse{Header: d.GetHeader()}, nil
}

// waitDeletes returns once no key under pfx with a create revision up to maxCreateRev
// is left: it watches the youngest of them until it is deleted, then looks again.
func (g *Gateway) waitDeletes(ctx context.Context, rpc string, pfx []byte, maxCreateRev int64) error {
	ctx, span := g.tracer.Start(ctx, "recipe.wait", trace.WithAttributes(
		attribute.String("rpc", rpc), attribute.Int64("max_create_revision", maxCreateRev)))
	defer span.End()
	w := g.m.recipeWaiters.WithLabelValues(rpc)
	w.Inc()
	defer w.Dec()
	start := time.Now()
	for {
		r, err := g.Range(ctx, &pb.RangeRequest{Key: pfx, RangeEnd: namespace.End(pfx), Limit: 1,
			SortOrder: pb.RangeRequest_DESCEND, SortTarget: pb.RangeRequest_CREATE, MaxCreateRevision: maxCreateRev})
		if err != nil {
			span.RecordError(err)
			return err
		}
		if len(r.GetKvs()) == 0 {
			g.log.Debug("recipe: waited for older keys", "rpc", rpc, "waited", time.Since(start))
			return nil
		}
		err = g.watchOne(ctx, &pb.WatchCreateRequest{Key: r.GetKvs()[0].GetKey(), StartRevision: r.GetHeader().GetRevision()},
			func(resp *pb.WatchResponse) (bool, error) {
				for _, ev := range resp.GetEvents() {
					if ev.GetType() == mvccpb.Event_DELETE {
						return true, nil
					}
				}
				return false, nil
			})
		if err != nil {
			span.RecordError(err)
			return err
		}
	}
}

// watchEnd ends a watchOne from inside: err nil when its function said done.
type watchEnd struct{ err error }

func (e *watchEnd) Error() string {
	if e.err == nil {
		return "watch done"
	}
	return e.err.Error()
}

// watchOne runs one watch of the caller's through the gateway's own watch path (the
// permission check, the namespace, the catch-up from history) and hands fn every
// response with events until fn says done. A canceled watch ends with etcd's error
// for it, as clientv3's WatchResponse.Err.
func (g *Gateway) watchOne(ctx context.Context, cr *pb.WatchCreateRequest, fn func(*pb.WatchResponse) (done bool, err error)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send := func(resp *pb.WatchResponse) error {
		switch {
		case resp.GetCanceled():
			return &watchEnd{err: watchCancelErr(resp)}
		case len(resp.GetEvents()) == 0:
			return nil // created, progress
		}
		done, err := fn(resp)
		if err != nil {
			return &watchEnd{err: err}
		}
		if done {
			return &watchEnd{}
		}
		return nil
	}
	err := g.watch(ctx, createOnce(ctx, cr), send, nil)
	var end *watchEnd
	switch {
	case errors.As(err, &end):
		return end.err
	case err != nil:
		return err
	case ctx.Err() != nil:
		return ctx.Err()
	}
	return errLostWatcher
}

// watchCancelErr is clientv3's WatchResponse.Err for a canceled watch.
func watchCancelErr(resp *pb.WatchResponse) error {
	switch {
	case resp.GetCompactRevision() != 0:
		return etcderr.ErrCompacted
	case resp.GetCancelReason() != "":
		return errors.New(resp.GetCancelReason())
	}
	return etcderr.ErrFutureRev
}

// Campaign is concurrency.Election.Campaign on a session with r's lease: the
// campaign's key under "name/", leader once every older key is gone.
func (g *Gateway) Campaign(ctx context.Context, r *v3electionpb.CampaignRequest) (*v3electionpb.CampaignResponse, error) {
	j, err := g.join(ctx, r.GetName(), r.GetLease(), r.GetValue())
	if err != nil {
		return nil, err
	}
	t, pfx, key, lease, rev := j.txn, j.pfx, j.key, j.lease, j.rev
	if !t.GetSucceeded() {
		// Campaigning again with the same lease: the campaign goes on, with the new
		// value.
		if kv := t.GetResponses()[0].GetResponseRange().GetKvs()[0]; !bytes.Equal(kv.GetValue(), r.GetValue()) {
			if _, err := g.proclaim(ctx, key, rev, lease, r.GetValue()); err != nil {
				g.resign(ctx, key, rev)
				return nil, recipeErr(err)
			}
		}
	}
	if err := g.waitDeletes(ctx, "Campaign", pfx, rev-1); err != nil {
		// A caller that gave up withdraws; any other failure leaves the key to its
		// lease, as etcd's.
		if ctx.Err() != nil {
			cctx, cancel := cleanupContext(ctx)
			if _, err := g.resign(cctx, key, rev); err != nil {
				g.log.Warn("election: could not withdraw the campaign of a caller that gave up", "err", err)
			}
			cancel()
		}
		return nil, recipeErr(err)
	}
	return &v3electionpb.CampaignResponse{
		Header: t.GetHeader(),
		Leader: &v3electionpb.LeaderKey{Name: r.GetName(), Key: key, Rev: rev, Lease: lease},
	}, nil
}

// proclaim puts val on the leader's key while it is the key created at rev.
func (g *Gateway) proclaim(ctx context.Context, key []byte, rev, lease int64, val []byte) (*pb.ResponseHeader, error) {
	t, err := g.Txn(ctx, &pb.TxnRequest{
		Compare: []*pb.Compare{createRevIs(key, rev)},
		Success: []*pb.RequestOp{opPut(key, val, lease)},
	})
	if err != nil {
		return nil, err
	}
	if !t.GetSucceeded() {
		return nil, errElectionNotLeader
	}
	return t.GetHeader(), nil
}

// resign deletes the leader's key while it is the key created at rev.
func (g *Gateway) resign(ctx context.Context, key []byte, rev int64) (*pb.ResponseHeader, error) {
	t, err := g.Txn(ctx, &pb.TxnRequest{
		Compare: []*pb.Compare{createRevIs(key, rev)},
		Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: &pb.DeleteRangeRequest{Key: key}}}},
	})
	if err != nil {
		return nil, err
	}
	return t.GetHeader(), nil
}

// Proclaim is concurrency.ResumeElection(...).Proclaim: the leader's new value, or
// "election: not leader" when its key is no longer the one it created.
func (g *Gateway) Proclaim(ctx context.Context, r *v3electionpb.ProclaimRequest) (*v3electionpb.ProclaimResponse, error) {
	l := r.GetLeader()
	if l == nil {
		return nil, errMissingLeaderKey
	}
	lease, err := g.sessionLease(ctx, l.GetLease())
	if err != nil {
		return nil, recipeErr(err)
	}
	h, err := g.proclaim(ctx, l.GetKey(), l.GetRev(), lease, r.GetValue())
	if err != nil {
		return nil, recipeErr(err)
	}
	return &v3electionpb.ProclaimResponse{Header: h}, nil
}

// Resign is concurrency.ResumeElection(...).Resign: the leader's key is deleted if it
// is still the one it created; either way the answer is a header.
func (g *Gateway) Resign(ctx context.Context, r *v3electionpb.ResignRequest) (*v3electionpb.ResignResponse, error) {
	l := r.GetLeader()
	if l == nil {
		return nil, errMissingLeaderKey
	}
	// etcd's server opens a session on the leader's lease here too, which grants a
	// lease for 0.
	if _, err := g.sessionLease(ctx, l.GetLease()); err != nil {
		return nil, recipeErr(err)
	}
	h, err := g.resign(ctx, l.GetKey(), l.GetRev())
	if err != nil {
		return nil, recipeErr(err)
	}
	return &v3electionpb.ResignResponse{Header: h}, nil
}

// Leader answers the election's oldest key.
func (g *Gateway) Leader(ctx context.Context, r *v3electionpb.LeaderRequest) (*v3electionpb.LeaderResponse, error) {
	gr, err := g.Range(ctx, oldest(recipePrefix(r.GetName())))
	if err != nil {
		return nil, recipeErr(err)
	}
	if len(gr.GetKvs()) == 0 {
		return nil, errElectionNoLeader
	}
	return &v3electionpb.LeaderResponse{Header: gr.GetHeader(), Kv: gr.GetKvs()[0]}, nil
}

// observe is concurrency.Election.Observe: the leader, then each value it proclaims,
// then the next leader once it is gone, until the caller leaves. Where etcd's server
// ends the stream without a word when a step fails (say, permission denied), the
// gateway answers the step's error.
func (g *Gateway) observe(ctx context.Context, r *v3electionpb.LeaderRequest, send func(*v3electionpb.LeaderResponse) error) error {
	pfx := recipePrefix(r.GetName())
	for {
		gr, err := g.Range(ctx, oldest(pfx))
		if err != nil {
			return recipeErr(err)
		}
		var hdr *pb.ResponseHeader
		var kv *mvccpb.KeyValue
		if len(gr.GetKvs()) > 0 {
			hdr, kv = gr.GetHeader(), gr.GetKvs()[0]
		} else {
			// No leader yet: the first key put under the prefix is the next.
			err := g.recipeWatch(ctx, "Observe", &pb.WatchCreateRequest{Key: pfx, RangeEnd: namespace.End(pfx), StartRevision: gr.GetHeader().GetRevision()},
				func(resp *pb.WatchResponse) (bool, error) {
					for _, ev := range resp.GetEvents() {
						if ev.GetType() == mvccpb.Event_PUT {
							// The header at the put, as etcd's.
							h := resp.GetHeader()
							hdr = &pb.ResponseHeader{ClusterId: h.GetClusterId(), MemberId: h.GetMemberId(), RaftTerm: h.GetRaftTerm(), Revision: ev.GetKv().GetModRevision()}
							kv = ev.GetKv()
							return true, nil
						}
					}
					return false, nil
				})
			if err != nil {
				return recipeErr(err)
			}
		}
		if err := send(&v3electionpb.LeaderResponse{Header: hdr, Kv: kv}); err != nil {
			return err
		}
		// Follow the leader's key: each put is a proclamation, the delete ends its term.
		err = g.recipeWatch(ctx, "Observe", &pb.WatchCreateRequest{Key: kv.GetKey(), StartRevision: hdr.GetRevision() + 1},
			func(resp *pb.WatchResponse) (bool, error) {
				for _, ev := range resp.GetEvents() {
					if ev.GetType() == mvccpb.Event_DELETE {
						return true, nil
					}
					if err := send(&v3electionpb.LeaderResponse{Header: resp.GetHeader(), Kv: ev.GetKv()}); err != nil {
						return false, err
					}
				}
				return false, nil
			})
		if err != nil {
			return recipeErr(err)
		}
	}
}

// recipeWatch is watchOne counted among the waiters of rpc.
func (g *Gateway) recipeWatch(ctx context.Context, rpc string, cr *pb.WatchCreateRequest, fn func(*pb.WatchResponse) (bool, error)) error {
	w := g.m.recipeWaiters.WithLabelValues(rpc)
	w.Inc()
	defer w.Dec()
	return g.watchOne(ctx, cr, fn)
}
