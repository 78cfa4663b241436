// Package watch serves etcd's Watch from the revision stream: the Hub consumes its
// Source once per gateway (the stream the fanout publishes to NATS JetStream, or in the
// all-in-one its replica's feed), keeps the recent revisions in memory, and fans each
// revision out to the client streams that watch one of its keys (stream.go); a watcher
// that starts in the past catches up from memory, from the stream, or from a replica's
// history, and joins the live revisions with no gap and no duplicate. What it needs of the gateway it is given as the small
// interfaces below; it never calls a replica to create a watch.
package watch

import (
	"context"
	"errors"
	"time"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
)

// Config is the hub's configuration (the gateway's KVMESH_GATEWAY_WATCH_… variables).
type Config struct {
	// RingRevisions is how many recent revisions are kept in memory for watchers that
	// start slightly in the past or fell behind; RingBytes bounds their memory.
	RingRevisions int
	RingBytes     int
	// StreamQueue is how many revisions wait for one slow client stream before it is
	// caught up from history instead.
	StreamQueue int
	// ProgressNotifyInterval is how often watchers that asked for progress_notify get
	// one; 0: never.
	ProgressNotifyInterval time.Duration
	// FragmentBytes is the response size above which a watch that asked for fragments
	// gets its events in pieces (etcd: the request limit plus gRPC's allowance).
	FragmentBytes int
	// IdleAfter is how long the hub goes on following its source once no client
	// stream is open; then it stops until one opens (0: it always follows). Only a
	// source that keeps history for it can idle (JetStream; not a replica's feed,
	// which also carries the state watch creations are decided on).
	IdleAfter time.Duration
}

// Validate checks the configuration.
func (c Config) Validate() error {
	switch {
	case c.RingRevisions < 16:
		return errors.New("watch: the ring must hold at least 16 revisions")
	case c.RingBytes < 1<<20:
		return errors.New("watch: the ring must be allowed at least 1 MiB")
	case c.StreamQueue < 1:
		return errors.New("watch: the stream queue must be positive")
	case c.ProgressNotifyInterval < 0:
		return errors.New("watch: the progress interval must not be negative")
	case c.FragmentBytes <= 0:
		return errors.New("watch: the fragment size must be positive")
	case c.IdleAfter < 0:
		return errors.New("watch: the idle time must not be negative")
	}
	return nil
}

// Deps is what the hub needs of the gateway.
type Deps struct {
	Replicas   Replicas
	Authorizer Authorizer
	Cluster    Cluster
}

// Replicas reads from the replicas what the stream cannot give: history older than it
// keeps, revisions missing from it, and where the replicas are.
type Replicas interface {
	// Feed calls fn with every revision in [from, to], in order, from one replica's
	// feed after another until all are read; a *CompactedError when the replicas have
	// compacted from.
	Feed(ctx context.Context, from, to int64, fn func(*replicav1.Revision) error) error
	// Follow calls fn with each answer of one replica's feed from revision from (0:
	// after the replica's current revision), without prev_kv, until ctx ends or the
	// feed fails; the answers carry the compacted and auth revisions (see ReplicaFeed).
	Follow(ctx context.Context, from int64, fn func(*replicav1.FeedResponse) error) error
	// Before reads each key's version at revision rev - 1 (nil where it did not
	// exist): prev_kv for a revision whose feed left it out (prev_kv_omitted).
	Before(ctx context.Context, rev int64, keys [][]byte) ([]*mvccpb.KeyValue, error)
	// Position is a replica's current and compacted revisions, and its auth store's.
	Position(ctx context.Context) (*replicav1.PositionResponse, error)
}

// Authorizer decides watch creations, as etcd's isWatchPermitted, without calling a
// replica.
type Authorizer interface {
	// WatchPermitted answers the request mapped into the namespace of the user it is
	// decided for, and that namespace (stripped from the watch's events); a *Refusal
	// for a watch etcd refuses; any other error fails the stream.
	WatchPermitted(ctx context.Context, cr *pb.WatchCreateRequest) (*pb.WatchCreateRequest, []byte, error)
	// Announce tells the revision of the replicas' auth store, as the stream's state
	// told it.
	Announce(authRevision uint64)
}

// Cluster is what a watch response's header names, and what the gateway has seen.
type Cluster interface {
	ClusterID() uint64
	// LeaderID is the member a response names (etcd: the member that answers).
	LeaderID() uint64
	// Seen is the highest revision of an answer the gateway passed on: a watch
	// created after it starts after it, so that a client sees its own writes.
	Seen() int64
}

// Refusal is a watch create etcd refuses: created and canceled at once, watch id -1,
// with Reason (one of etcd's cancel reasons).
type Refusal struct{ Reason string }

func (r *Refusal) Error() string { return r.Reason }
