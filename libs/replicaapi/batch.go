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
	"github.com/kvmesh/kvmesh/libs/streammux"
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
	mux    *streammux.Mux[*kvPending]
	cancel context.CancelFunc // ends the stream
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
	if s := b.cur; s != nil && !s.mux.Dead() {
		return s
	}
	// The stream carries the calls of many clients for as long as it lasts: not a
	// request of its own to trace (each call carries its own trace context).
	ctx, cancel := context.WithCancel(telemetry.Untraced(context.Background()))
	s := &kvStream{mux: streammux.New[*kvPending](), cancel: cancel}
	b.cur = s
	go s.run(ctx, b.client)
	return s
}

// deadStream takes no calls: the batcher is closed.
var deadStream = func() *kvStream {
	s := &kvStream{mux: streammux.New[*kvPending](), cancel: func() {}}
	s.mux.Fail()
	return s
}()

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
func (s *kvStream) add(p *kvPending) bool { return s.mux.Add(p) }

func (s *kvStream) run(ctx context.Context, client replicav1.KVServiceClient) {
	st, err := client.Batch(ctx)
	if err != nil {
		s.fail(fromGRPC(err))
		return
	}
	go s.receive(st)
	err = s.mux.Run(ctx, batchMaxCalls, func(seq uint64, batch []*kvPending) error {
		m := &replicav1.KVCalls{Calls: make([]*replicav1.KVCall, len(batch))}
		for i, p := range batch {
			p.call.Id = streammux.ItemID(seq, i)
			m.Calls[i] = p.call
		}
		return st.Send(m)
	})
	if err != nil {
		s.fail(fromGRPC(err))
	}
}

func (s *kvStream) receive(st grpc.BidiStreamingClient[replicav1.KVCalls, replicav1.KVResults]) {
	for {
		m, err := st.Recv()
		if err != nil {
			s.fail(fromGRPC(err))
			return
		}
		for _, r := range m.GetResults() {
			if p, ok := s.mux.TakeItem(r.GetId()); ok {
				p.done <- kvOutcome{res: r}
			}
		}
	}
}

// fail ends the stream: calls not yet sent fail as never sent (call sends them to
// the next replica), calls sent fail with err, Unavailable: their fate is unknown.
func (s *kvStream) fail(err error) {
	queued, sent, first := s.mux.Fail()
	if !first {
		return
	}
	for _, p := range queued {
		p.done <- kvOutcome{err: errBatchNotSent}
	}
	lost := error(errBatchNotSent) // the stream was never opened: nothing was sent on it
	if !IsNotSent(err) {
		_, msg := etcderr.CodeMessage(err)
		lost = etcderr.FromWire(connect.CodeUnavailable, "kvmesh: lost the stream to the replica: "+msg)
	}
	for _, p := range sent {
		p.done <- kvOutcome{err: lost}
	}
	s.cancel()
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
