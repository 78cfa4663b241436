package replica

import (
	"context"
	"strings"
	"sync"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
)

// local is the replica's internal API called in this process (the all-in-one's
// gateway and fanout): the methods the grpc-go server registers, called directly, with
// the caller's context (its decision, trace and deadline) and the caller's messages: no
// serialization, no transport, the same answers and errors.
type local struct {
	*kvService
	*clusterService
	*maintenanceService
	*leaseService
	*authService
	*feedService
}

var _ replicaapi.Conn = (*local)(nil)

func (r *Replica) services() *local {
	return &local{
		kvService:          &kvService{r: r},
		clusterService:     &clusterService{r: r},
		maintenanceService: &maintenanceService{r: r},
		leaseService:       &leaseService{r: r},
		authService:        &authService{r: r},
		feedService:        &feedService{r: r},
	}
}

// Dialer links to this replica in process, and to any other replica with next. Its
// own URLs are its peer URLs and its listening address (call it after Listen).
func (r *Replica) Dialer(next replicaapi.Dialer) replicaapi.Dialer {
	own := map[string]bool{"http://" + r.Addr(): true, "https://" + r.Addr(): true}
	for _, u := range r.cfg.PeerURLs {
		own[strings.TrimRight(u, "/")] = true
	}
	return localDialer{api: r.services(), own: own, next: next}
}

type localDialer struct {
	api  *local
	own  map[string]bool
	next replicaapi.Dialer
}

func (d localDialer) Dial(url string) (replicaapi.Conn, error) {
	if d.own[strings.TrimRight(url, "/")] {
		return d.api, nil
	}
	return d.next.Dial(url)
}

func (l *local) Close() error { return nil }

func (l *local) AuthState(ctx context.Context, r *replicav1.AuthStateRequest) (*replicav1.AuthStateResponse, error) {
	return l.authService.State(ctx, r)
}

func (l *local) AuthCall(ctx context.Context, r *replicav1.AuthRequest) (*replicav1.AuthResponse, error) {
	return l.authService.Call(ctx, r)
}

func (l *local) Snapshot(ctx context.Context, _ *pb.SnapshotRequest, fn func(*pb.SnapshotResponse) error) error {
	return l.maintenanceService.serveSnapshot(ctx, fn)
}

func (l *local) Feed(ctx context.Context, r *replicav1.FeedRequest, fn func(*replicav1.FeedResponse) error) error {
	return l.feedService.serveFeed(ctx, r, fn)
}

// KeepAlive runs the replica's side of a keep-alive stream on a goroutine of its own,
// the batches and answers passed by channel.
func (l *local) KeepAlive(ctx context.Context) (replicaapi.KeepAliveStream, error) {
	s := &localKeepAlive{ctx: ctx, in: make(chan *replicav1.KeepAliveBatch), out: make(chan *replicav1.KeepAliveResults, 64), done: make(chan struct{})}
	go func() {
		err := l.leaseService.serveKeepAlive(ctx, s.recv, s.send)
		if err == nil {
			err = ctx.Err()
		}
		s.once.Do(func() { s.err = err; close(s.done) })
	}()
	return s, nil
}

type localKeepAlive struct {
	ctx  context.Context
	in   chan *replicav1.KeepAliveBatch
	out  chan *replicav1.KeepAliveResults
	once sync.Once
	done chan struct{}
	err  error // set before done closes
}

// recv and send are the replica's side.
func (s *localKeepAlive) recv() (*replicav1.KeepAliveBatch, error) {
	select {
	case b := <-s.in:
		return b, nil
	case <-s.ctx.Done():
		return nil, s.ctx.Err()
	}
}

func (s *localKeepAlive) send(res *replicav1.KeepAliveResults) error {
	select {
	case s.out <- res:
		return nil
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

// Send and Recv are the caller's.
func (s *localKeepAlive) Send(b *replicav1.KeepAliveBatch) error {
	select {
	case s.in <- b:
		return nil
	case <-s.done:
		return s.err
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

func (s *localKeepAlive) Recv() (*replicav1.KeepAliveResults, error) {
	select {
	case res := <-s.out:
		return res, nil
	case <-s.done:
		return nil, s.err
	case <-s.ctx.Done():
		return nil, s.ctx.Err()
	}
}

// peerAPI dials other members' internal API (forwarded membership changes, the
// membership a joining member asks for).
func (r *Replica) peerAPI() replicaapi.Dialer {
	return replicaapi.Network{TLS: r.mesh.ClientConfig(), Options: r.tel.GRPCInternalClient()}
}
