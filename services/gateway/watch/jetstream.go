package watch

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kvmesh/kvmesh/libs/revstream"
)

// JetStream is the source of a gateway of the mesh: the revision stream the fanout
// publishes to NATS JetStream (libs/revstream), consumed once per gateway, with the
// stream's state bucket for compactions and auth changes. A watcher that starts in the
// past and is older than the hub's memory catches up from the stream while it keeps
// the revisions.
func JetStream(nc *nats.Conn, cfg revstream.Config) (Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	return &jetStream{js: js, cfg: cfg}, nil
}

type jetStream struct {
	js  jetstream.JetStream
	cfg revstream.Config

	offset   atomic.Int64 // stream sequence = revision - offset
	offsetOK atomic.Bool
	seeded   atomic.Bool // the ring was seeded once (at the gateway's start, not after idling)
}

// consume reads the stream from just after the hub's revision.
func (s *jetStream) consume(ctx context.Context, h *Hub) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.js.Stream(ctx, s.cfg.Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		h.log.Info("waiting for the fanout to create the revision stream", "stream", s.cfg.Stream)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("stream %s: %w", s.cfg.Stream, err)
	}
	tail, err := revstream.LastOf(ctx, st)
	if err != nil {
		return err
	}
	if tail.Rev > 0 {
		s.offset.Store(tail.Offset())
		s.offsetOK.Store(true)
	}
	if h.current() == 0 {
		start := tail.Rev
		if start == 0 {
			pos, err := h.replicas.Position(ctx)
			if err != nil {
				return err
			}
			start = pos.GetHeader().GetRevision()
		} else if !s.seeded.Swap(true) {
			s.seedRing(ctx, h, tail)
		}
		h.start(start)
	}
	// Start at the sequence just after the hub's revision when the stream still has
	// it; otherwise at the stream's end (what lies between is repaired from a replica).
	startSeq := tail.Seq + 1
	if cur := h.current(); s.offsetOK.Load() {
		if seq := cur + 1 - s.offset.Load(); seq >= 1 && uint64(seq) <= tail.Seq+1 {
			startSeq = uint64(seq)
		}
	}
	c, err := s.js.OrderedConsumer(ctx, s.cfg.Stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{s.cfg.Subject},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    startSeq,
	})
	if err != nil {
		return err
	}
	it, err := c.Messages()
	if err != nil {
		return err
	}
	defer it.Stop()
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			return err
		}
		r, err := revstream.Decode(msg.Headers(), msg.Data())
		if err != nil {
			h.log.Error("undecodable message in the revision stream", "err", err)
			continue
		}
		if md, err := msg.Metadata(); err == nil {
			s.offset.Store(r.GetRevision() - int64(md.Sequence.Stream))
			s.offsetOK.Store(true)
		}
		if err := h.ingestTraced(ctx, r, msg.Headers()); err != nil {
			return err
		}
	}
}

// seedTimeout bounds reading the stream's newest revisions into the ring at start.
const seedTimeout = 10 * time.Second

// seedRing fills the ring of a hub that has not started with the stream's newest
// revisions, up to tail (as many as the ring keeps), so that a gateway started after
// them serves watches from the recent past from memory, as it would had it run all
// along. Revisions it cannot read (a failure, a too-large marker) are left out: the
// ring then starts after them, and older watches read the stream or a replica.
func (s *jetStream) seedRing(ctx context.Context, h *Hub, tail revstream.Tail) {
	ctx, cancel := context.WithTimeout(ctx, seedTimeout)
	defer cancel()
	first := uint64(1)
	if n := uint64(h.cfg.RingRevisions); tail.Seq > n {
		first = tail.Seq - n + 1
	}
	c, err := s.js.OrderedConsumer(ctx, s.cfg.Stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{s.cfg.Subject},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    first,
	})
	if err != nil {
		return
	}
	it, err := c.Messages()
	if err != nil {
		return
	}
	defer it.Stop()
	var ring []*hrev
	size := 0
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			h.log.Warn("reading the stream's recent revisions at start", "err", err)
			return
		}
		md, err := msg.Metadata()
		if err != nil || md.Sequence.Stream > tail.Seq {
			break
		}
		r, err := revstream.Decode(msg.Headers(), msg.Data())
		switch {
		case err != nil || r.GetTooLarge() || (len(ring) > 0 && r.GetRevision() != ring[len(ring)-1].GetRevision()+1):
			ring, size = ring[:0], 0 // the ring holds consecutive revisions only
		default:
			hr := newHrev(r)
			ring = append(ring, hr)
			size += hr.size
			for size > h.cfg.RingBytes && len(ring) > 1 {
				size -= ring[0].size
				ring = ring[1:]
			}
		}
		if md.Sequence.Stream == tail.Seq {
			break
		}
	}
	if len(ring) == 0 || ring[len(ring)-1].GetRevision() != tail.Rev {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.rev != 0 {
		return
	}
	h.ring, h.ringSize = ring, size
	for _, r := range ring {
		h.compactRev = max(h.compactRev, r.GetCompactRevision())
	}
	h.log.Info("seeded the watch history from the stream", "from", ring[0].GetRevision(), "to", tail.Rev)
}

// canIdle: the state bucket is followed on its own, and the stream keeps history.
func (s *jetStream) canIdle() bool { return true }

// followState follows the stream's state bucket (libs/revstream): the compacted
// revision and the auth store's revision, which make no revision of their own. With
// them, and the revisions, the gateway decides every watch creation alone.
func (s *jetStream) followState(ctx context.Context, h *Hub) {
	for ctx.Err() == nil {
		kv, err := revstream.EnsureState(ctx, s.js, s.cfg)
		if err == nil {
			err = revstream.WatchState(ctx, kv, h.applyState)
		}
		if ctx.Err() != nil {
			return
		}
		h.log.Warn("stream state watch stopped; restarting", "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// read reads revisions from the JetStream stream, from from on, up to to, and
// returns how many it delivered (0 when the stream does not have from).
func (s *jetStream) read(ctx context.Context, h *Hub, from, to int64, fn func(*hrev) error) (int64, error) {
	if !s.offsetOK.Load() {
		return 0, nil
	}
	seq := from - s.offset.Load()
	if seq < 1 {
		return 0, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c, err := s.js.OrderedConsumer(ctx, s.cfg.Stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{s.cfg.Subject},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    uint64(seq),
	})
	if err != nil {
		return 0, nil // the stream is not there now: a replica will do
	}
	info, err := c.Info(ctx)
	if err != nil || info.NumPending == 0 {
		return 0, nil
	}
	it, err := c.Messages()
	if err != nil {
		return 0, nil
	}
	defer it.Stop()
	var n int64
	for next := from; next <= to; {
		// (NextMaxWait cannot go with NextContext: the wait is the context's.)
		nctx, ncancel := context.WithTimeout(ctx, 2*time.Second)
		msg, err := it.Next(jetstream.NextContext(nctx))
		ncancel()
		if err != nil {
			return n, nil // stop here; the caller goes on from elsewhere
		}
		r, err := revstream.Decode(msg.Headers(), msg.Data())
		if err != nil || r.GetRevision() != next {
			return n, nil // not the revision expected at this sequence
		}
		hr := newHrev(r)
		if r.GetTooLarge() {
			var got *hrev
			if err := h.fromReplica(ctx, next, next, func(x *hrev) error { got = x; return nil }); err != nil {
				return n, err
			}
			hr = got
		}
		if err := fn(hr); err != nil {
			return n, err
		}
		n++
		next++
	}
	return n, nil
}
