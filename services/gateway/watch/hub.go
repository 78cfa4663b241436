package watch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/libs/notify"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// The hub is the gateway's one reader of the revision stream. It consumes the
// JetStream stream once, checks that revisions follow each other (a hole, say after a
// NATS or fanout restart, is filled from a replica's Feed before anything after it is
// delivered), keeps the most recent revisions in memory, and hands each revision to the
// client streams that watch one of its keys. It never waits for a client: a stream
// whose queue is full is marked overflowed and catches up from history on its own
// goroutine (watch.go), as etcd's unsynced watchers do.

// hrev is a revision as the hub holds it, shared by every stream (read-only).
type hrev struct {
	*replicav1.Revision
	size   int               // encoded size
	span   trace.SpanContext // the hub's watch.deliver span, when it is traced
	once   sync.Once
	noPrev []*mvccpb.Event // the events without prev_kv, made on first use

	// withPrev are the events with prev_kv read from a replica, for a revision whose
	// feed left it out (PrevKvOmitted), read on first use by a watcher that asked for
	// it; prevMu guards it (a failed read is tried again by the next such watcher).
	prevMu   sync.Mutex
	withPrev []*mvccpb.Event
}

func newHrev(r *replicav1.Revision) *hrev { return &hrev{Revision: r, size: proto.Size(r)} }

// eventsWithoutPrev returns the events stripped of prev_kv, for watchers that did not
// ask for it.
func (r *hrev) eventsWithoutPrev() []*mvccpb.Event {
	r.once.Do(func() {
		r.noPrev = make([]*mvccpb.Event, len(r.Events))
		for i, ev := range r.Events {
			if ev.PrevKv == nil {
				r.noPrev[i] = ev
			} else {
				r.noPrev[i] = &mvccpb.Event{Type: ev.Type, Kv: ev.Kv}
			}
		}
	})
	return r.noPrev
}

// prevTimeout bounds reading a revision's prev_kv from a replica.
const prevTimeout = 5 * time.Second

// eventsWithPrev returns the events with prev_kv, for watchers that asked for it. A
// revision whose feed left prev_kv out reads it from a replica once, as etcd reads it
// from its backend for each such watcher; when that fails, the events go without it
// (as etcd's do when its read fails), and the failure is logged.
func (r *hrev) eventsWithPrev(h *Hub) []*mvccpb.Event {
	if !r.GetPrevKvOmitted() {
		return r.Events
	}
	r.prevMu.Lock()
	defer r.prevMu.Unlock()
	if r.withPrev != nil {
		return r.withPrev
	}
	keys := make([][]byte, len(r.Events))
	for i, ev := range r.Events {
		keys[i] = ev.Kv.Key
	}
	// Shared by every watcher of the revision: not bound to the one that asks first.
	ctx, cancel := context.WithTimeout(context.Background(), prevTimeout)
	defer cancel()
	prevs, err := h.replicas.Before(ctx, r.GetRevision(), keys)
	if err != nil {
		h.log.Warn("reading prev_kv of a revision failed; its events go without", "revision", r.GetRevision(), "err", err)
		return r.Events
	}
	evs := make([]*mvccpb.Event, len(r.Events))
	for i, ev := range r.Events {
		evs[i] = &mvccpb.Event{Type: ev.Type, Kv: ev.Kv, PrevKv: prevs[i]}
	}
	r.withPrev = evs
	return evs
}

// Hub serves etcd's Watch from the revision stream. It starts nothing until Run.
type Hub struct {
	cfg      Config
	src      Source
	replicas Replicas
	auth     Authorizer
	cluster  Cluster
	tel      *telemetry.Telemetry
	log      *slog.Logger
	tracer   trace.Tracer

	mu         sync.Mutex
	rev        int64 // last revision handed to the streams; 0 until known
	compactRev int64
	ring       []*hrev                // consecutive revisions ending at rev
	ringSize   int                    // encoded bytes of the ring's revisions
	keys       map[string][]streamRef // the streams with watchers of a key, and how many
	ranges     intervals              // the range watchers, by range
	changed    notify.Notifier        // at every revision
	ready      chan struct{}          // closed once rev is known (a new one when the hub idles)
	stateReady chan struct{}          // closed once the source's state has been read (see applyState)
	stateOnce  sync.Once

	lastMove atomic.Int64 // unix nanos of the last revision handed out

	// Following the source only while someone watches (Config.IdleAfter): open counts
	// the client streams being served, closedAt is when the last one ended, idle tells
	// that the hub stopped following (its revision forgotten), demand wakes it (mu).
	open     int
	closedAt time.Time
	idle     bool
	demand   chan struct{}

	m struct {
		following prometheus.Gauge
		revisions prometheus.Counter
		repaired  prometheus.Counter
		skipped   prometheus.Counter
		overflows prometheus.Counter
		watchers  prometheus.Gauge
		streams   prometheus.Gauge
		events    prometheus.Counter
	}
}

// New builds a hub taking its revisions from src; deps are what it needs of the
// gateway, none of them optional: without an Authorizer no watch could be decided.
func New(cfg Config, src Source, deps Deps, tel *telemetry.Telemetry) (*Hub, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if src == nil || deps.Replicas == nil || deps.Authorizer == nil || deps.Cluster == nil {
		return nil, errors.New("watch: a hub needs a source, its replicas, an authorizer and the cluster's identity")
	}
	h := &Hub{
		cfg: cfg, src: src, replicas: deps.Replicas, auth: deps.Authorizer, cluster: deps.Cluster, tel: tel,
		log: tel.Log.With("role", "gateway", "component", "watch"), tracer: tel.Tracer.Tracer("kvmesh/gateway"),
		keys:       make(map[string][]streamRef),
		ready:      make(chan struct{}),
		stateReady: make(chan struct{}),
		demand:     make(chan struct{}, 1),
	}
	h.m.following = prometheus.NewGauge(prometheus.GaugeOpts{Name: "kvmesh_gateway_watch_following", Help: "1 while the gateway follows the revision stream, 0 while it idles because nobody watches (KVMESH_GATEWAY_WATCH_IDLE_AFTER)."})
	h.m.revisions = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_gateway_watch_revisions_total", Help: "Revisions the gateway received from the stream (or repaired) and fanned out."})
	h.m.repaired = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_gateway_watch_repaired_revisions_total", Help: "Revisions missing from the stream that the gateway read from a replica instead."})
	h.m.skipped = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_gateway_watch_skipped_revisions_total", Help: "Revisions a replica had compacted before the stream brought them to the gateway (their watchers were canceled as compacted)."})
	h.m.overflows = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_gateway_watch_stream_overflows_total", Help: "Times a slow client stream fell behind its queue and was caught up from history."})
	h.m.events = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvmesh_gateway_watch_events_sent_total", Help: "Events sent to watchers."})
	h.m.watchers = prometheus.NewGauge(prometheus.GaugeOpts{Name: "etcd_debugging_mvcc_watcher_total", Help: "Total number of watchers."})
	h.m.streams = prometheus.NewGauge(prometheus.GaugeOpts{Name: "etcd_debugging_mvcc_watch_stream_total", Help: "Total number of watch streams."})
	tel.Registry.MustRegister(h.m.following, h.m.revisions, h.m.repaired, h.m.skipped, h.m.overflows, h.m.events, h.m.watchers, h.m.streams,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "kvmesh_gateway_watch_revision", Help: "The last revision fanned out to watchers."},
			func() float64 { return float64(h.current()) }))
	return h, nil
}

// current is the last revision handed out.
func (h *Hub) current() int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.rev
}

// Run consumes the source until ctx ends, starting over (from where it is) after any
// failure. With Config.IdleAfter, and a source that can, it stops consuming once no
// client stream has been open for that long, and starts again (at the source's newest
// revision) when one opens: a gateway nobody watches through costs nothing per
// revision.
func (h *Hub) Run(ctx context.Context) error {
	ctx = telemetry.Untraced(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { h.watchdog(ctx) })
	wg.Go(func() { h.src.followState(ctx, h) })
	h.mu.Lock()
	h.closedAt = time.Now() // a gateway just started may soon be watched through (restarted clients)
	h.mu.Unlock()
	for ctx.Err() == nil {
		if !h.awaitDemand(ctx) {
			return nil
		}
		err := h.consumeUntilIdle(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil || h.isIdle() {
			continue
		}
		h.log.Warn("revision source stopped; restarting", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
	return nil
}

// consumeUntilIdle consumes the source until ctx ends, it fails, or the hub goes idle.
func (h *Hub) consumeUntilIdle(ctx context.Context) error {
	if h.cfg.IdleAfter <= 0 || !h.src.canIdle() {
		return h.src.consume(ctx, h)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(max(h.cfg.IdleAfter/4, 10*time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if h.goIdle() {
				cancel()
				return
			}
		}
	}()
	return h.src.consume(ctx, h)
}

// goIdle stops the hub following when no stream has been open for IdleAfter: it
// forgets its revision and memory (nobody holds a position in them), so that the next
// stream starts it again where the source then is.
func (h *Hub) goIdle() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.idle || h.open > 0 || time.Since(h.closedAt) < h.cfg.IdleAfter {
		return false
	}
	h.idle = true
	if h.rev != 0 {
		h.rev = 0
		clear(h.ring)
		h.ring, h.ringSize = h.ring[:0], 0
		h.ready = make(chan struct{})
	}
	h.m.following.Set(0)
	h.log.Info("no watch streams: the gateway stops following the revision stream until one opens", "idle_after", h.cfg.IdleAfter)
	return true
}

// isIdle tells whether the hub stopped following.
func (h *Hub) isIdle() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.idle
}

// awaitDemand returns at once when the hub follows; an idle hub waits for a stream to
// open. False when ctx ended.
func (h *Hub) awaitDemand(ctx context.Context) bool {
	for {
		h.mu.Lock()
		if !h.idle || h.open > 0 {
			h.idle = false
			h.m.following.Set(1)
			h.mu.Unlock()
			return true
		}
		h.mu.Unlock()
		select {
		case <-h.demand:
		case <-ctx.Done():
			return false
		}
	}
}

// opened counts a client stream in (and wakes an idle hub); the returned function
// counts it out.
func (h *Hub) opened() (closed func()) {
	h.mu.Lock()
	h.open++
	if h.idle {
		select {
		case h.demand <- struct{}{}:
		default:
		}
	}
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		if h.open--; h.open == 0 {
			h.closedAt = time.Now()
		}
		h.mu.Unlock()
	}
}

// applyState takes what the source's state tells (nil: all it held has been told).
func (h *Hub) applyState(st *replicav1.StreamState) {
	defer h.stateOnce.Do(func() { close(h.stateReady) })
	if st == nil {
		return
	}
	h.Compacted(st.GetCompactRevision())
	h.auth.Announce(st.GetAuthRevision())
}

// compacted records a compacted revision the gateway learned (from the stream's state,
// a compaction it passed on, a replica's answer).
func (h *Hub) Compacted(rev int64) {
	h.mu.Lock()
	h.compactRev = max(h.compactRev, rev)
	h.mu.Unlock()
}

// start sets the hub's first revision: watchers created from now on start after it.
func (h *Hub) start(rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.rev == 0 && !h.idle {
		h.rev = rev
		h.lastMove.Store(time.Now().UnixNano())
		close(h.ready)
	}
}

// ingestTraced is ingest, continuing the revision's trace when the fanout traced it:
// "watch.deliver" is the hub handing it to the watch streams, and each stream's
// "watch.send" (see wstream.deliver) a child of it.
func (h *Hub) ingestTraced(ctx context.Context, r *replicav1.Revision, headers nats.Header) error {
	if !h.tel.Tracing() {
		return h.ingest(ctx, r)
	}
	ctx, span := h.tracer.Start(otel.GetTextMapPropagator().Extract(ctx, propagation.HeaderCarrier(headers)),
		"watch.deliver", trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.Int64("kvmesh.revision", r.GetRevision()), attribute.Int("kvmesh.events", len(r.GetEvents()))))
	defer span.End()
	err := h.ingest(ctx, r)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	return err
}

// ingest hands r to the streams, first repairing any revisions missing before it.
func (h *Hub) ingest(ctx context.Context, r *replicav1.Revision) error {
	cur := h.current()
	if cur == 0 {
		return nil // not started, or gone idle: nothing to hand out to
	}
	if r.GetRevision() <= cur {
		return nil // already handed out (a replay, or repaired from a replica)
	}
	if r.GetRevision() > cur+1 {
		if err := h.repair(ctx, r.GetRevision()-1); err != nil {
			return err
		}
	}
	if r.GetTooLarge() {
		return h.repair(ctx, r.GetRevision())
	}
	hr := newHrev(r)
	if sc := trace.SpanContextFromContext(ctx); sc.IsSampled() {
		hr.span = sc
	}
	h.publish(hr)
	return nil
}

// repair reads the revisions after the hub's up to to from a replica and hands them out.
func (h *Hub) repair(ctx context.Context, to int64) error {
	from := h.current() + 1
	if from > to {
		return nil
	}
	h.log.Info("repairing revisions missing from the stream", "from", from, "to", to)
	err := h.fromReplica(ctx, from, to, func(r *hrev) error {
		if r.GetRevision() == h.current()+1 {
			h.m.repaired.Inc()
			h.publish(r)
		}
		return nil
	})
	var ce *CompactedError
	if errors.As(err, &ce) && ce.Rev > h.current() {
		// Compacted before the hub had them: nobody can be given them any more.
		h.skipTo(ce.Rev)
		return h.repair(ctx, to)
	}
	return err
}

// skipTo moves the hub to rev past revisions it can no longer read (a replica
// compacted them before the stream brought them). Every stream catches up from
// history, which cancels the watchers that needed them as etcd cancels a watcher that
// fell behind a compaction.
func (h *Hub) skipTo(rev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if rev <= h.rev {
		return
	}
	h.log.Warn("revisions were compacted before the stream brought them; watchers that needed them are canceled",
		"from", h.rev+1, "to", rev)
	from := h.rev + 1
	h.rev = rev
	h.compactRev = max(h.compactRev, rev)
	clear(h.ring)
	h.ring, h.ringSize = h.ring[:0], 0
	for _, refs := range h.keys {
		for _, ref := range refs {
			ref.s.behind(from)
		}
	}
	h.ranges.each(func(w *watcher) { w.s.behind(from) })
	h.m.skipped.Add(float64(rev - from + 1))
	h.lastMove.Store(time.Now().UnixNano())
	h.changed.Notify()
}

// publish makes r the hub's revision and queues it to the streams it concerns.
func (h *Hub) publish(r *hrev) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.rev == 0 || r.GetRevision() != h.rev+1 {
		return
	}
	h.rev = r.GetRevision()
	h.compactRev = max(h.compactRev, r.GetCompactRevision())
	h.ring = append(h.ring, r)
	h.ringSize += r.size
	if len(h.ring) > h.cfg.RingRevisions || (h.ringSize > h.cfg.RingBytes && len(h.ring) > 1) {
		// Drop the oldest quarter at once (or down to the byte bound), so that
		// trimming is not a copy per revision.
		drop := max(len(h.ring)-h.cfg.RingRevisions*3/4, 0)
		size := h.ringSize
		for i := range drop {
			size -= h.ring[i].size
		}
		for drop < len(h.ring)-1 && size > h.cfg.RingBytes*3/4 {
			size -= h.ring[drop].size
			drop++
		}
		n := copy(h.ring, h.ring[drop:])
		clear(h.ring[n:])
		h.ring, h.ringSize = h.ring[:n], size
	}
	enqueue := func(w *watcher) { w.s.enqueue(r) }
	for _, ev := range r.Events {
		for _, ref := range h.keys[string(ev.Kv.Key)] {
			ref.s.enqueue(r)
		}
		h.ranges.stab(ev.Kv.Key, enqueue)
	}
	h.m.revisions.Inc()
	h.lastMove.Store(time.Now().UnixNano())
	h.changed.Notify()
}

// ringFrom returns the revisions of the ring in [from, to] when the ring holds from.
func (h *Hub) ringFrom(from, to int64) []*hrev {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ringFromLocked(from, to)
}

func (h *Hub) ringFromLocked(from, to int64) []*hrev {
	if len(h.ring) == 0 {
		return nil
	}
	first := h.ring[0].GetRevision()
	if from < first || from > h.rev {
		return nil
	}
	end := min(to, h.rev) - first + 1
	return h.ring[from-first : end : end]
}

// history calls fn with every revision in [from, to], in order: from memory, from the
// stream, or from a replica, whichever still has it. It fails with a compactedError
// when a replica has compacted from.
func (h *Hub) history(ctx context.Context, from, to int64, fn func(*hrev) error) error {
	for from <= to {
		if rs := h.ringFrom(from, to); len(rs) > 0 {
			for _, r := range rs {
				if err := fn(r); err != nil {
					return err
				}
			}
			from = rs[len(rs)-1].GetRevision() + 1
			continue
		}
		n, err := h.src.read(ctx, h, from, to, fn)
		if err != nil {
			return err
		}
		if n > 0 {
			from += n
			continue
		}
		// Neither memory nor the stream: a replica, up to where memory starts.
		end := to
		h.mu.Lock()
		if len(h.ring) > 0 {
			end = min(end, h.ring[0].GetRevision()-1)
		}
		h.mu.Unlock()
		if end < from {
			end = to
		}
		err = h.fromReplica(ctx, from, end, func(r *hrev) error {
			from = r.GetRevision() + 1
			return fn(r)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// CompactedError is a history read that started below the replicas' compacted
// revision Rev.
type CompactedError struct{ Rev int64 }

func (e *CompactedError) Error() string {
	return fmt.Sprintf("revision compacted at %d", e.Rev)
}

// fromReplica reads [from, to] from the replicas.
func (h *Hub) fromReplica(ctx context.Context, from, to int64, fn func(*hrev) error) error {
	err := h.replicas.Feed(ctx, from, to, func(r *replicav1.Revision) error { return fn(newHrev(r)) })
	var ce *CompactedError
	if errors.As(err, &ce) {
		h.Compacted(ce.Rev)
	}
	return err
}

// staleAfter is how long the hub waits for the stream to bring a revision a replica
// already has before reading it from the replica itself.
const staleAfter = 2 * time.Second

// watchdog keeps watchers served when the stream stops moving (the fanout is down,
// NATS lost its data, the consumer is stuck): when a replica is ahead of the hub and
// the hub has not moved for staleAfter, the missing revisions come from the replica.
func (h *Hub) watchdog(ctx context.Context) {
	t := time.NewTicker(staleAfter / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if time.Since(time.Unix(0, h.lastMove.Load())) < staleAfter || h.isIdle() {
			continue
		}
		pos, err := h.replicas.Position(ctx)
		if err != nil {
			continue
		}
		h.Compacted(pos.GetCompactRevision())
		h.auth.Announce(pos.GetAuthRevision())
		if h.current() == 0 {
			h.start(pos.GetHeader().GetRevision())
			continue
		}
		if to := pos.GetHeader().GetRevision(); to > h.current() {
			if err := h.repair(ctx, to); err != nil {
				h.log.Warn("repair from a replica failed", "err", err)
			}
		}
	}
}

// reach waits, at most limit, until the hub has handed out rev: a watch created after
// a write this gateway acknowledged then catches up to that write from history, as
// etcd's would, rather than taking it later from the queue. The wait is only a
// nicety: without it the watcher gets the same events, in a different grouping.
func (h *Hub) reach(ctx context.Context, rev int64, limit time.Duration) {
	timeout := time.NewTimer(limit)
	defer timeout.Stop()
	for {
		changed := h.changed.C()
		cur := h.current()
		if cur >= rev {
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// waitReady waits until the hub knows where the history is, and the stream's state.
func (h *Hub) waitReady(ctx context.Context) error {
	h.mu.Lock()
	ready := h.ready
	h.mu.Unlock()
	for _, c := range []chan struct{}{ready, h.stateReady} {
		select {
		case <-c:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// streamRef is a stream with n watchers of one key.
type streamRef struct {
	s *wstream
	n int
}

// register adds w to the hub's index and returns the hub's revision at that moment:
// every later revision that concerns w is queued to its stream.
func (h *Hub) register(w *watcher) (rev, compactRev int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if w.end == nil {
		k := w.mapKey()
		refs := h.keys[k]
		i := slices.IndexFunc(refs, func(r streamRef) bool { return r.s == w.s })
		if i < 0 {
			h.keys[k] = append(refs, streamRef{s: w.s, n: 1})
		} else {
			refs[i].n++
		}
	} else {
		h.ranges.add(w)
	}
	h.m.watchers.Inc()
	return h.rev, h.compactRev
}

// unregister removes w from the index.
func (h *Hub) unregister(w *watcher) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if w.end == nil {
		k := w.mapKey()
		refs := h.keys[k]
		if i := slices.IndexFunc(refs, func(r streamRef) bool { return r.s == w.s }); i >= 0 {
			if refs[i].n--; refs[i].n <= 0 {
				refs = slices.Delete(refs, i, i+1)
			}
		}
		if len(refs) == 0 {
			delete(h.keys, k)
		} else {
			h.keys[k] = refs
		}
	} else {
		h.ranges.remove(w)
	}
	h.m.watchers.Dec()
}
