package watch

import (
	"context"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
)

// Source is where a hub takes its revisions from, and the state it decides watch
// creations on (the compacted revision, the auth store's revision): the revision
// stream in NATS JetStream that the fanout publishes (JetStream), or a replica's feed
// read directly (ReplicaFeed), for a gateway that shares a process with its replica.
// Either way the hub never calls a replica to create a watch.
type Source interface {
	// consume hands the hub the revisions after its current one (h.ingest), starting
	// the hub (h.start) when it has no revision yet, until ctx ends or it fails.
	consume(ctx context.Context, h *Hub) error
	// followState hands the hub the state as it changes (h.applyState) until ctx
	// ends.
	followState(ctx context.Context, h *Hub)
	// read calls fn with the revisions [from, to] that the source still keeps, in
	// order from from, and returns how many (0 when it does not keep from).
	read(ctx context.Context, h *Hub, from, to int64, fn func(*hrev) error) (int64, error)
	// canIdle tells whether the hub may stop consuming while nobody watches: the
	// state goes on being followed, and history can be read, without it.
	canIdle() bool
}

// ReplicaFeed is the source of a gateway in the same process as its replica (the
// all-in-one): the hub follows the replica's feed (Replicas.Follow) itself. Nothing is
// published or stored on the way; history the hub's memory does not hold comes from the
// replica.
func ReplicaFeed() Source { return replicaFeed{} }

type replicaFeed struct{}

func (replicaFeed) consume(ctx context.Context, h *Hub) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The feed starts after the hub's revision; a hub that has none starts where the
	// replica is (from 0: the feed's first answer tells where).
	from := int64(0)
	if cur := h.current(); cur > 0 {
		from = cur + 1
	}
	return h.replicas.Follow(ctx, from, func(m *replicav1.FeedResponse) error {
		h.applyState(&replicav1.StreamState{CompactRevision: m.GetCompactRevision(), AuthRevision: m.GetAuthRevision()})
		if h.current() == 0 {
			start := m.GetHeader().GetRevision()
			if rs := m.GetRevisions(); len(rs) > 0 {
				start = rs[0].GetRevision() - 1
			}
			h.start(start)
		}
		for _, r := range m.GetRevisions() {
			if err := h.ingestTraced(ctx, r, nil); err != nil {
				return err
			}
		}
		return nil
	})
}

// followState: the feed's answers carry the state (see consume).
func (replicaFeed) followState(ctx context.Context, h *Hub) {}

// canIdle: the state comes with the feed's answers (see consume).
func (replicaFeed) canIdle() bool { return false }

// read: the feed keeps nothing; the hub reads history from a replica.
func (replicaFeed) read(context.Context, *Hub, int64, int64, func(*hrev) error) (int64, error) {
	return 0, nil
}
