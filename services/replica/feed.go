package replica

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
)

// feedBatchBytes bounds the events of one FeedResponse (a single revision may exceed
// it: revisions are never split).
const feedBatchBytes = 1 << 20

// feedService streams the committed history (see FeedService in feed.proto). Every
// member serves it, learners too: what a member has applied is committed, so a feed
// never shows a revision that could be rolled back. The fanout prefers followers, so
// that the leader does not pay for it.
type feedService struct {
	replicav1.UnimplementedFeedServiceServer
	r *Replica
}

// Feed serves a feed over grpc-go.
func (s *feedService) Feed(req *replicav1.FeedRequest, stream replicav1.FeedService_FeedServer) error {
	return s.serveFeed(stream.Context(), req, stream.Send)
}

// serveFeed sends the history from req's revision to send.
func (s *feedService) serveFeed(ctx context.Context, req *replicav1.FeedRequest, send func(*replicav1.FeedResponse) error) error {
	if err := s.r.serving(true); err != nil {
		return err
	}
	from, to := req.GetFromRevision(), req.GetToRevision()
	if from < 0 || to < 0 {
		return connect.NewError(connect.CodeInvalidArgument, errors.New("kvmesh: negative feed revision"))
	}
	first := true
	var toldCompact int64
	var toldAuth uint64
	for {
		st := s.r.acquire()
		changed := st.kv.Changed()
		authChanged := s.r.auth.changed.C()
		authRev := s.r.auth.revision()
		if from == 0 {
			from = st.kv.Rev() + 1
		}
		chs, pos, err := st.kv.Changes(ctx, from, feedBatchBytes, !req.GetOmitPrevKv())
		st.release()
		if err != nil && !errors.Is(err, etcderr.ErrCompacted) {
			return err
		}
		if to != 0 {
			chs = clipChanges(chs, to)
		}
		// Revisions, and without them a compaction or an auth change: the readers
		// learn those from the feed too (see StreamState).
		if first || len(chs) > 0 || pos.CompactRev != toldCompact || authRev != toldAuth {
			first = false
			toldCompact, toldAuth = pos.CompactRev, authRev
			resp := &replicav1.FeedResponse{
				Header:          s.r.header(nil),
				CompactRevision: pos.CompactRev,
				Revisions:       make([]*replicav1.Revision, len(chs)),
				AuthRevision:    authRev,
			}
			resp.Header.Revision = pos.Rev
			for i, c := range chs {
				resp.Revisions[i] = &replicav1.Revision{Revision: c.Rev, Events: c.Events, CompactRevision: pos.CompactRev, PrevKvOmitted: req.GetOmitPrevKv()}
			}
			if err := send(resp); err != nil {
				return err
			}
			s.r.m.feedRevisions.Add(float64(len(chs)))
		}
		if err != nil { // compacted, after telling the reader where compaction is
			return err
		}
		if len(chs) > 0 {
			from = chs[len(chs)-1].Rev + 1
			if to != 0 && from > to {
				return nil
			}
			continue
		}
		select {
		case <-changed:
		case <-authChanged:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.r.quitc:
			return etcderr.ErrStopped
		case <-s.r.removedc:
			return etcderr.ErrStopped
		}
	}
}

// clipChanges drops the changes after revision to.
func clipChanges(chs []mvcc.Change, to int64) []mvcc.Change {
	for i, c := range chs {
		if c.Rev > to {
			return chs[:i]
		}
	}
	return chs
}

func (s *feedService) Position(ctx context.Context, req *replicav1.PositionRequest) (*replicav1.PositionResponse, error) {
	if err := s.r.serving(true); err != nil {
		return nil, err
	}
	st := s.r.acquire()
	pos := st.kv.Position()
	st.release()
	h := s.r.header(nil)
	h.Revision = pos.Rev
	return &replicav1.PositionResponse{Header: h, CompactRevision: pos.CompactRev, AuthRevision: s.r.auth.revision()}, nil
}
