package replicaapi

import (
	"context"
	"sync"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// KV calls to a replica travel over one long-lived Batch stream per replica
// (KVService.Batch): whatever calls queued while the
// previous message was being written go out as the next message, and the replica
// answers many calls per message. A unary call costs both sides a stream of its own;
// here the per-call cost is a few bytes of framing.
//
// The unary call's semantics are kept, for callers to decide retries the same way: a call that never left the gateway (the stream could not be opened, or broke
// before the call was written) fails as a call that never arrived, and is sent to the
// next replica; a call written to a stream that then broke fails Unavailable, as a
// unary call whose connection broke.

// batchMaxCalls bounds the calls of one message.
const batchMaxCalls = 256

// batcher is the Batch stream to one replica, opened on first use and again after
// it fails.
type batcher struct {
	client replicav1.KVServiceClient
	mu     sync.Mutex
	cur    *kvStream
	closed bool
}

// kvStream is one Batch stream and the calls on it.
type kvStream struct {
	wake   chan struct{}
	cancel context.CancelFunc // ends the stream

	mu     sync.Mutex
	queue  []*kvPending
	sent   map[uint64]*kvPending
	nextID uint64
	dead   bool
}

// kvPending is a call waiting for its result.
type kvPending struct {
	call *replicav1.KVCall
	done chan kvOutcome // buffered: the result is never waited for by its deliverer
}

type kvOutcome struct {
	res *replicav1.KVResult
	err error
}

// errBatchNotSent is the failure of calls that never left the caller.
var errBatchNotSent = NotSent("kvmesh: the stream to the replica failed before the call was sent")

// do sends c and waits for its result, or for ctx to end (the replica may still
// carry the call out; its result is then dropped).
func (b *batcher) do(ctx context.Context, c *replicav1.KVCall) (*replicav1.KVResult, error) {
	p := &kvPending{call: c, done: make(chan kvOutcome, 1)}
	if !b.stream().add(p) {
		// That stream failed just now, before taking the call: one more, once.
		if !b.stream().add(p) {
			return nil, errBatchNotSent
		}
	}
	select {
	case o := <-p.done:
		return o.res, o.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// stream is the open stream, or a new one.
func (b *batcher) stream() *kvStream {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return deadStream
	}
	if s := b.cur; s != nil {
		s.mu.Lock()
		dead := s.dead
		s.mu.Unlock()
		if !dead {
			return s
		}
	}
	// The stream carries the calls of many clients for as long as it lasts: not a
	// request of its own to trace (each call carries its own trace context).
	ctx, cancel := context.WithCancel(telemetry.Untraced(context.Background()))
	s := &kvStream{wake: make(chan struct{}, 1), cancel: cancel, sent: make(map[uint64]*kvPending)}
	b.cur = s
	go s.run(ctx, b.client)
	return s
}

// deadStream takes no calls: the batcher is closed.
var deadStream = &kvStream{dead: true}

// close ends the stream; calls after it fail as never sent.
func (b *batcher) close() {
	b.mu.Lock()
	b.closed = true
	s := b.cur
	b.mu.Unlock()
	if s != nil {
		s.fail(errBatchNotSent)
	}
}

// add queues p; false when the stream has failed.
func (s *kvStream) add(p *kvPending) bool {
	s.mu.Lock()
	if s.dead {
		s.mu.Unlock()
		return false
	}
	s.queue = append(s.queue, p)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return true
}

func (s *kvStream) run(ctx context.Context, client replicav1.KVServiceClient) {
	st, err := client.Batch(ctx)
	if err != nil {
		s.fail(fromGRPC(err))
		return
	}
	go s.receive(st)
	for {
		<-s.wake
		s.mu.Lock()
		if s.dead {
			s.mu.Unlock()
			return
		}
		batch := s.queue
		if len(batch) > batchMaxCalls {
			batch, s.queue = batch[:batchMaxCalls], batch[batchMaxCalls:]
			select {
			case s.wake <- struct{}{}:
			default:
			}
		} else {
			s.queue = nil
		}
		if len(batch) == 0 {
			s.mu.Unlock()
			continue
		}
		m := &replicav1.KVCalls{Calls: make([]*replicav1.KVCall, len(batch))}
		for i, p := range batch {
			s.nextID++
			p.call.Id = s.nextID
			s.sent[s.nextID] = p
			m.Calls[i] = p.call
		}
		s.mu.Unlock()
		if err := st.Send(m); err != nil {
			// The real error comes from Recv; receive fails the stream with it.
			s.fail(fromGRPC(err))
			return
		}
	}
}

func (s *kvStream) receive(st grpc.BidiStreamingClient[replicav1.KVCalls, replicav1.KVResults]) {
	for {
		m, err := st.Recv()
		if err != nil {
			s.fail(fromGRPC(err))
			return
		}
		s.mu.Lock()
		for _, r := range m.GetResults() {
			if p := s.sent[r.GetId()]; p != nil {
				delete(s.sent, r.GetId())
				p.done <- kvOutcome{res: r}
			}
		}
		s.mu.Unlock()
	}
}

// fail ends the stream: calls not yet sent fail as never sent (call sends them to
// the next replica), calls sent fail with err, Unavailable: their fate is unknown.
func (s *kvStream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		return
	}
	s.dead = true
	for _, p := range s.queue {
		p.done <- kvOutcome{err: errBatchNotSent}
	}
	if IsNotSent(err) {
		// The stream was never opened: nothing was sent on it.
		for _, p := range s.sent {
			p.done <- kvOutcome{err: errBatchNotSent}
		}
	} else {
		_, msg := etcderr.CodeMessage(err)
		lost := etcderr.FromWire(connect.CodeUnavailable, "kvmesh: lost the stream to the replica: "+msg)
		for _, p := range s.sent {
			p.done <- kvOutcome{err: lost}
		}
	}
	s.queue, s.sent = nil, nil
	s.cancel()
	select {
	case s.wake <- struct{}{}: // the sender sees dead and ends
	default:
	}
}

// batched sends one KV call over b with what the unary call would carry in its
// metadata (the decision, the trace context, the deadline) and answers its response.
func batched[Res any](ctx context.Context, b *batcher, c *replicav1.KVCall, get func(*replicav1.KVResult) *Res) (*Res, error) {
	if d, ok := authz.DecisionFrom(ctx); ok {
		c.Auth = d.Encode()
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		carrier := propagation.MapCarrier{}
		otel.GetTextMapPropagator().Inject(ctx, carrier)
		c.Traceparent = carrier.Get("traceparent")
	}
	if d, ok := ctx.Deadline(); ok {
		left := time.Until(d)
		if left <= 0 {
			return nil, context.DeadlineExceeded
		}
		c.TimeoutMicros = max(left.Microseconds(), 1)
	}
	res, err := b.do(ctx, c)
	if err != nil {
		return nil, err
	}
	if res.GetCode() != 0 {
		return nil, etcderr.FromWire(connect.Code(res.GetCode()), res.GetMessage())
	}
	return get(res), nil
}
