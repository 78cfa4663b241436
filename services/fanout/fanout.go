// Package fanout is the only watcher of the consensus core. It tails a replica's Feed
// (a follower by preference) and publishes every committed revision as one JetStream
// message, so that gateways serve any number of watchers without reaching the core.
//
// The stream stays gapless and ordered whatever happens to fanouts: each revision is
// published with JetStream's expected-last-sequence set to the sequence of the
// revision before it (see libs/revstream), so of two fanouts running at once, or a
// restarted one replaying what was already published, exactly one publish of each
// revision succeeds. A fanout that loses such a race backs off and resumes from the
// stream's end.
package fanout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/health"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/revstream"
	"github.com/kvmesh/kvmesh/libs/rpcmux"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// Config is the fanout's configuration, from KVMESH_FANOUT_… variables.
type Config struct {
	// Listen serves /metrics and the health endpoints.
	Listen string `env:"LISTEN, default=127.0.0.1:2396"`
	// Replicas are the internal API URLs of the replicas to tail.
	Replicas []string `env:"REPLICAS, default=http://127.0.0.1:2390"`
	// MaxInFlight bounds the publishes awaiting JetStream's acknowledgement.
	MaxInFlight int `env:"MAX_IN_FLIGHT, default=256"`
	// StallTimeout switches to another replica when the one tailed has not delivered a
	// revision that another replica already has for this long.
	StallTimeout time.Duration `env:"STALL_TIMEOUT, default=3s"`

	// MTLS is the fanout's identity in the mesh (KVMESH_FANOUT_MTLS_CERT_FILE, _KEY_FILE,
	// _CA_FILE), for its calls to the replicas (https:// URLs) and to NATS, and for its
	// own port. KVMESH_FANOUT_ALLOW_PLAINTEXT=true lets that port be plaintext off
	// loopback.
	MTLS meshtls.Config
}

// Validate checks the configuration; errors name the variable.
func (c *Config) Validate() error {
	if c.Listen != "" {
		if _, _, err := net.SplitHostPort(c.Listen); err != nil {
			return fmt.Errorf("KVMESH_FANOUT_LISTEN: %w", err)
		}
	}
	if c.MaxInFlight <= 0 {
		return errors.New("KVMESH_FANOUT_MAX_IN_FLIGHT: must be positive")
	}
	if c.StallTimeout <= 0 {
		return errors.New("KVMESH_FANOUT_STALL_TIMEOUT: must be positive")
	}
	if err := c.MTLS.Validate("KVMESH_FANOUT_"); err != nil {
		return err
	}
	return config.CheckReplicaURLs("KVMESH_FANOUT_REPLICAS", c.Replicas, c.MTLS.Enabled())
}

// Fanout publishes the committed revisions.
type Fanout struct {
	cfg    Config
	stream revstream.Config
	tel    *telemetry.Telemetry
	log    *slog.Logger
	// replicas are the links to cfg.Replicas, in order.
	replicas []replicaapi.Conn
	nc       *nats.Conn
	js       jetstream.JetStream
	tracer   trace.Tracer

	published atomic.Int64 // last revision acknowledged by JetStream
	avoid     atomic.Int64 // index+1 of a replica found stalled, skipped at the next pick

	m struct {
		published prometheus.Counter
		conflicts prometheus.Counter
		switches  prometheus.Counter
		tooLarge  prometheus.Counter
		states    prometheus.Counter
	}

	server *http.Server
	lis    net.Listener
	mesh   *meshtls.Mesh // nil: plaintext
}

// New builds a fanout publishing through nc. dial links it to the replicas; nil means
// over the network (replicaapi.Network, with the mesh's TLS).
func New(cfg Config, stream revstream.Config, tel *telemetry.Telemetry, dial replicaapi.Dialer, nc *nats.Conn) (*Fanout, error) {
	if err := errors.Join(cfg.Validate(), stream.Validate()); err != nil {
		return nil, err
	}
	mesh, err := cfg.MTLS.Load("KVMESH_FANOUT_")
	if err != nil {
		return nil, err
	}
	if dial == nil {
		dial = replicaapi.Network{TLS: mesh.ClientConfig(), Options: tel.GRPCInternalClient()}
	}
	var replicas []replicaapi.Conn
	for _, u := range cfg.Replicas {
		c, err := dial.Dial(u)
		if err != nil {
			return nil, fmt.Errorf("KVMESH_FANOUT_REPLICAS: %w", err)
		}
		replicas = append(replicas, c)
	}
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(cfg.MaxInFlight))
	if err != nil {
		return nil, err
	}
	f := &Fanout{cfg: cfg, stream: stream, tel: tel, log: tel.Log.With("role", "fanout"), replicas: replicas, nc: nc, js: js, mesh: mesh,
		tracer: tel.Tracer.Tracer("kvmesh/fanout")}
	f.m.published = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_fanout_published_revisions_total", Help: "Revisions published to the JetStream stream."})
	f.m.conflicts = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_fanout_conflicts_total", Help: "Publishes refused because another publisher got there first."})
	f.m.switches = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_fanout_feed_restarts_total", Help: "Times the fanout (re)started tailing a replica."})
	f.m.tooLarge = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_fanout_too_large_revisions_total", Help: "Revisions published as markers because they exceed the NATS payload limit."})
	f.m.states = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_fanout_stream_states_total", Help: "Compacted and auth store revisions recorded in the stream's state bucket."})
	tel.Registry.MustRegister(f.m.published, f.m.conflicts, f.m.switches, f.m.tooLarge, f.m.states,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvmesh_fanout_published_revision", Help: "The last revision JetStream acknowledged."},
			func() float64 { return float64(f.published.Load()) }))
	return f, nil
}

// Listen binds cfg.Listen for /metrics and health (nothing when it is empty).
func (f *Fanout) Listen() error {
	if f.cfg.Listen == "" {
		return nil
	}
	lis, err := meshtls.Listen("KVMESH_FANOUT_LISTEN", "KVMESH_FANOUT_ALLOW_PLAINTEXT", f.cfg.Listen, f.mesh.ServerConfig(), f.cfg.MTLS.AllowPlaintext)
	if err != nil {
		return err
	}
	mux := rpcmux.New()
	mux.Handle("/metrics", f.tel.MetricsHandler())
	// The fanout's readiness is its NATS connection; it is alive while it answers.
	natsUp := func(context.Context) error {
		if !f.nc.IsConnected() {
			return errors.New("NATS not connected")
		}
		return nil
	}
	h := health.New(f.log, f.tel.Registry)
	h.Health(func(ctx context.Context, _ bool) (string, bool) {
		if err := natsUp(ctx); err != nil {
			return err.Error(), false
		}
		return "", true
	})
	h.Ready("nats", natsUp)
	h.Install(mux)
	f.lis, f.server = lis, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	return nil
}

// Run publishes until ctx ends. Its calls to the replicas are background work, not
// traced; each published revision is a trace of its own (see tail).
func (f *Fanout) Run(ctx context.Context) error {
	ctx = telemetry.Untraced(ctx)
	defer func() {
		for _, c := range f.replicas {
			c.Close()
		}
	}()
	if f.server != nil {
		go f.server.Serve(f.lis)
		defer f.server.Close()
	}
	f.log.Info("publishing revisions", "stream", f.stream.Stream, "subject", f.stream.Subject, "replicas", f.cfg.Replicas)
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		before := f.published.Load()
		err := f.tail(ctx)
		if ctx.Err() != nil {
			break
		}
		wait := backoff
		var conflict *conflictError
		switch {
		case errors.As(err, &conflict):
			// Another fanout is publishing: let it, and come back to take over should
			// it stop.
			f.m.conflicts.Inc()
			f.log.Info("another publisher is ahead; standing by", "revision", conflict.rev)
			wait = 500*time.Millisecond + rand.N(time.Second)
		case err != nil:
			f.log.Warn("tailing stopped", "err", err)
		}
		if f.published.Load() > before {
			backoff = 100 * time.Millisecond
		} else {
			backoff = min(2*backoff, 2*time.Second)
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	return nil
}

type conflictError struct{ rev int64 }

func (e *conflictError) Error() string {
	return fmt.Sprintf("revision %d: the stream moved on without this publisher", e.rev)
}

func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// tail publishes from the stream's end until something fails.
func (f *Fanout) tail(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s, err := revstream.Ensure(ctx, f.js, f.stream)
	if err != nil {
		return err
	}
	state, err := revstream.EnsureState(ctx, f.js, f.stream)
	if err != nil {
		return err
	}
	end, err := revstream.LastOf(ctx, s)
	if err != nil {
		return fmt.Errorf("read the stream's end: %w", err)
	}
	var from int64 // 0: the stream is empty (or all it kept expired): start live
	if end.Rev > 0 {
		from = end.Rev + 1
	}
	idx, base, err := f.pick(ctx)
	if err != nil {
		return err
	}
	f.m.switches.Inc()
	f.log.Info("tailing", "replica", base, "from", from, "stream_seq", end.Seq)
	if end.Rev > 0 && f.published.Load() < end.Rev {
		f.published.Store(end.Rev)
	}

	maxPayload := f.nc.MaxPayload()
	acks := make(chan ack, f.cfg.MaxInFlight)
	acked := make(chan struct{})
	go func() {
		defer close(acked)
		for a := range acks {
			select {
			case <-a.fut.Ok():
				f.published.Store(a.rev)
				f.m.published.Inc()
				a.span.End()
			case err := <-a.fut.Err():
				if isWrongLastSequence(err) {
					err = &conflictError{a.rev}
				}
				a.span.SetStatus(codes.Error, err.Error())
				a.span.End()
				cancel(err)
				for a := range acks { // drain: everything after a failure fails too
					a.span.SetStatus(codes.Error, "an earlier publish failed")
					a.span.End()
				}
				return
			}
		}
	}()
	defer func() {
		close(acks)
		<-acked
	}()
	go f.watchStall(ctx, cancel, idx)

	p := &publisher{f: f, base: base, state: state, maxPayload: maxPayload, acks: acks, seq: end.Seq, next: from}
	// The feed's answers go to p; its failure ends the feed.
	var failed error
	// Without prev_kv: reading each event's previous version cost the tailed replica a
	// lookup per event whether or not anyone watches with prev_kv. A gateway reads
	// them for a revision (once, for all its watchers) when one of its watchers asks.
	err = f.replicas[idx].Feed(ctx, &replicav1.FeedRequest{FromRevision: from, OmitPrevKv: true}, func(m *replicav1.FeedResponse) error {
		failed = p.publish(ctx, m)
		return failed
	})
	if cause := context.Cause(ctx); cause != nil {
		return cause
	}
	if failed != nil {
		return failed
	}
	if err != nil {
		return fmt.Errorf("feed from %s: %w", base, err)
	}
	return fmt.Errorf("feed from %s ended", base)
}

// publisher publishes the answers of one tail's feed.
type publisher struct {
	f          *Fanout
	base       string // the replica fed from
	state      jetstream.KeyValue
	maxPayload int64
	acks       chan<- ack // the publishes to wait for, in order

	seq  uint64 // the stream's last sequence
	next int64  // the revision expected next (0: any)
	told *replicav1.StreamState
}

// publish sends one feed answer's revisions to JetStream and records a compaction or
// an auth change in the state bucket.
func (p *publisher) publish(ctx context.Context, m *replicav1.FeedResponse) error {
	f := p.f
	for _, r := range m.GetRevisions() {
		if p.next != 0 && r.GetRevision() != p.next {
			return fmt.Errorf("replica %s sent revision %d, expected %d", p.base, r.GetRevision(), p.next)
		}
		msg, tooLarge, err := revstream.Message(f.stream.Subject, r, p.maxPayload)
		if err != nil {
			return err
		}
		if tooLarge {
			f.m.tooLarge.Inc()
		}
		span := f.publishSpan(ctx, msg, r)
		// The expected last sequence makes each revision land once, at its place (a
		// second publisher, or a retry, is refused): no message ids for JetStream to
		// deduplicate on, which would cost it a record per revision.
		fut, err := f.js.PublishMsgAsync(msg, jetstream.WithExpectLastSequence(p.seq))
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
			span.End()
			if isWrongLastSequence(err) {
				return &conflictError{r.GetRevision()}
			}
			return fmt.Errorf("publish revision %d: %w", r.GetRevision(), err)
		}
		select {
		case p.acks <- ack{fut, r.GetRevision(), span}:
		case <-ctx.Done():
			span.End()
			return context.Cause(ctx)
		}
		p.seq, p.next = p.seq+1, r.GetRevision()+1
	}
	// A compaction or an auth change, which make no revision: into the state
	// bucket, for the gateways' watch creations.
	if st := (&replicav1.StreamState{CompactRevision: m.GetCompactRevision(), AuthRevision: m.GetAuthRevision()}); p.told == nil ||
		st.GetCompactRevision() != p.told.GetCompactRevision() || st.GetAuthRevision() != p.told.GetAuthRevision() {
		if err := revstream.PutState(ctx, p.state, st); err != nil {
			return fmt.Errorf("record the stream state: %w", err)
		}
		f.m.states.Inc()
		p.told = st
	}
	return nil
}

type ack struct {
	fut  jetstream.PubAckFuture
	rev  int64
	span trace.Span
}

// noSpan is the span of a revision when nothing is traced.
var noSpan = trace.SpanFromContext(context.Background())

// publishSpan starts the trace of a revision's delivery to watchers: "fanout.publish",
// from the publish to JetStream's acknowledgement. Its context travels in the message's
// headers (W3C trace context), so that the gateways' spans for the revision join it.
// Without tracing it is a no-op span and the headers stay as they are.
func (f *Fanout) publishSpan(ctx context.Context, msg *nats.Msg, r *replicav1.Revision) trace.Span {
	if !f.tel.Tracing() {
		return noSpan
	}
	ctx, span := f.tracer.Start(ctx, "fanout.publish", trace.WithNewRoot(), trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			attribute.Int64("kvmesh.revision", r.GetRevision()),
			attribute.Int("kvmesh.events", len(r.GetEvents())),
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.destination.name", msg.Subject)))
	if span.SpanContext().IsSampled() {
		otel.GetTextMapPropagator().Inject(ctx, propagation.HeaderCarrier(msg.Header))
	}
	return span
}

var errStalled = errors.New("the tailed replica is behind another one")

// watchStall ends the tail when the replica fed from falls behind: a member cut off
// from its cluster still answers, but stops applying revisions that the majority
// commits. It compares what was published with the other replicas' revisions.
func (f *Fanout) watchStall(ctx context.Context, cancel context.CancelCauseFunc, idx int) {
	t := time.NewTicker(f.cfg.StallTimeout / 3)
	defer t.Stop()
	var behindSince time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		best := int64(0)
		for i, c := range f.replicas {
			if i == idx {
				continue
			}
			cctx, ccancel := context.WithTimeout(ctx, time.Second)
			pos, err := c.Position(cctx, &replicav1.PositionRequest{})
			ccancel()
			if err == nil {
				best = max(best, pos.GetHeader().GetRevision())
			}
		}
		if best <= f.published.Load() {
			behindSince = time.Time{}
			continue
		}
		if behindSince.IsZero() {
			behindSince = time.Now()
		} else if time.Since(behindSince) >= f.cfg.StallTimeout {
			f.avoid.Store(int64(idx) + 1)
			cancel(fmt.Errorf("%w: published %d, another replica has %d", errStalled, f.published.Load(), best))
			return
		}
	}
}

// pick chooses the replica to tail: a follower when one answers (the leader has the
// client traffic), else any replica that answers; never the one found stalled last,
// unless it is the only one.
func (f *Fanout) pick(ctx context.Context) (int, string, error) {
	avoid := int(f.avoid.Swap(0)) - 1
	bestIdx, bestScore := -1, -1
	var errs []error
	for i, base := range f.cfg.Replicas {
		base = strings.TrimRight(base, "/")
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := f.replicas[i].Status(cctx, &pb.StatusRequest{})
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", base, err))
			continue
		}
		score := 1
		if lead := st.GetLeader(); lead != 0 && lead != st.GetHeader().GetMemberId() && !st.GetIsLearner() {
			score = 3 // a voting follower with a leader
		} else if lead != 0 {
			score = 2
		}
		if i == avoid && len(f.cfg.Replicas) > 1 {
			score = 0
		}
		if score > bestScore {
			bestIdx, bestScore = i, score
		}
	}
	if bestIdx < 0 {
		return 0, "", fmt.Errorf("no replica answers: %w", errors.Join(errs...))
	}
	return bestIdx, strings.TrimRight(f.cfg.Replicas[bestIdx], "/"), nil
}
