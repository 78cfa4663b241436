package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/authz"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// KVService.Batch: a gateway's KV calls over one long-lived stream. A unary call costs
// both sides a stream of its own (headers, flow control, a goroutine, a trip through
// the transport's writer); on a stream, many calls share each message and each
// flush. Every call runs concurrently with the others (on a reused goroutine, see
// workers) exactly as the unary RPC of the same name (kvService's handlers), so
// proposals still meet in Raft's batches and reads in ReadIndex rounds; the answers go
// back as they finish, whatever finished while the previous message was being written
// going out together.

// batchResultsBuffer is how many finished calls may wait for the writer.
const batchResultsBuffer = 1024

// batchWorkers is how many goroutines are kept for the calls of Batch streams (see
// workers); as many as a gateway's grpc-go keeps for its clients' calls.
const batchWorkers = 1024

func (s *kvService) serveBatch(ctx context.Context, recv func() (*replicav1.KVCalls, error), send func(*replicav1.KVResults) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	results := make(chan *replicav1.KVResult, batchResultsBuffer)
	written := make(chan struct{})
	go func() {
		defer close(written)
		for {
			var first *replicav1.KVResult
			select {
			case r, ok := <-results:
				if !ok {
					return
				}
				first = r
			case <-ctx.Done():
				return
			}
			out := &replicav1.KVResults{Results: []*replicav1.KVResult{first}}
		more:
			for {
				select {
				case r, ok := <-results:
					if !ok {
						break more
					}
					out.Results = append(out.Results, r)
				default:
					break more
				}
			}
			if err := send(out); err != nil {
				cancel(err)
				return
			}
		}
	}()
	var calls sync.WaitGroup
	var lastAuth string
	var lastDecision authz.Decision
	var lastOK bool
	for {
		m, err := recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				cancel(err)
				return err
			}
			// The gateway closed its side: answer what is under way, then end.
			calls.Wait()
			close(results)
			<-written
			return context.Cause(ctx)
		}
		s.r.m.batchCalls.Add(float64(len(m.GetCalls())))
		for _, c := range m.GetCalls() {
			// A gateway sends the same decision with most calls: decoded once.
			if a := c.GetAuth(); a != "" && a != lastAuth {
				d, ok := authz.Decode(a)
				if !ok {
					d = authz.Decision{}
				}
				lastAuth, lastDecision, lastOK = a, d, ok
			}
			dec, decOK := lastDecision, lastOK
			if c.GetAuth() == "" {
				decOK = false
			}
			calls.Add(1)
			s.r.calls.run(func() {
				defer calls.Done()
				r := s.batchCall(ctx, c, dec, decOK)
				select {
				case results <- r:
				case <-ctx.Done():
				}
			})
		}
	}
}

// batchCall runs one call of a Batch stream as its unary RPC, under the decision the
// call carries (decoded by serveBatch; ok false: none).
func (s *kvService) batchCall(ctx context.Context, c *replicav1.KVCall, d authz.Decision, ok bool) *replicav1.KVResult {
	out := &replicav1.KVResult{Id: c.GetId()}
	done := s.r.tel.CountCall(batchMethod(c))
	defer func() { done(connect.Code(out.Code)) }()
	fail := func(err error) *replicav1.KVResult {
		code, msg := etcderr.CodeMessage(err)
		out.Code, out.Message = int32(code), msg
		return out
	}
	// The client's deadline, when it is nearer than the replica's own bound on every
	// wait (RequestTimeout): a timer per call is not free.
	if t := time.Duration(c.GetTimeoutMicros()) * time.Microsecond; t > 0 && t < s.r.cfg.RequestTimeout {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t)
		defer cancel()
	}
	switch {
	case ok:
		ctx = authz.WithDecision(ctx, d)
	case c.GetAuth() != "":
		return fail(connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("malformed %s metadata", authz.MetadataKey)))
	}
	if tp := c.GetTraceparent(); tp != "" {
		var span trace.Span
		ctx = otel.GetTextMapPropagator().Extract(ctx, propagation.MapCarrier{"traceparent": tp})
		ctx, span = s.r.tracer.Start(ctx, batchMethod(c), trace.WithSpanKind(trace.SpanKindServer))
		defer span.End()
	}
	// The limit of a unary call's request (see newGRPCServer), per call. Puts and
	// deletes need no measuring here: what they propose is held to MaxRequestBytes
	// (propose), which is tighter, and measuring a message is not free.
	switch c.GetRequest().(type) {
	case *replicav1.KVCall_Put, *replicav1.KVCall_DeleteRange:
	default:
		if limit := s.r.cfg.MaxRequestBytes + grpcOverheadBytes; proto.Size(c) > limit {
			return fail(connect.NewError(connect.CodeResourceExhausted, errors.New("kvmesh: call larger than the request limit")))
		}
	}
	switch r := c.GetRequest().(type) {
	case *replicav1.KVCall_Range:
		resp, err := s.Range(ctx, r.Range)
		if err != nil {
			return fail(err)
		}
		out.Response = &replicav1.KVResult_Range{Range: resp}
	case *replicav1.KVCall_Put:
		resp, err := s.Put(ctx, r.Put)
		if err != nil {
			return fail(err)
		}
		out.Response = &replicav1.KVResult_Put{Put: resp}
	case *replicav1.KVCall_DeleteRange:
		resp, err := s.DeleteRange(ctx, r.DeleteRange)
		if err != nil {
			return fail(err)
		}
		out.Response = &replicav1.KVResult_DeleteRange{DeleteRange: resp}
	case *replicav1.KVCall_Txn:
		resp, err := s.Txn(ctx, r.Txn)
		if err != nil {
			return fail(err)
		}
		out.Response = &replicav1.KVResult_Txn{Txn: resp}
	default:
		return fail(connect.NewError(connect.CodeInvalidArgument, errors.New("kvmesh: a batch call without a request")))
	}
	return out
}

// batchMethod names a call's span as its unary RPC's.
func batchMethod(c *replicav1.KVCall) string {
	switch c.GetRequest().(type) {
	case *replicav1.KVCall_Range:
		return "kvmesh.replica.v1.KVService/Range"
	case *replicav1.KVCall_Put:
		return "kvmesh.replica.v1.KVService/Put"
	case *replicav1.KVCall_DeleteRange:
		return "kvmesh.replica.v1.KVService/DeleteRange"
	case *replicav1.KVCall_Txn:
		return "kvmesh.replica.v1.KVService/Txn"
	}
	return "kvmesh.replica.v1.KVService/Batch"
}

// Batch serves a Batch stream over grpc-go.
func (s *kvService) Batch(stream replicav1.KVService_BatchServer) error {
	err := s.serveBatch(stream.Context(), stream.Recv, stream.Send)
	if err == nil || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
