package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/kvmesh/kvmesh/libs/etcderr"
	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/inproc"
)

// The gateway's logic, once per RPC, whatever the protocol: the Connect handlers
// (connect.go) and the grpc-go services (grpc.go) are thin adapters over these.

// call sends a client's message to a replica and returns the replica's answer.
func call[Req, Res any](ctx context.Context, g *Gateway, fn func(context.Context, *connect.Request[Req]) (*connect.Response[Res], error), req *Req) (*Res, error) {
	if g.inProcess {
		ctx = inproc.Context(ctx)
	}
	resp, err := fn(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func (g *Gateway) Range(ctx context.Context, r *pb.RangeRequest) (*pb.RangeResponse, error) {
	return call(ctx, g, g.kv.Range, r)
}

func (g *Gateway) Put(ctx context.Context, r *pb.PutRequest) (*pb.PutResponse, error) {
	return call(ctx, g, g.kv.Put, r)
}

func (g *Gateway) DeleteRange(ctx context.Context, r *pb.DeleteRangeRequest) (*pb.DeleteRangeResponse, error) {
	return call(ctx, g, g.kv.DeleteRange, r)
}

func (g *Gateway) Txn(ctx context.Context, r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return call(ctx, g, g.kv.Txn, r)
}

func (g *Gateway) Compact(ctx context.Context, r *pb.CompactionRequest) (*pb.CompactionResponse, error) {
	return call(ctx, g, g.kv.Compact, r)
}

func (g *Gateway) MemberList(ctx context.Context, r *pb.MemberListRequest) (*pb.MemberListResponse, error) {
	return call(ctx, g, g.cluster.MemberList, r)
}

func (g *Gateway) Status(ctx context.Context, r *pb.StatusRequest) (*pb.StatusResponse, error) {
	return call(ctx, g, g.maint.Status, r)
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
