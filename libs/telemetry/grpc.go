package telemetry

import (
	"context"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel"
	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// GRPCServer is the telemetry of a grpc-go server of the public API: the same etcd
// metric names as PublicHandler, and the same traces.
func (t *Telemetry) GRPCServer() []grpc.ServerOption {
	var opts []grpc.ServerOption
	if t.tracing {
		opts = append(opts, grpc.StatsHandler(t.grpcStats()))
	}
	return append(opts, t.grpcCounted()...)
}

// grpcCounted counts a grpc-go server's RPCs under etcd's metric names (rpcMetrics).
func (t *Telemetry) grpcCounted() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
			p := t.rpc.proc(connect.Spec{Procedure: info.FullMethod, StreamType: connect.StreamTypeUnary})
			p.started.Inc()
			start := time.Now()
			resp, err := next(ctx, req)
			p.doneCode(start, int(status.Code(err)))
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, next grpc.StreamHandler) error {
			typ := connect.StreamTypeBidi
			switch {
			case info.IsClientStream && !info.IsServerStream:
				typ = connect.StreamTypeClient
			case info.IsServerStream && !info.IsClientStream:
				typ = connect.StreamTypeServer
			}
			p := t.rpc.proc(connect.Spec{Procedure: info.FullMethod, StreamType: typ})
			p.started.Inc()
			start := time.Now()
			err := next(srv, ss)
			p.doneCode(start, int(status.Code(err)))
			return err
		}),
	}
}

func (t *Telemetry) grpcStats() stats.Handler {
	return otelgrpc.NewServerHandler(
		otelgrpc.WithTracerProvider(t.Tracer),
		otelgrpc.WithPropagators(otel.GetTextMapPropagator()),
	)
}

// GRPCInternalServer is the telemetry of a grpc-go server of kvmesh's internal API:
// counted under etcd's gRPC metric names (with kvmesh's service names), and traced,
// continuing the caller's trace (so that a request is one trace from the gateway to
// the apply).
func (t *Telemetry) GRPCInternalServer() []grpc.ServerOption {
	opts := t.grpcCounted()
	if t.tracing {
		opts = append(opts, grpc.StatsHandler(t.grpcStats()))
	}
	return opts
}

// GRPCInternalClient is the telemetry of a grpc-go client of kvmesh's internal API:
// traced, its trace context sent along.
func (t *Telemetry) GRPCInternalClient() []grpc.DialOption {
	if !t.tracing {
		return nil
	}
	return []grpc.DialOption{grpc.WithStatsHandler(otelgrpc.NewClientHandler(
		otelgrpc.WithTracerProvider(t.Tracer),
		otelgrpc.WithPropagators(otel.GetTextMapPropagator()),
	))}
}
