package gateway

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/streammux"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
)

// The Lease API. Grants and revokes are writes (to the leader, like puts). Keep-alives
// and TimeToLive can only be answered by the leader, which alone keeps the lease
// clocks: a replica that is not the leader says so, and the gateway asks the leader it
// learns of next, so a client's keep-alive stream outlives leader changes unnoticed.
//
// Keep-alives from every client stream travel to a replica over one stream per
// replica (a keeper), in batches: whatever queued while the previous batch was being
// written goes out as the next one.

// renewTimeout bounds how long a keep-alive looks for a leader before the client's
// stream fails (clientv3 then opens another).
const renewTimeout = 5 * time.Second

// renewRetry is the pause before a keep-alive that found no leader is sent again.
const renewRetry = 50 * time.Millisecond

// Lease checks as etcd's: granting needs some user (with auth enabled); revoking,
// reading the keys of a lease and listing leases are decided by the replica too, for
// a user other than root, against the keys attached (which only replicas know).

func (g *Gateway) LeaseGrant(ctx context.Context, r *pb.LeaseGrantRequest) (*pb.LeaseGrantResponse, error) {
	return authorized(ctx, g, requireInfo, func(ctx context.Context) (*pb.LeaseGrantResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.LeaseGrant, r)
	})
}

func (g *Gateway) LeaseRevoke(ctx context.Context, r *pb.LeaseRevokeRequest) (*pb.LeaseRevokeResponse, error) {
	return authorized(ctx, g, allow, func(ctx context.Context) (*pb.LeaseRevokeResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.LeaseRevoke, r)
	})
}

// LeaseLeases goes to the leader, so a client sees the leases it was just granted.
func (g *Gateway) LeaseLeases(ctx context.Context, r *pb.LeaseLeasesRequest) (*pb.LeaseLeasesResponse, error) {
	return authorized(ctx, g, requireInfo, func(ctx context.Context) (*pb.LeaseLeasesResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.LeaseLeases, r)
	})
}

// LeaseTimeToLive asks the leader, looking for it while replicas answer "not leader".
func (g *Gateway) LeaseTimeToLive(ctx context.Context, r *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	return nsAuthorized(ctx, g, r, func(_ []byte, r *pb.LeaseTimeToLiveRequest) *pb.LeaseTimeToLiveRequest { return r }, namespace.LeaseKeysOut,
		func(s *authz.Store, ai *authz.Info, _ *pb.LeaseTimeToLiveRequest) error { return requireInfo(s, ai) },
		g.leaseTimeToLive)
}

func (g *Gateway) leaseTimeToLive(ctx context.Context, r *pb.LeaseTimeToLiveRequest) (*pb.LeaseTimeToLiveResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, renewTimeout)
	defer cancel()
	for {
		resp, err := call(ctx, g, toLeader, replicaapi.API.LeaseTimeToLive, r)
		if !isNotLeader(err) {
			return resp, err
		}
		g.view.kick()
		select {
		case <-ctx.Done():
			return nil, etcderr.ErrNoLeader
		case <-time.After(renewRetry):
		}
	}
}

func isNotLeader(err error) bool { return errors.Is(err, etcderr.ErrNotLeader) }

// keepAlive serves one client's keep-alive stream: each request is renewed on the
// leader and answered when done, in whatever order they finish. A client that does
// not read its answers holds up only its own stream: at most keepAliveWindow
// keep-alives of a stream are under way, and reading the next request waits for one
// of them to be answered (as etcd, which answers one at a time, stops reading).
func (g *Gateway) keepAlive(ctx context.Context, recv func() (*pb.LeaseKeepAliveRequest, error), send func(*pb.LeaseKeepAliveResponse) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if requiresLeader(ctx) {
		if !g.hasLeader(ctx) {
			return etcderr.ErrNoLeader
		}
		go g.monitorLeader(ctx, cancel)
	}
	slots := make(chan struct{}, keepAliveWindow)
	out := make(chan *pb.LeaseKeepAliveResponse, keepAliveWindow)
	go func() {
		for {
			req, err := recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					// The client sent its last request: answer what is under way
					// (every slot free again) before ending the stream.
					for range keepAliveWindow {
						select {
						case slots <- struct{}{}:
						case <-ctx.Done():
							return
						}
					}
					err = errStreamEnded
				}
				cancel(err)
				return
			}
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			id := req.GetID()
			// etcd's checkLeaseRenew: with auth enabled, a user must be given; the
			// leader checks that user against the lease's keys (only it knows them).
			var user string
			if _, err := authorized(ctx, g, requireInfo, func(ctx context.Context) (*struct{}, error) {
				d, _ := authz.DecisionFrom(ctx)
				user = d.User
				return nil, nil
			}); err != nil {
				cancel(err)
				return
			}
			g.leases.submit(&renewal{id: id, user: user, ctx: ctx, deadline: time.Now().Add(renewTimeout),
				done: func(ttl int64, h *pb.ResponseHeader, err error) {
					if err != nil {
						cancel(err)
						return
					}
					out <- &pb.LeaseKeepAliveResponse{Header: h, ID: id, TTL: ttl} // never blocks: one slot each
				}})
		}
	}()
	for {
		select {
		case resp := <-out:
			if err := send(resp); err != nil {
				return err
			}
			<-slots
		case <-ctx.Done():
			err := context.Cause(ctx)
			if errors.Is(err, errStreamEnded) || errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		}
	}
}

// keepAliveWindow is how many keep-alives of one client stream may be under way.
const keepAliveWindow = 1024

var errStreamEnded = errors.New("the client closed its side of the stream")

// renewal is one keep-alive on its way to the leader.
type renewal struct {
	id       int64
	user     string          // the user it runs as ("" for none), checked by the leader
	ctx      context.Context // the client's stream: once it ends, nobody waits
	deadline time.Time
	done     func(ttl int64, h *pb.ResponseHeader, err error)
}

// leaseRouter sends keep-alives to the leader, one keeper per replica.
type leaseRouter struct {
	g       *Gateway
	mu      sync.Mutex
	keepers map[*replicaConn]*keeper
	stopped bool
}

func newLeaseRouter(g *Gateway) *leaseRouter {
	return &leaseRouter{g: g, keepers: make(map[*replicaConn]*keeper)}
}

// submit queues rn on the keeper of the replica most likely to lead.
func (lr *leaseRouter) submit(rn *renewal) {
	for {
		if rn.ctx.Err() != nil {
			return
		}
		if time.Now().After(rn.deadline) {
			err := error(etcderr.ErrTimeout)
			if lr.g.view.leaderID() == 0 {
				err = etcderr.ErrNoLeader
			}
			rn.done(0, nil, err)
			return
		}
		order := lr.g.view.forWrite()
		if len(order) == 0 {
			lr.retry(rn)
			return
		}
		k := lr.keeper(order[0])
		if k == nil {
			rn.done(0, nil, etcderr.ErrStopped)
			return
		}
		if k.add(rn) {
			return
		}
	}
}

// retry submits rn again shortly, once the view had a chance to learn the leader.
func (lr *leaseRouter) retry(rn *renewal) {
	lr.g.view.kick()
	time.AfterFunc(renewRetry, func() { lr.submit(rn) })
}

func (lr *leaseRouter) keeper(c *replicaConn) *keeper {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if lr.stopped {
		return nil
	}
	k := lr.keepers[c]
	if k == nil {
		k = &keeper{lr: lr, c: c, mux: streammux.New[*renewal]()}
		var ctx context.Context
		ctx, k.cancel = context.WithCancel(context.Background())
		lr.keepers[c] = k
		go k.run(ctx)
	}
	return k
}

func (lr *leaseRouter) forget(k *keeper) {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if lr.keepers[k.c] == k {
		delete(lr.keepers, k.c)
	}
}

func (lr *leaseRouter) stop() {
	lr.mu.Lock()
	lr.stopped = true
	keepers := lr.keepers
	lr.keepers = nil
	lr.mu.Unlock()
	for _, k := range keepers {
		k.cancel()
	}
}

// keeper carries keep-alives to one replica over one KeepAlive stream.
type keeper struct {
	lr     *leaseRouter
	c      *replicaConn
	cancel context.CancelFunc
	mux    *streammux.Mux[*renewal]
}

// add queues rn; false when the keeper's stream has failed (submit picks another).
func (k *keeper) add(rn *renewal) bool { return k.mux.Add(rn) }

// keepAliveMaxBatch bounds the keep-alives of one message.
const keepAliveMaxBatch = 4096

func (k *keeper) run(ctx context.Context) {
	// The keeper's stream carries the renewals of many clients for as long as the
	// gateway runs: not a request of its own to trace.
	stream, err := k.c.api.KeepAlive(telemetry.Untraced(ctx))
	if err != nil {
		k.fail(err)
		return
	}
	go k.receive(stream)
	err = k.mux.Run(ctx, keepAliveMaxBatch, func(seq uint64, batch []*renewal) error {
		ids := make([]int64, len(batch))
		users := make([]string, len(batch))
		for i, rn := range batch {
			ids[i], users[i] = rn.id, rn.user
		}
		return stream.Send(&replicav1.KeepAliveBatch{Seq: seq, Ids: ids, Users: users})
	})
	if err != nil {
		k.fail(err)
	}
}

func (k *keeper) receive(stream replicaapi.KeepAliveStream) {
	for {
		res, err := stream.Recv()
		if err != nil {
			k.fail(err)
			return
		}
		batch, _ := k.mux.TakeMessage(res.GetSeq())
		if res.GetNotLeader() || len(res.GetTtls()) != len(batch) {
			for _, rn := range batch {
				k.lr.retry(rn)
			}
			continue
		}
		if rev := res.GetHeader().GetRevision(); rev > 0 {
			k.lr.g.sawRevision(rev)
		}
		refused := res.GetRefused()
		for i, rn := range batch {
			if len(refused) > 0 && refused[0].GetIndex() == uint32(i) {
				// etcd ends the client's keep-alive stream with the error.
				rn.done(0, nil, etcderr.FromWire(connect.Code(refused[0].GetCode()), refused[0].GetMessage()))
				refused = refused[1:]
				continue
			}
			rn.done(res.GetTtls()[i], res.GetHeader(), nil)
		}
	}
}

// fail ends the keeper: what it had queued or sent goes to the leader again (a
// renewal sent twice is harmless).
func (k *keeper) fail(err error) {
	queued, sent, first := k.mux.Fail()
	if !first {
		return
	}
	pending := append(queued, sent...)
	k.cancel()
	k.lr.forget(k)
	if replicaapi.IsNotSent(err) {
		k.lr.g.view.markDown(k.c)
	} else if !errors.Is(err, context.Canceled) {
		k.lr.g.log.Debug("keep-alive stream to a replica ended", "replica", k.c.url, "err", err)
	}
	for _, rn := range pending {
		k.lr.retry(rn)
	}
}
