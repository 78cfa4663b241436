package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/libs/etcderr"
	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/inproc"
)

// The gateway's logic, once per RPC, whatever the protocol: the Connect handlers
// (connect.go) and the grpc-go services (grpc.go) are thin adapters over these.

type unaryFunc[Req, Res any] func(context.Context, *connect.Request[Req]) (*connect.Response[Res], error)

// call sends a client's message to the preferred replica and returns its answer. When
// that replica cannot be reached at all (the connection is refused, so the request
// provably never arrived), the next replica is tried and becomes the preferred one;
// any other failure is the client's answer, since the request may have been applied.
// Any replica serves every request: Raft forwards proposals to the leader and
// linearizable reads go through ReadIndex.
func call[Req, Res any](ctx context.Context, g *Gateway, method func(*replicaConn) unaryFunc[Req, Res], req *Req) (*Res, error) {
	if g.inProcess {
		ctx = inproc.Context(ctx)
	}
	n := uint32(len(g.replicas))
	first := g.preferred.Load()
	var err error
	for i := range n {
		idx := (first + i) % n
		resp, e := method(g.replicas[idx])(ctx, connect.NewRequest(req))
		if e == nil {
			if i > 0 {
				g.preferred.CompareAndSwap(first, idx)
			}
			return resp.Msg, nil
		}
		err = e
		if !neverArrived(e) {
			break
		}
	}
	return nil, err
}

// neverArrived tells a failure to connect (the request was not sent) from failures
// after sending.
func neverArrived(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

func (g *Gateway) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.RangeRequest, pb.RangeResponse] { return c.kv.Range }, r)
}

func (g *Gateway) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.PutRequest, pb.PutResponse] { return c.kv.Put }, r)
}

func (g *Gateway) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.DeleteRangeRequest, pb.DeleteRangeResponse] { return c.kv.DeleteRange }, r)
}

func (g *Gateway) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.TxnRequest, pb.TxnResponse] { return c.kv.Txn }, r)
}

func (g *Gateway) Compact(ctx context.Context, r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.CompactionRequest, pb.CompactionResponse] { return c.kv.Compact }, r)
}

func (g *Gateway) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.MemberListRequest, pb.MemberListResponse] {
		return c.cluster.MemberList
	}, r)
}

func (g *Gateway) HashKV(ctx context.Context, r *pb.HashKVRequest) (*pb.HashKVResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.HashKVRequest, pb.HashKVResponse] { return c.maint.HashKV }, r)
}

func (g *Gateway) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	return call(ctx, g, func(c *replicaConn) unaryFunc[pb.StatusRequest, pb.StatusResponse] { return c.maint.Status }, r)
}

// check is etcd's health check: a leader exists and a serializable read succeeds.
func (g *Gateway) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
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

// serveHealth answers /health as etcd does: {"health":"true","reason":""}.
func (g *Gateway) serveHealth(w http.ResponseWriter, r *http.Request) {
	type health struct {
		Health string `json:"health"`
		Reason string `json:"reason"`
	}
	w.Header().Set("Content-Type", "application/json")
	if err := g.check(r.Context()); err != nil {
		_, msg := etcderr.CodeMessage(err)
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(health{Health: "false", Reason: msg})
		return
	}
	json.NewEncoder(w).Encode(health{Health: "true"})
}

func (g *Gateway) serveReady(w http.ResponseWriter, r *http.Request) {
	if err := g.check(r.Context()); err != nil {
		_, msg := etcderr.CodeMessage(err)
		http.Error(w, "not ready: "+msg, http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte("ok"))
}
