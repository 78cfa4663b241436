package gateway

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
)

// What the watch hub needs of the gateway (watch.Deps): the replicas' history, the
// permission of a watch, and the names in a response's header.

// watchReplicas reads history from the replicas the view knows.
type watchReplicas struct{ view *view }

// Feed reads [from, to] from a replica's Feed, trying the replicas in turn.
func (r watchReplicas) Feed(ctx context.Context, from, to int64, fn func(*replicav1.Revision) error) error {
	var lastErr error
	for attempt := 0; attempt < 20 && ctx.Err() == nil; attempt++ {
		for _, c := range r.view.forRead() {
			err := r.feedFrom(ctx, c, from, to, func(rev *replicav1.Revision) error {
				from = rev.GetRevision() + 1
				return fn(rev)
			})
			if from > to {
				return nil
			}
			var ce *watch.CompactedError
			if errors.As(err, &ce) {
				return err
			}
			if err != nil {
				lastErr = err
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("read revisions %d-%d from the replicas: %w", from, to, lastErr)
}

func (r watchReplicas) feedFrom(ctx context.Context, c *replicaConn, from, to int64, fn func(*replicav1.Revision) error) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	compact := int64(-1)
	err := c.api.Feed(ctx, &replicav1.FeedRequest{FromRevision: from, ToRevision: to}, func(m *replicav1.FeedResponse) error {
		compact = m.GetCompactRevision()
		for _, rev := range m.GetRevisions() {
			if err := fn(rev); err != nil {
				return err
			}
		}
		return nil
	})
	if errors.Is(err, etcderr.ErrCompacted) {
		return &watch.CompactedError{Rev: compact}
	}
	return err
}

// Follow follows the feed of the first replica the view reads from.
func (r watchReplicas) Follow(ctx context.Context, from int64, fn func(*replicav1.FeedResponse) error) error {
	conns := r.view.forRead()
	if len(conns) == 0 {
		return etcderr.ErrNoLeader
	}
	return conns[0].api.Feed(ctx, &replicav1.FeedRequest{FromRevision: from, OmitPrevKv: true}, fn)
}

// beforeBatch is how many keys one read of Before asks for (under the replicas'
// limit of operations per transaction).
const beforeBatch = 64

// Before reads the keys at revision rev - 1, with serializable reads (the replica
// that fed rev has applied it), trying the replicas in turn.
func (r watchReplicas) Before(ctx context.Context, rev int64, keys [][]byte) ([]*mvccpb.KeyValue, error) {
	out := make([]*mvccpb.KeyValue, len(keys))
	for start := 0; start < len(keys); start += beforeBatch {
		part := keys[start:min(start+beforeBatch, len(keys))]
		req := &pb.TxnRequest{Success: make([]*pb.RequestOp, len(part))}
		for i, k := range part {
			req.Success[i] = &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: k, Revision: rev - 1, Serializable: true}}}
		}
		var resp *pb.TxnResponse
		var err error = etcderr.ErrNoLeader
		for _, c := range r.view.forRead() {
			if resp, err = c.api.Txn(ctx, req); err == nil {
				break
			}
		}
		if err != nil {
			return nil, err
		}
		for i, op := range resp.GetResponses() {
			if kvs := op.GetResponseRange().GetKvs(); len(kvs) > 0 {
				out[start+i] = kvs[0]
			}
		}
	}
	return out, nil
}

// Position asks a replica for its current and compacted revisions.
func (r watchReplicas) Position(ctx context.Context) (*replicav1.PositionResponse, error) {
	var lastErr error = etcderr.ErrNoLeader
	for _, c := range r.view.forRead() {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := c.api.Position(cctx, &replicav1.PositionRequest{})
		cancel()
		if err == nil {
			return resp, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

// watchAuthorizer decides watch creations (watchPermitted).
type watchAuthorizer struct{ g *Gateway }

func (a watchAuthorizer) WatchPermitted(ctx context.Context, cr *pb.WatchCreateRequest) (*pb.WatchCreateRequest, []byte, error) {
	return a.g.watchPermitted(ctx, cr)
}

func (a watchAuthorizer) Announce(rev uint64) { a.g.auth.announce(rev) }

// watchCluster names the cluster in watch responses' headers.
type watchCluster struct{ g *Gateway }

func (c watchCluster) ClusterID() uint64 { return c.g.view.clusterID() }
func (c watchCluster) LeaderID() uint64  { return c.g.view.leaderID() }
func (c watchCluster) Seen() int64       { return c.g.seen() }
