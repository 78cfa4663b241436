package watch

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"time"
	"unsafe"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
)

// etcd's watch, served from the hub (hub.go). One wstream is one client Watch stream;
// its goroutine does everything for its watchers in order: creates (with the
// catch-up from history of a watch that starts in the past), cancels, the revisions
// the hub queued, progress. A watcher's events therefore always leave in revision
// order, each revision whole, none twice: a watcher either catches up from history to
// the revision at which it joined the hub's index, or takes revisions from the queue
// after it, never both for one revision.

// etcd's watch errors (go.etcd.io/etcd/server/v3/storage/mvcc), as cancel reasons.
var (
	errEmptyWatcherRange  = errors.New("mvcc: watcher range is empty")
	errWatcherDuplicateID = errors.New("mvcc: duplicate watch ID provided on the WatchStream")
)

// invalidWatchID is etcd's id for "no watch" (clientv3.InvalidWatchID).
const invalidWatchID = -1

type watcher struct {
	s        *wstream
	id       int64
	key, end []byte // end nil: the key alone; empty: every key from key on
	// prefix is the namespace the watch was created in: stripped from its events' keys.
	prefix   []byte
	next     int64 // the first revision this watcher has not been sent
	prevKV   bool
	noPut    bool
	noDelete bool
	fragment bool
	progress bool // progress_notify
	sent     bool // events sent since the last progress tick
	// picked is the last revision deliver chose w for (so it is chosen once).
	picked int64
	// compactRev is the compacted revision when the watch was created: etcd fills
	// prev_kv at sending time, so an event whose previous revision is compacted by
	// then has none.
	compactRev int64
	// sameKey is the next of the stream's watchers of the same key.
	sameKey *watcher
}

// mapKey is w's key as a string that shares its bytes, for the indexes' maps: 100,000
// watchers would otherwise each copy their key twice. w.key is never modified.
func (w *watcher) mapKey() string { return unsafe.String(unsafe.SliceData(w.key), len(w.key)) }

// matches tells whether key is in w's range.
func (w *watcher) matches(key []byte) bool {
	if w.end == nil {
		return bytes.Equal(key, w.key)
	}
	return bytes.Compare(key, w.key) >= 0 && (len(w.end) == 0 || bytes.Compare(key, w.end) < 0)
}

// wstream is one client Watch stream.
type wstream struct {
	h    *Hub
	ctx  context.Context
	send func(*pb.WatchResponse) error
	// sendRaw writes responses encoded by wire (nil: every response goes to send).
	sendRaw func(EncodedMsg) error
	wire    wireCache

	// Filled by the hub (under qmu); drained by the stream's goroutine.
	qmu        sync.Mutex
	queue      []*hrev
	lastQueued int64
	overflow   int64 // first revision not queued because the queue was full; 0: none
	notify     chan struct{}

	// The stream goroutine's own.
	watchers map[int64]*watcher
	keyW     map[string]*watcher // the stream's watchers of a key, linked by sameKey
	rangeW   intervals
	nextID   int64
	progress bool // a WatchProgressRequest awaits its answer
	// refusedAt is when the stream last refused a create (see refusalGrace).
	refusedAt time.Time
}

// enqueue is called by the hub, under its lock, for each revision that concerns the
// stream. It never blocks.
func (s *wstream) enqueue(r *hrev) {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	if s.lastQueued == r.GetRevision() || s.overflow != 0 {
		return
	}
	s.lastQueued = r.GetRevision()
	if len(s.queue) >= s.h.cfg.StreamQueue {
		s.overflow = r.GetRevision()
		s.h.m.overflows.Inc()
	} else {
		s.queue = append(s.queue, r)
	}
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// behind tells the stream, under the hub's lock, that the hub moved past revisions
// from on without queueing them: the stream catches up from history (see drain), as
// after an overflow.
func (s *wstream) behind(from int64) {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	if s.overflow == 0 || from < s.overflow {
		s.overflow = from
	}
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Serve runs one client Watch stream: recv reads the client's requests, send writes
// responses (only ever from one goroutine). sendRaw, when not nil, writes a response
// already in wire form (see Codec: the gRPC face).
func (h *Hub) Serve(ctx context.Context, recv func() (*pb.WatchRequest, error), send func(*pb.WatchResponse) error, sendRaw func(EncodedMsg) error) error {
	defer h.opened()()
	if err := h.waitReady(ctx); err != nil {
		return err
	}
	s := &wstream{
		h: h, ctx: ctx, send: send, sendRaw: sendRaw,
		notify:   make(chan struct{}, 1),
		watchers: make(map[int64]*watcher),
		keyW:     make(map[string]*watcher),
	}
	h.m.streams.Inc()
	defer h.m.streams.Dec()
	defer s.settleRefusal() // last, once the watchers are gone
	defer func() {
		for _, w := range s.watchers {
			h.unregister(w)
		}
	}()

	reqs := make(chan *pb.WatchRequest, 16)
	recvErr := make(chan error, 1)
	go func() {
		defer close(reqs)
		for {
			req, err := recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()

	var tick <-chan time.Time
	if iv := h.cfg.ProgressNotifyInterval; iv > 0 {
		t := time.NewTicker(iv)
		defer t.Stop()
		tick = t.C
	}
	for {
		var hubChanged <-chan struct{}
		if s.progress {
			// Taken before the look, so that a revision after it wakes the wait.
			changed := h.changed.C()
			if err := s.answerProgress(); err != nil {
				return err
			}
			if s.progress {
				hubChanged = changed
			}
		}
		var err error
		select {
		case req, ok := <-reqs:
			if !ok {
				reqs = nil
				select {
				case err := <-recvErr:
					// A client that closed its side still gets its events, as
					// etcd's watch server keeps sending until the stream ends.
					if !errors.Is(err, io.EOF) && !errors.Is(err, context.Canceled) {
						return err
					}
				default:
				}
				continue
			}
			err = s.handle(req)
		case <-s.notify:
			err = s.drain()
		case <-tick:
			err = s.progressTick()
		case <-hubChanged:
		case <-ctx.Done():
			return ctx.Err()
		}
		if err != nil {
			return err
		}
	}
}

func (s *wstream) header(rev int64) *pb.ResponseHeader {
	return &pb.ResponseHeader{ClusterId: s.h.cluster.ClusterID(), MemberId: s.h.cluster.LeaderID(), Revision: rev, RaftTerm: 0}
}

func (s *wstream) handle(req *pb.WatchRequest) error {
	switch r := req.GetRequestUnion().(type) {
	case *pb.WatchRequest_CreateRequest:
		return s.create(r.CreateRequest)
	case *pb.WatchRequest_CancelRequest:
		w := s.watchers[r.CancelRequest.GetWatchId()]
		if w == nil {
			return nil // etcd answers nothing for an unknown watch
		}
		s.remove(w)
		return s.send(&pb.WatchResponse{Header: s.header(s.latest()), WatchId: w.id, Canceled: true})
	case *pb.WatchRequest_ProgressRequest:
		s.progress = true
	}
	return nil
}

// create serves a create request as etcd's watch server does: a refusal (created and
// canceled, watch id -1) only for etcd's reasons, otherwise Created at once, before
// anything that waits or may fail; then, for a watch from the past, its history, or
// its cancellation when that history is compacted.
func (s *wstream) create(cr *pb.WatchCreateRequest) error {
	// Permission first, as etcd's watch server; the keys come back in the namespace.
	cr, prefix, err := s.h.auth.WatchPermitted(s.ctx, cr)
	var rf *Refusal
	if errors.As(err, &rf) {
		return s.refuse(rf.Reason)
	}
	if err != nil {
		return err
	}
	key, end := cr.GetKey(), cr.GetRangeEnd()
	if len(key) == 0 {
		key = []byte{0} // etcd: "\x00" is the smallest key
	}
	switch {
	case len(end) == 0:
		end = nil
	case len(end) == 1 && end[0] == 0:
		end = []byte{}
	}
	if len(end) != 0 && bytes.Compare(key, end) >= 0 {
		return s.refuse(errEmptyWatcherRange.Error())
	}
	id := cr.GetWatchId()
	if id == 0 {
		for s.watchers[s.nextID] != nil {
			s.nextID++
		}
		id = s.nextID
		s.nextID++
	} else if s.watchers[id] != nil {
		return s.refuse(errWatcherDuplicateID.Error())
	}
	w := &watcher{s: s, id: id, key: key, end: end, prefix: prefix, prevKV: cr.GetPrevKv(), fragment: cr.GetFragment(), progress: cr.GetProgressNotify()}
	for _, f := range cr.GetFilters() {
		switch f {
		case pb.WatchCreateRequest_NOPUT:
			w.noPut = true
		case pb.WatchCreateRequest_NODELETE:
			w.noDelete = true
		}
	}
	start := cr.GetStartRevision()
	if start == 0 {
		rev, compactRev := s.h.register(w)
		w.compactRev = compactRev
		s.add(w)
		headerRev := max(rev, s.h.cluster.Seen())
		w.next = headerRev + 1
		return s.send(&pb.WatchResponse{Header: s.header(headerRev), WatchId: id, Created: true})
	}
	if err := s.send(&pb.WatchResponse{Header: s.header(s.latest()), WatchId: id, Created: true}); err != nil {
		return err
	}

	// The catch-up holds the last write this gateway acknowledged, as etcd's would.
	s.h.reach(s.ctx, s.h.cluster.Seen(), time.Second)
	if err := s.ctx.Err(); err != nil {
		return err
	}
	// The compacted revision the stream's state told (or a compaction this gateway
	// passed on): a watch must not start below it.
	rev, compactRev := s.h.register(w)
	w.compactRev = compactRev
	if start < compactRev {
		s.h.unregister(w)
		return s.send(compactedResponse(s, id, compactRev))
	}
	s.add(w)
	w.next = start
	if start > rev {
		return nil
	}
	// Catch up [start, rev] from history; the queue has what came after rev. As in
	// etcd, the events of many revisions go together, under the current revision.
	var batch []*mvccpb.Event
	revs := 0
	err = s.h.history(s.ctx, start, rev, func(r *hrev) error {
		evs := w.take(r)
		if len(evs) == 0 {
			return nil
		}
		batch = append(batch, evs...)
		if revs++; revs >= catchUpBatchRevisions {
			err := s.sendEvents(w, rev, batch)
			batch, revs = nil, 0
			return err
		}
		return nil
	})
	if err == nil {
		err = s.sendEvents(w, rev, batch)
	}
	var ce *CompactedError
	if errors.As(err, &ce) {
		s.remove(w)
		return s.send(compactedResponse(s, w.id, ce.Rev))
	}
	if err != nil {
		return err
	}
	w.next = max(w.next, rev+1)
	return nil
}

// refusalGrace is how long a stream that refused a create lives on at least.
// clientv3 (3.4 to 3.7) loses a refusal when the stream's end reaches it within about
// a tenth of a millisecond after: the substream it failed waits forever to report
// its closing, and the watch (and Client.Close) hang. etcd makes that rare only by
// chance; kvmesh makes it impossible.
const refusalGrace = 250 * time.Millisecond

// settleRefusal holds the end of the stream until refusalGrace has passed since its
// last refusal.
func (s *wstream) settleRefusal() {
	if s.refusedAt.IsZero() {
		return
	}
	if d := refusalGrace - time.Since(s.refusedAt); d > 0 {
		time.Sleep(d)
	}
}

// refuse answers a create that etcd refuses, for etcd's reason.
func (s *wstream) refuse(reason string) error {
	s.refusedAt = time.Now()
	return s.send(&pb.WatchResponse{Header: s.header(s.latest()), WatchId: invalidWatchID, Created: true, Canceled: true, CancelReason: reason})
}

// latest is the newest revision this gateway knows of: the stream's, or a later one a
// client was answered with (its revision stream may lag a write's answer), as etcd
// heads such answers with the store's current revision.
func (s *wstream) latest() int64 { return max(s.h.current(), s.h.cluster.Seen()) }

// compactedResponse is etcd's answer to a watcher whose history is compacted: no
// revision in the header, no cancel reason.
func compactedResponse(s *wstream, id, compactRev int64) *pb.WatchResponse {
	return &pb.WatchResponse{Header: s.header(0), WatchId: id, CompactRevision: compactRev, Canceled: true}
}

func (s *wstream) add(w *watcher) {
	s.watchers[w.id] = w
	if w.end == nil {
		k := w.mapKey()
		w.sameKey = s.keyW[k]
		s.keyW[k] = w
	} else {
		s.rangeW.add(w)
	}
}

func (s *wstream) remove(w *watcher) {
	s.h.unregister(w)
	delete(s.watchers, w.id)
	if w.end == nil {
		k := w.mapKey()
		for p := s.keyW[k]; p != nil; p = p.sameKey {
			if p == w {
				s.keyW[k] = w.sameKey
				break
			}
			if p.sameKey == w {
				p.sameKey = w.sameKey
				break
			}
		}
		if s.keyW[k] == nil {
			delete(s.keyW, k)
		}
		return
	}
	s.rangeW.remove(w)
}

// drain delivers what the hub queued and, after an overflow, catches the stream up from
// history until it can take the hub's revisions again.
func (s *wstream) drain() error {
	s.qmu.Lock()
	q, of := s.queue, s.overflow
	s.queue = nil
	s.qmu.Unlock()
	for _, r := range q {
		if err := s.deliver(r); err != nil {
			return err
		}
	}
	if of == 0 {
		return nil
	}
	for from := of; ; {
		s.h.mu.Lock()
		s.qmu.Lock()
		if from > s.h.rev {
			s.overflow = 0
			s.lastQueued = s.h.rev
			s.qmu.Unlock()
			s.h.mu.Unlock()
			return nil
		}
		to := s.h.rev
		batch := s.h.ringFromLocked(from, to)
		s.qmu.Unlock()
		s.h.mu.Unlock()
		if len(batch) > 0 {
			for _, r := range batch {
				if err := s.deliver(r); err != nil {
					return err
				}
			}
			from = batch[len(batch)-1].GetRevision() + 1
			continue
		}
		err := s.h.history(s.ctx, from, to, func(r *hrev) error {
			from = r.GetRevision() + 1
			return s.deliver(r)
		})
		var ce *CompactedError
		if errors.As(err, &ce) {
			// History the stream's watchers need is gone: cancel them as etcd cancels
			// a watcher that fell behind a compaction.
			for _, w := range s.watchers {
				if w.next < ce.Rev {
					s.remove(w)
					if err := s.send(compactedResponse(s, w.id, ce.Rev)); err != nil {
						return err
					}
				}
			}
			from = ce.Rev
			continue
		}
		if err != nil {
			return err
		}
	}
}

// deliver sends r's events to every watcher of the stream they concern.
func (s *wstream) deliver(r *hrev) error {
	if r.span.IsSampled() {
		_, span := s.h.tracer.Start(trace.ContextWithSpanContext(s.ctx, r.span), "watch.send",
			trace.WithAttributes(attribute.Int64("kvmesh.revision", r.GetRevision()), attribute.Int("kvmesh.watchers", len(s.watchers))))
		defer span.End()
	}
	if len(s.watchers) == 1 {
		for _, w := range s.watchers {
			return s.deliverTo(w, r)
		}
	}
	var targets []*watcher
	rev := r.GetRevision()
	pick := func(w *watcher) {
		if w.picked != rev {
			w.picked = rev
			targets = append(targets, w)
		}
	}
	for _, ev := range r.Events {
		for w := s.keyW[string(ev.Kv.Key)]; w != nil; w = w.sameKey {
			pick(w)
		}
		s.rangeW.stab(ev.Kv.Key, pick)
	}
	for _, w := range targets {
		if err := s.deliverTo(w, r); err != nil {
			return err
		}
	}
	return nil
}

// deliverTo sends w the events of r it watches, unless w is past r.
func (s *wstream) deliverTo(w *watcher, r *hrev) error {
	return s.sendEvents(w, r.GetRevision(), w.take(r))
}

// take returns the events of r that w watches (none when w is past r) and moves w
// past r.
func (w *watcher) take(r *hrev) []*mvccpb.Event {
	if r.GetRevision() < w.next {
		return nil
	}
	w.next = r.GetRevision() + 1
	evs := r.Events
	if !w.prevKV || r.GetRevision()-1 < w.compactRev {
		evs = r.eventsWithoutPrev()
	} else if r.GetPrevKvOmitted() {
		evs = r.eventsWithPrev(w.s.h)
	}
	// Compacting at C removes the tombstones written at C, so etcd never shows a
	// watcher a deletion at the compacted revision.
	noDelete := w.noDelete || r.GetRevision() <= w.compactRev
	keep := func(ev *mvccpb.Event) bool {
		return w.matches(ev.Kv.Key) && !(w.noPut && ev.Type == mvccpb.Event_PUT) && !(noDelete && ev.Type == mvccpb.Event_DELETE)
	}
	all := true
	for _, ev := range evs {
		if !keep(ev) {
			all = false
			break
		}
	}
	if all {
		return evs // shared, never modified
	}
	var out []*mvccpb.Event
	for _, ev := range evs {
		if keep(ev) {
			out = append(out, ev)
		}
	}
	return out
}

// sendEvents sends w one response with evs (nothing when there are none).
func (s *wstream) sendEvents(w *watcher, headerRev int64, evs []*mvccpb.Event) error {
	if len(evs) == 0 {
		return nil
	}
	w.sent = true
	s.h.m.events.Add(float64(len(evs)))
	if s.sendRaw != nil && !w.fragment {
		hdr := s.wire.header(s.h.cluster.ClusterID(), s.h.cluster.LeaderID(), headerRev)
		return s.sendRaw(s.wire.encode(hdr, w.id, w.prefix, evs))
	}
	// Out of a namespaced watcher's namespace (the wire encodings above are too).
	evs = namespace.EventsOut(w.prefix, evs)
	resp := &pb.WatchResponse{Header: s.header(headerRev), WatchId: w.id, Events: evs}
	if !w.fragment {
		return s.send(resp)
	}
	return s.sendFragments(resp)
}

// catchUpBatchRevisions is how many revisions' events one catch-up response carries
// at most (etcd's watchBatchMaxRevs).
const catchUpBatchRevisions = 1000

// sendFragments splits a response larger than etcd's fragment size (the request
// limit plus gRPC's overhead allowance) into pieces, each but the last marked
// fragment, exactly as etcd's watch server does for watches that asked.
func (s *wstream) sendFragments(resp *pb.WatchResponse) error {
	limit := s.h.cfg.FragmentBytes
	if proto.Size(resp) < limit || len(resp.Events) < 2 {
		return s.send(resp)
	}
	for idx := 0; ; {
		cur := &pb.WatchResponse{Header: resp.Header, WatchId: resp.WatchId, Fragment: true}
		for _, ev := range resp.Events[idx:] {
			cur.Events = append(cur.Events, ev)
			if len(cur.Events) > 1 && proto.Size(cur) >= limit {
				cur.Events = cur.Events[:len(cur.Events)-1]
				break
			}
			idx++
		}
		if idx == len(resp.Events) {
			cur.Fragment = false
		}
		if err := s.send(cur); err != nil {
			return err
		}
		if !cur.Fragment {
			return nil
		}
	}
}

// syncedRev returns the hub's revision and whether the stream has delivered
// everything the hub has that concerns it.
func (s *wstream) syncedRev() (int64, bool) {
	s.h.mu.Lock()
	defer s.h.mu.Unlock()
	s.qmu.Lock()
	defer s.qmu.Unlock()
	return s.h.rev, len(s.queue) == 0 && s.overflow == 0
}

// answerProgress answers a pending WatchProgressRequest once the stream is synced and
// the hub has reached every watcher's start: the revision reported is then one below
// which every event has been sent (etcd's RequestProgressAll).
func (s *wstream) answerProgress() error {
	rev, ok := s.syncedRev()
	if !ok {
		return nil
	}
	for _, w := range s.watchers {
		if w.next-1 > rev {
			return nil
		}
	}
	s.progress = false
	return s.send(&pb.WatchResponse{Header: s.header(rev), WatchId: invalidWatchID})
}

// progressTick sends the periodic progress notification (progress_notify) to each
// watcher that asked for it and was sent no events since the last tick.
func (s *wstream) progressTick() error {
	rev, ok := s.syncedRev()
	if !ok {
		return nil
	}
	for _, w := range s.watchers {
		if !w.progress {
			continue
		}
		if w.sent {
			w.sent = false
			continue
		}
		if err := s.send(&pb.WatchResponse{Header: s.header(max(rev, w.next-1)), WatchId: w.id}); err != nil {
			return err
		}
	}
	return nil
}
