package gateway

import (
	"context"
	"errors"
	"time"

	"connectrpc.com/connect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcdcheck"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/health"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
)

// The gateway's logic, once per RPC, whatever the protocol: the Connect handlers
// (connect.go) and the grpc-go services (grpc.go) are thin adapters over these.

// route is where a request goes.
type route int

const (
	// toLeader: writes, membership and leadership changes, Status. Any voter would do
	// (followers forward proposals), but the leader saves a hop.
	toLeader route = iota
	// spread: serializable reads (and HashKV, MemberList), over the voters in turn.
	spread
	// leaderRead: linearizable reads. Any voter could serve one through ReadIndex, but
	// on the leader the ReadIndex is one heartbeat round, on a follower it also costs a
	// round trip to the leader.
	leaderRead
)

// call sends a client's message to a replica chosen by rt and returns its answer. A
// replica that cannot be reached at all (the connection is refused, so the request
// provably never arrived) is passed over for the next. A read that fails for want of
// a leader, or on a member that cannot serve it, is retried on the next replica: reads
// are safe to repeat. Any other failure is the client's answer, since a write may have
// been applied.
func call[Req, Res any](ctx context.Context, g *Gateway, rt route, method func(replicaapi.API, context.Context, *Req) (*Res, error), req *Req) (*Res, error) {
	if requiresLeader(ctx) && !g.hasLeader(ctx) {
		return nil, etcderr.ErrNoLeader
	}
	order := g.view.forRead()
	if rt != spread {
		order = g.view.forWrite()
	}
	err := error(etcderr.ErrNoLeader)
	for _, c := range order {
		resp, e := method(c.api, ctx, req)
		if e == nil {
			if h, ok := any(resp).(interface{ GetHeader() *pb.ResponseHeader }); ok {
				g.sawRevision(h.GetHeader().GetRevision())
			}
			return resp, nil
		}
		err = e
		if replicaapi.IsNotSent(e) {
			g.view.markDown(c)
			g.m.unreachable.Inc()
			continue
		}
		if rt != toLeader && retryableRead(e) && ctx.Err() == nil {
			g.view.kick()
			g.m.readRetries.Inc()
			continue
		}
		break
	}
	return nil, err
}

// retryableRead tells the errors after which a read may be sent to another replica:
// that replica lacks a leader, is stopping, or is a learner.
func retryableRead(err error) bool {
	return etcderr.CodeOf(err) == connect.CodeUnavailable || errors.Is(err, etcderr.ErrNotSupportedForLearner)
}

type requireLeaderKey struct{}

// withRequireLeader marks a request whose client sent the metadata hasleader=true:
// it fails with "no leader" while the cluster has none, instead of waiting.
func withRequireLeader(ctx context.Context) context.Context {
	return context.WithValue(ctx, requireLeaderKey{}, true)
}

func requiresLeader(ctx context.Context) bool { return ctx.Value(requireLeaderKey{}) != nil }

// txnRoute is where a txn goes: to the leader when it writes; otherwise as a read,
// serializable when every range in it is (at every nesting level).
func txnRoute(t *pb.TxnRequest) route {
	rt := spread
	for _, ops := range [][]*pb.RequestOp{t.GetSuccess(), t.GetFailure()} {
		for _, op := range ops {
			switch o := op.GetRequest().(type) {
			case *pb.RequestOp_RequestRange:
				if !o.RequestRange.GetSerializable() {
					rt = leaderRead
				}
			case *pb.RequestOp_RequestTxn:
				switch txnRoute(o.RequestTxn) {
				case toLeader:
					return toLeader
				case leaderRead:
					rt = leaderRead
				}
			default:
				return toLeader
			}
		}
	}
	return rt
}

// rangeRoute is where a range goes.
func rangeRoute(r *pb.RangeRequest) route {
	if r.GetSerializable() {
		return spread
	}
	return leaderRead
}

func (g *Gateway) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	if err := etcdcheck.RangeRequest(r); err != nil {
		return nil, err
	}
	return nsAuthorized(ctx, g, r, namespace.RangeIn, namespace.RangeOut,
		func(s *authz.Store, ai *authz.Info, r *pb.RangeRequest) error {
			return s.IsRangePermitted(ai, r.GetKey(), r.GetRangeEnd())
		},
		func(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
			return call(ctx, g, rangeRoute(r), replicaapi.API.Range, r)
		})
}

func (g *Gateway) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	if err := etcdcheck.PutRequest(r); err != nil {
		return nil, err
	}
	return nsAuthorized(ctx, g, r, namespace.PutIn, namespace.PutOut,
		func(s *authz.Store, ai *authz.Info, r *pb.PutRequest) error {
			return s.CheckPut(ai, r.GetKey(), r.GetPrevKv())
		},
		func(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
			return call(ctx, g, toLeader, replicaapi.API.Put, r)
		})
}

func (g *Gateway) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	if len(r.GetKey()) == 0 {
		return nil, etcderr.ErrEmptyKey
	}
	return nsAuthorized(ctx, g, r, namespace.DeleteIn, namespace.DeleteOut,
		func(s *authz.Store, ai *authz.Info, r *pb.DeleteRangeRequest) error {
			return s.CheckDeleteRange(ai, r.GetKey(), r.GetRangeEnd(), r.GetPrevKv())
		}, func(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
			return call(ctx, g, toLeader, replicaapi.API.DeleteRange, r)
		})
}

func (g *Gateway) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return nsAuthorized(ctx, g, r, namespace.TxnIn, namespace.TxnOut,
		func(s *authz.Store, ai *authz.Info, r *pb.TxnRequest) error { return s.CheckTxn(ai, r) },
		func(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
			return call(ctx, g, txnRoute(r), replicaapi.API.Txn, r)
		})
}

// nsAuthorized is authorized for a request with keys: each decision maps the request
// into the namespace of the user it decides (in), checks the mapped request (chk) and
// sends it (do); the answer comes back out of the namespace (out). Without a namespace
// in and out answer what they get.
func nsAuthorized[Req, Res any](ctx context.Context, g *Gateway, req *Req, in func([]byte, *Req) *Req, out func([]byte, *Res) *Res,
	chk func(*authz.Store, *authz.Info, *Req) error, do func(context.Context, *Req) (*Res, error)) (*Res, error) {
	// The gateway's own requests (health checks) are not decided: no namespace.
	var p []byte
	cur := req
	res, err := authorized(ctx, g, func(s *authz.Store, ai *authz.Info) error {
		p = g.prefix(s, ai)
		cur = in(p, req)
		return chk(s, ai, cur)
	}, func(ctx context.Context) (*Res, error) { return do(ctx, cur) })
	if err != nil {
		return nil, err
	}
	return out(p, res), nil
}

func (g *Gateway) Compact(ctx context.Context, r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	resp, err := authorized(ctx, g, admin, func(ctx context.Context) (*pb.CompactionResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.Compact, r)
	})
	if err == nil && g.hub != nil {
		// Watches created through this gateway from now on know it, whatever the
		// stream's state has told yet.
		g.hub.Compacted(r.GetRevision())
	}
	return resp, err
}

// MemberList needs some user with auth enabled, as in etcd 3.5 and later.
func (g *Gateway) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	return authorized(ctx, g, requireInfo, func(ctx context.Context) (*pb.MemberListResponse, error) {
		return call(ctx, g, spread, replicaapi.API.MemberList, r)
	})
}

func (g *Gateway) MemberAdd(ctx context.Context, r *pb.MemberAddRequest) (*pb.MemberAddResponse, error) {
	defer g.view.kick()
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.MemberAddResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.MemberAdd, r)
	})
}

func (g *Gateway) MemberRemove(ctx context.Context, r *pb.MemberRemoveRequest) (*pb.MemberRemoveResponse, error) {
	defer g.view.kick()
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.MemberRemoveResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.MemberRemove, r)
	})
}

func (g *Gateway) MemberUpdate(ctx context.Context, r *pb.MemberUpdateRequest) (*pb.MemberUpdateResponse, error) {
	defer g.view.kick()
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.MemberUpdateResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.MemberUpdate, r)
	})
}

func (g *Gateway) MemberPromote(ctx context.Context, r *pb.MemberPromoteRequest) (*pb.MemberPromoteResponse, error) {
	defer g.view.kick()
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.MemberPromoteResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.MemberPromote, r)
	})
}

func (g *Gateway) HashKV(ctx context.Context, r *pb.HashKVRequest) (*pb.HashKVResponse, error) {
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.HashKVResponse, error) {
		return call(ctx, g, spread, replicaapi.API.HashKV, r)
	})
}

func (g *Gateway) Hash(ctx context.Context, r *pb.HashRequest) (*pb.HashResponse, error) {
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.HashResponse, error) {
		return call(ctx, g, spread, replicaapi.API.Hash, r)
	})
}

// Status answers the leader's status: a gateway stands for the whole cluster, and tools
// (etcdctl move-leader) find the leader as the endpoint whose member ID is the leader.
func (g *Gateway) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	return authorized(ctx, g, requireInfo, func(ctx context.Context) (*pb.StatusResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.Status, r)
	})
}

func (g *Gateway) MoveLeader(ctx context.Context, r *pb.MoveLeaderRequest) (*pb.MoveLeaderResponse, error) {
	defer g.view.kick()
	return authorized(ctx, g, admin, func(ctx context.Context) (*pb.MoveLeaderResponse, error) {
		return call(ctx, g, toLeader, replicaapi.API.MoveLeader, r)
	})
}

// hasLeader tells whether the cluster has a leader, refreshing the view when it knows
// none (as right after an election).
func (g *Gateway) hasLeader(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*updateTimeout)
	defer cancel()
	return g.view.leaderNow(ctx) != 0
}

// check is etcd's health check: a leader exists and a serializable read succeeds.
func (g *Gateway) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(internal(ctx), 2*time.Second)
	defer cancel()
	st, err := g.Status(ctx, &pb.StatusRequest{})
	if err != nil {
		return err
	}
	if st.GetLeader() == 0 {
		return etcderr.ErrNoLeader
	}
	_, err = g.Range(ctx, &pb.RangeRequest{Key: []byte("health"), Serializable: true})
	return err
}

// healthRead is the read etcd's health checks make, through the replicas.
func (g *Gateway) healthRead(ctx context.Context, serializable bool) error {
	return health.Read(internal(telemetry.Untraced(ctx)), func(ctx context.Context) error {
		_, err := g.Range(ctx, &pb.RangeRequest{Key: []byte("health"), KeysOnly: true, Limit: 1, Serializable: serializable})
		return err
	})
}

// healthEndpoints are /health, /livez and /readyz as etcd answers them. /health and
// /readyz ask the cluster, through this gateway, what etcd asks its member. /livez asks
// nothing of the replicas: a gateway that cannot reach them is still alive, and
// restarting it would not help.
func (g *Gateway) healthEndpoints() *health.Endpoints {
	e := health.New(g.log, g.tel.Registry)
	e.Health(func(ctx context.Context, serializable bool) (string, bool) {
		if !serializable {
			ctx, cancel := context.WithTimeout(internal(telemetry.Untraced(ctx)), 2*time.Second)
			st, err := g.Status(ctx, &pb.StatusRequest{})
			cancel()
			if err != nil || st.GetLeader() == 0 {
				return "RAFT NO LEADER", false
			}
		}
		if err := g.healthRead(ctx, serializable); err != nil {
			return "RANGE ERROR:" + err.Error(), false
		}
		return "", true
	})
	e.Ready("data_corruption", func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(internal(telemetry.Untraced(ctx)), 2*time.Second)
		defer cancel()
		al, err := g.Alarm(ctx, &pb.AlarmRequest{Action: pb.AlarmRequest_GET, Alarm: pb.AlarmType_CORRUPT})
		if err != nil {
			return err
		}
		if len(al.GetAlarms()) > 0 {
			return errors.New("alarm activated: CORRUPT")
		}
		return nil
	})
	e.Ready("serializable_read", func(ctx context.Context) error { return g.healthRead(ctx, true) })
	e.Ready("linearizable_read", func(ctx context.Context) error { return g.healthRead(ctx, false) })
	return e
}

// requireInfo is etcd's requireAuthInfo: with auth enabled, a user must be given.
func requireInfo(s *authz.Store, ai *authz.Info) error { return s.RequireInfo(ai) }
