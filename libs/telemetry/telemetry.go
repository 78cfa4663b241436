// Package telemetry sets up what every kvmesh service emits: structured logs (slog),
// traces (OpenTelemetry, exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is
// set) and metrics (Prometheus text format on /metrics), plus the Connect interceptors
// that trace and count every RPC.
package telemetry

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"

	"connectrpc.com/connect"
	"connectrpc.com/otelconnect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Config is the telemetry configuration shared by every service (prefix KVMESH_).
type Config struct {
	// LogLevel is debug, info, warn or error.
	LogLevel string `env:"LOG_LEVEL, default=info"`
	// LogFormat is json or text.
	LogFormat string `env:"LOG_FORMAT, default=json"`
}

// Telemetry is one process's logger, tracer provider and metrics registry.
type Telemetry struct {
	Log      *slog.Logger
	Tracer   trace.TracerProvider
	Registry *prometheus.Registry

	// tracing is whether spans go anywhere; without it no tracing interceptor is
	// installed at all (even a no-op tracer costs attribute building per call).
	tracing  bool
	rpc      *rpcMetrics
	shutdown []func(context.Context) error
}

// New sets up telemetry for the process named service. The OTLP exporter reads the
// standard OTEL_EXPORTER_OTLP_* variables.
func New(ctx context.Context, service string, cfg Config, logOut io.Writer) (*Telemetry, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return nil, fmt.Errorf("KVMESH_LOG_LEVEL: %q is not debug, info, warn or error", cfg.LogLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch strings.ToLower(cfg.LogFormat) {
	case "json":
		h = slog.NewJSONHandler(logOut, opts)
	case "text":
		h = slog.NewTextHandler(logOut, opts)
	default:
		return nil, fmt.Errorf("KVMESH_LOG_FORMAT: %q is not json or text", cfg.LogFormat)
	}
	t := &Telemetry{Log: slog.New(h).With("service", service), Registry: prometheus.NewRegistry()}
	t.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	t.rpc = newRPCMetrics(t.Registry)

	res := resource.NewSchemaless(semconv.ServiceName(service))
	// Without an exporter, spans would be recorded only to be dropped: use a no-op
	// provider, so tracing costs nothing until it is wanted.
	t.Tracer = noop.NewTracerProvider()
	if os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "" {
		exp, err := otlptracehttp.New(ctx)
		if err != nil {
			return nil, fmt.Errorf("OTEL_EXPORTER_OTLP_ENDPOINT: %w", err)
		}
		tp := sdktrace.NewTracerProvider(sdktrace.WithResource(res), sdktrace.WithBatcher(exp))
		t.Tracer = tp
		t.tracing = true
		t.shutdown = append(t.shutdown, tp.Shutdown)
	}
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))

	return t, nil
}

// Tracing tells whether spans go anywhere, so that hot paths can skip building them.
func (t *Telemetry) Tracing() bool { return t.tracing }

// WithTracerProvider replaces the tracer provider and turns tracing on, for tests with
// an in-memory exporter. Call it before building clients and handlers.
func (t *Telemetry) WithTracerProvider(tp trace.TracerProvider) {
	t.Tracer = tp
	t.tracing = true
}

// InternalClient is the option set for Connect clients of kvmesh's internal APIs (the
// peers' snapshot stream): traced, and uncompressed (internal links are local or in one data center,
// where gzip costs more CPU than it saves).
func (t *Telemetry) InternalClient() []connect.ClientOption {
	return []connect.ClientOption{
		connect.WithInterceptors(t.interceptors(true)...),
		connect.WithAcceptCompression("gzip", nil, nil),
	}
}

// InternalHandler is the option set for handlers of kvmesh's internal APIs: counted
// under etcd's gRPC metric names (with kvmesh's service names), and traced.
func (t *Telemetry) InternalHandler() []connect.HandlerOption {
	return []connect.HandlerOption{
		connect.WithInterceptors(append([]connect.Interceptor{t.rpc}, t.interceptors(true)...)...),
		connect.WithCompression("gzip", nil, nil),
	}
}

// PublicHandler is the option set for handlers of the public API: counted under
// etcd's gRPC metric names, traced, and compressing only large responses, so small ones
// cost what they cost on etcd (a grpc-go server does not compress unless told to).
func (t *Telemetry) PublicHandler() []connect.HandlerOption {
	return []connect.HandlerOption{
		connect.WithInterceptors(append([]connect.Interceptor{t.rpc}, t.interceptors(false)...)...),
		connect.WithCompressMinBytes(64 << 10),
	}
}

// interceptors trace RPCs when tracing is on. Internal links trust the caller's trace
// so that a request is one trace from the gateway to the apply.
func (t *Telemetry) interceptors(internal bool) []connect.Interceptor {
	if !t.tracing {
		return nil
	}
	opts := []otelconnect.Option{
		otelconnect.WithTracerProvider(t.Tracer),
		otelconnect.WithPropagator(otel.GetTextMapPropagator()),
		// RPC metrics come from rpcMetrics, under etcd's names and at a fraction of
		// the cost of OpenTelemetry histograms with attribute sets.
		otelconnect.WithoutMetrics(),
	}
	if internal {
		// One trace from the gateway to the apply.
		opts = append(opts, otelconnect.WithTrustRemote())
	}
	i, err := otelconnect.NewInterceptor(opts...)
	if err != nil {
		// Only invalid options fail, and ours are fixed.
		panic(fmt.Sprintf("otelconnect interceptor: %v", err))
	}
	return []connect.Interceptor{i}
}

// MetricsHandler serves the registry in Prometheus text format.
func (t *Telemetry) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(t.Registry, promhttp.HandlerOpts{Registry: t.Registry})
}

// Shutdown flushes and stops the exporters.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	var errs []error
	for _, f := range t.shutdown {
		errs = append(errs, f(ctx))
	}
	return errors.Join(errs...)
}

// Untraced marks ctx as belonging to background work (polls, health checks): RPCs made
// with it record no spans, neither here nor downstream, so that they do not bury the
// traces of requests. It carries a span context that is not sampled, which the SDK's
// default (parent-based) sampler and every downstream service follow.
func Untraced(ctx context.Context) context.Context {
	var tid trace.TraceID
	var sid trace.SpanID
	binary.BigEndian.PutUint64(tid[:8], rand.Uint64())
	binary.BigEndian.PutUint64(tid[8:], rand.Uint64()|1)
	binary.BigEndian.PutUint64(sid[:], rand.Uint64()|1)
	return trace.ContextWithSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid}))
}
