package gateway

import (
	"context"
	"errors"
	"time"

	"connectrpc.com/connect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/services/gateway/watch"
)

// The Watch faces: etcd's bidi Watch over grpc-go and over connect-go, and kvmesh's
// server-streaming WatchService for clients that cannot hold a bidi stream (browsers
// over HTTP/1.1). All three run Gateway.watch.

var errWatchDisabled = connect.NewError(connect.CodeUnimplemented, errors.New("kvmesh: watch needs a NATS server (KVMESH_NATS_URL)"))

// watch serves one stream, failing with etcd's "no leader" when the client asked for
// a leader (hasleader) and the cluster has none, at the start or later.
func (g *Gateway) watch(ctx context.Context, recv func() (*pb.WatchRequest, error), send func(*pb.WatchResponse) error, sendRaw func(watch.EncodedMsg) error) error {
	if g.hub == nil {
		return errWatchDisabled
	}
	if requiresLeader(ctx) {
		if !g.hasLeader(ctx) {
			return etcderr.ErrNoLeader
		}
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		go g.monitorLeader(ctx, cancel)
	}
	err := g.hub.Serve(ctx, recv, send, sendRaw)
	if cause := context.Cause(ctx); errors.Is(cause, etcderr.ErrNoLeader) {
		return etcderr.ErrNoLeader
	}
	return err
}

// watchStreamError is how a client's stream ends that the gateway cannot go on
// serving for a reason of its own (history that no replica could give, no auth state
// yet): Unavailable, which etcd's clients answer by opening a new stream and resuming
// every watch from where it was. etcd's own errors (no leader) and the client's
// leaving end it as they are.
func watchStreamError(err error) error {
	var ee *etcderr.Error
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.As(err, &ee) || errors.Is(err, errWatchDisabled) {
		return err
	}
	_, msg := etcderr.CodeMessage(err)
	return connect.NewError(connect.CodeUnavailable, errors.New(msg))
}

// monitorLeader cancels a stream that requires a leader (a watch or keep-alive stream
// under WithRequireLeader) once the cluster has had none for noLeaderChecks checks in
// a row, one per election timeout, as etcd's monitorLeader: reconnecting a stream
// costs far more than refusing a new request, and an election takes a timeout or two.
func (g *Gateway) monitorLeader(ctx context.Context, cancel context.CancelCauseFunc) {
	t := time.NewTicker(electionTimeout)
	defer t.Stop()
	misses := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if g.hasLeader(ctx) {
			misses = 0
		} else if misses++; misses >= noLeaderChecks {
			cancel(etcderr.ErrNoLeader)
			return
		}
	}
}

// electionTimeout is the replicas' default election timeout (10 ticks of 100 ms), and
// noLeaderChecks etcd's maxNoLeaderCnt.
const (
	electionTimeout = time.Second
	noLeaderChecks  = 3
)

// watchOneCall serves kvmesh.watch.v1.WatchService.Watch: one watch per call.
func (g *Gateway) watchOneCall(ctx context.Context, cr *pb.WatchCreateRequest, sendOne func(*pb.WatchResponse) error) error {
	cr.WatchId = 0
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	send := func(resp *pb.WatchResponse) error {
		if err := sendOne(resp); err != nil {
			return err
		}
		if resp.GetCanceled() {
			cancel() // the one watch ended: so does the call
		}
		return nil
	}
	return watchStreamError(g.watch(ctx, createOnce(ctx, cr), send, nil))
}

// createOnce reads the requests of a stream of one watch: its create, then nothing
// until ctx ends.
func createOnce(ctx context.Context, cr *pb.WatchCreateRequest) func() (*pb.WatchRequest, error) {
	first := true
	return func() (*pb.WatchRequest, error) {
		if first {
			first = false
			return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: cr}}, nil
		}
		<-ctx.Done()
		return nil, ctx.Err()
	}
}
