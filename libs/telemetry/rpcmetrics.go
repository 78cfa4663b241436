package telemetry

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
)

// rpcMetrics counts RPCs under the names etcd exports (go-grpc-prometheus), so etcd's
// dashboards work: grpc_server_started_total, grpc_server_handled_total and
// grpc_server_handling_seconds. Each procedure's series are resolved once and cached,
// keeping the per-call cost to a few atomic adds.
type rpcMetrics struct {
	started  *prometheus.CounterVec
	handled  *prometheus.CounterVec
	duration *prometheus.HistogramVec
	procs    sync.Map // procedure → *procMetrics
}

type procMetrics struct {
	started  prometheus.Counter
	duration prometheus.Observer
	handled  [17]prometheus.Counter // by connect.Code (0 = OK)
}

func newRPCMetrics(reg prometheus.Registerer) *rpcMetrics {
	labels := []string{"grpc_type", "grpc_service", "grpc_method"}
	m := &rpcMetrics{
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_started_total", Help: "Total number of RPCs started on the server.",
		}, labels),
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_handled_total", Help: "Total number of RPCs completed on the server, regardless of success or failure.",
		}, append(labels, "grpc_code")),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "grpc_server_handling_seconds", Help: "Histogram of response latency (seconds) of RPCs handled by the server.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, labels),
	}
	reg.MustRegister(m.started, m.handled, m.duration)
	return m
}

// gRPC's names for the codes, as go-grpc-prometheus labels them.
var codeNames = [17]string{"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
	"AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
	"Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}

func (m *rpcMetrics) proc(spec connect.Spec) *procMetrics {
	if p, ok := m.procs.Load(spec.Procedure); ok {
		return p.(*procMetrics)
	}
	service, method := "unknown", spec.Procedure
	if parts := strings.Split(strings.TrimPrefix(spec.Procedure, "/"), "/"); len(parts) == 2 {
		service, method = parts[0], parts[1]
	}
	typ := map[connect.StreamType]string{
		connect.StreamTypeUnary: "unary", connect.StreamTypeClient: "client_stream",
		connect.StreamTypeServer: "server_stream", connect.StreamTypeBidi: "bidi_stream",
	}[spec.StreamType]
	p := &procMetrics{
		started:  m.started.WithLabelValues(typ, service, method),
		duration: m.duration.WithLabelValues(typ, service, method),
	}
	for c, name := range codeNames {
		p.handled[c] = m.handled.WithLabelValues(typ, service, method, name)
	}
	actual, _ := m.procs.LoadOrStore(spec.Procedure, p)
	return actual.(*procMetrics)
}

func (p *procMetrics) done(start time.Time, err error) {
	code := 0
	if err != nil {
		code = int(connect.CodeUnknown)
		var ce *connect.Error
		if errors.As(err, &ce) {
			code = int(ce.Code())
		}
	}
	p.doneCode(start, code)
}

func (p *procMetrics) doneCode(start time.Time, code int) {
	p.duration.Observe(time.Since(start).Seconds())
	if code < 0 || code >= len(p.handled) {
		code = int(connect.CodeUnknown)
	}
	p.handled[code].Inc()
}

func (m *rpcMetrics) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		p := m.proc(req.Spec())
		p.started.Inc()
		start := time.Now()
		resp, err := next(ctx, req)
		p.done(start, err)
		return resp, err
	}
}

func (m *rpcMetrics) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (m *rpcMetrics) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		p := m.proc(conn.Spec())
		p.started.Inc()
		start := time.Now()
		err := next(ctx, conn)
		p.done(start, err)
		return err
	}
}

// CountCall counts one call that does not travel as an RPC of its own (a call of a
// batch stream) as the unary RPC procedure ("/package.Service/Method") it stands for;
// the returned function ends it with its code (0: OK).
func (t *Telemetry) CountCall(procedure string) func(connect.Code) {
	p := t.rpc.proc(connect.Spec{Procedure: procedure, StreamType: connect.StreamTypeUnary})
	p.started.Inc()
	start := time.Now()
	return func(code connect.Code) { p.doneCode(start, int(code)) }
}
