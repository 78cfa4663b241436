package replica

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"go.etcd.io/raft/v3"
	raftpb "go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	peerv1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/peer/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/grpcsplit"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// transport carries Raft messages to the other members over kvmesh's peer API
// (kvmesh.peer.v1), one sender goroutine per peer, batching what queued up while the
// previous batch was in flight. A peer that cannot be reached is reported to Raft,
// which then probes it instead of streaming to it.
// Snapshots go over a stream of their own (snapshot.go).
type transport struct {
	r      *Replica
	client *http.Client

	mu      sync.Mutex
	senders map[uint64]*peerSender
	hints   map[uint64]string // peer URLs of members not in the applied membership yet
	stopped bool

	// drop, when set (by tests), discards the messages it returns true for: a
	// partition or a lossy link.
	drop atomic.Pointer[func(m *raftpb.Message) bool]
	// delay, when set (by tests), holds back each message for the time it returns:
	// a slow link, which also reorders messages.
	delay atomic.Pointer[func(m *raftpb.Message) time.Duration]
	// isolated, when set (fault injection), cuts all peer traffic both ways.
	isolated atomic.Bool

	heard sync.Map // member ID → *atomic.Int64: when (UnixNano) a message from it last arrived
}

// heardNow records that a message from the member arrived.
func (t *transport) heardNow(id uint64) {
	v, ok := t.heard.Load(id)
	if !ok {
		v, _ = t.heard.LoadOrStore(id, new(atomic.Int64))
	}
	v.(*atomic.Int64).Store(time.Now().UnixNano())
}

// heardFrom reports whether a message from the member arrived within window.
func (t *transport) heardFrom(id uint64, window time.Duration) bool {
	v, ok := t.heard.Load(id)
	return ok && time.Since(time.Unix(0, v.(*atomic.Int64).Load())) <= window
}

// peerQueue bounds the messages queued for one peer; beyond it, messages are dropped
// and the peer reported unreachable (Raft resends what matters).
const peerQueue = 4096

type peerSender struct {
	id   uint64
	url  string
	ch   chan *raftpb.Message
	stop chan struct{}
	done chan struct{}
}

func newTransport(r *Replica) *transport {
	return &transport{r: r, client: h2c.NewClient(r.mesh.ClientConfig()), senders: make(map[uint64]*peerSender)}
}

// send queues msgs for their recipients; it never blocks the Raft loop.
func (t *transport) send(msgs []*raftpb.Message) {
	for _, m := range msgs {
		to := m.GetTo()
		if to == t.r.id || to == raft.None {
			continue
		}
		if t.isolated.Load() {
			continue
		}
		if drop := t.drop.Load(); drop != nil && (*drop)(m) {
			continue
		}
		if m.GetType() == raftpb.MessageType_MsgSnap {
			t.sendSnapshot(m)
			continue
		}
		if delay := t.delay.Load(); delay != nil {
			if d := (*delay)(m); d > 0 {
				time.AfterFunc(d, func() { t.enqueue(m) })
				continue
			}
		}
		t.enqueue(m)
	}
}

// enqueue hands m to its recipient's sender.
func (t *transport) enqueue(m *raftpb.Message) {
	to := m.GetTo()
	s := t.sender(to)
	if s == nil {
		t.r.node.ReportUnreachable(to)
		return
	}
	select {
	case s.ch <- m:
	default:
		t.r.node.ReportUnreachable(to)
	}
}

func (t *transport) sender(id uint64) *peerSender {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return nil
	}
	if s := t.senders[id]; s != nil {
		return s
	}
	var u string
	if m := t.r.members.get(id); m != nil && len(m.GetPeerURLs()) > 0 {
		u = m.GetPeerURLs()[0]
	} else if u = t.hints[id]; u == "" {
		return nil
	}
	s := &peerSender{id: id, url: strings.TrimRight(u, "/"),
		ch: make(chan *raftpb.Message, peerQueue), stop: make(chan struct{}), done: make(chan struct{})}
	t.senders[id] = s
	go t.run(s)
	return s
}

// run sends s's messages over one long-lived stream to the peer, a batch per message:
// whatever queued while the last batch was being written, up to 256 messages. A failed
// stream is reported to Raft (which probes the peer and resends what matters) and
// replaced at the next batch. The stream goes over grpc-go (the peer's port routes it,
// see libs/grpcsplit): per message it costs a fraction of connect-go over net/http's
// HTTP/2 (BENCHMARKS.md), and every write crosses it twice.
func (t *transport) run(s *peerSender) {
	defer close(s.done)
	cc, err := grpcsplit.Dial(s.url, t.r.mesh.ClientConfig(), t.r.tel.GRPCInternalClient()...)
	if err != nil {
		t.r.log.Error("bad peer URL", "peer", s.url, "err", err)
		<-s.stop
		return
	}
	defer cc.Close()
	client := peerv1.NewPeerServiceClient(cc)
	// The stream lives as long as the sender: no trace of its own.
	ctx, cancel := context.WithCancel(telemetry.Untraced(context.Background()))
	defer cancel()
	go func() {
		// A Send blocked on a stuck connection ends when the sender stops.
		select {
		case <-s.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	var stream grpc.ClientStreamingClient[peerv1.SendRequest, peerv1.SendResponse]
	fail := func() {
		_, err := stream.CloseAndRecv()
		stream = nil
		if status.Code(err) == codes.FailedPrecondition && strings.Contains(err.Error(), errMemberRemoved.Error()) {
			t.r.removedSelf()
		}
		t.r.node.ReportUnreachable(s.id)
	}
	defer func() {
		if stream != nil {
			stream.CloseAndRecv()
		}
	}()
	for {
		var first *raftpb.Message
		select {
		case first = <-s.ch:
		case <-s.stop:
			return
		}
		req := &peerv1.SendRequest{ClusterId: t.r.clusterID, From: t.r.id}
		for m := first; m != nil; {
			if b, err := proto.Marshal(m); err == nil {
				req.Messages = append(req.Messages, b)
			}
			m = nil
			if len(req.GetMessages()) < 256 {
				select {
				case m = <-s.ch:
				default:
				}
			}
		}
		if stream == nil {
			if stream, err = client.Stream(ctx); err != nil {
				stream = nil
				t.r.node.ReportUnreachable(s.id)
				continue
			}
		}
		if err := stream.Send(req); err != nil {
			fail()
		}
	}
}

// hint tells the transport where a member not yet in the applied membership is.
func (t *transport) hint(id uint64, url string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.hints == nil {
		t.hints = make(map[uint64]string)
	}
	t.hints[id] = url
}

// forget stops the sender to a member whose record changed (removed, or new peer
// URLs); the next message starts a new one from the current record.
func (t *transport) forget(id uint64) {
	t.mu.Lock()
	s := t.senders[id]
	delete(t.senders, id)
	t.mu.Unlock()
	if s != nil {
		close(s.stop)
	}
}

func (t *transport) stop() {
	t.mu.Lock()
	t.stopped = true
	senders := t.senders
	t.senders = nil
	t.mu.Unlock()
	for _, s := range senders {
		close(s.stop)
		<-s.done
	}
}

// peerService receives Raft messages from the other members.
type peerService struct{ r *Replica }

var (
	errClusterIDMismatch = errors.New("etcdserver: cluster ID mismatch")
	errIsolated          = errors.New("isolated from its peers by fault injection")
	errMemberRemoved     = errors.New("the member has been permanently removed from the cluster")
)

// Stream takes batches from one peer until it closes the stream, or a batch is
// refused: the error ends the stream, and the sender sees it.
func (s *peerService) Stream(ctx context.Context, stream *connect.ClientStream[peerv1.SendRequest]) (*connect.Response[peerv1.SendResponse], error) {
	for stream.Receive() {
		if err := s.deliver(ctx, stream.Msg()); err != nil {
			return nil, err
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&peerv1.SendResponse{}), nil
}

// grpcPeer serves Stream over grpc-go, where the peers send it (the Connect handler
// serves it too); Snapshot is served over Connect only, where snapshot.go sends it.
type grpcPeer struct {
	peerv1.UnimplementedPeerServiceServer
	s *peerService
}

func (g grpcPeer) Stream(stream grpc.ClientStreamingServer[peerv1.SendRequest, peerv1.SendResponse]) error {
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&peerv1.SendResponse{})
		}
		if err != nil {
			return err
		}
		if err := g.s.deliver(stream.Context(), req); err != nil {
			code, msg := etcderr.CodeMessage(err)
			return status.Error(codes.Code(code), msg)
		}
	}
}

// deliver checks a batch's sender and steps its messages into Raft, in order.
func (s *peerService) deliver(ctx context.Context, req *peerv1.SendRequest) error {
	if req.GetClusterId() != s.r.clusterID {
		return connect.NewError(connect.CodeFailedPrecondition, errClusterIDMismatch)
	}
	if s.r.peers.isolated.Load() {
		return connect.NewError(connect.CodeUnavailable, errIsolated)
	}
	if s.r.members.isGone(req.GetFrom()) {
		// Tell a removed member so: it may have missed its own removal (the leader
		// stops replicating to a member once its removal is applied).
		return connect.NewError(connect.CodeFailedPrecondition, errMemberRemoved)
	}
	s.r.peers.heardNow(req.GetFrom())
	for _, b := range req.GetMessages() {
		m := &raftpb.Message{}
		if err := proto.Unmarshal(b, m); err != nil {
			return connect.NewError(connect.CodeInvalidArgument, err)
		}
		if err := s.r.node.Step(ctx, m); err != nil {
			return connect.NewError(connect.CodeUnavailable, err)
		}
	}
	return nil
}
