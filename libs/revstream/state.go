package revstream

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
)

// The state bucket: beside the stream of revisions, a JetStream key-value bucket
// ("<stream>_STATE") whose key "position" holds the last kvmesh.replica.v1.StreamState
// a fanout read from its feed: the compacted revision and the auth store's revision.
// Neither makes a revision of its own, so neither could travel in the stream; with
// them a gateway decides every watch creation (a compacted start, the permission)
// without asking a replica. Both only grow, and a reader keeps the highest of each it
// has seen, so two fanouts writing the bucket in turn can never take it back.

// stateKey is the bucket's one key.
const stateKey = "position"

// StateBucket names the state bucket of the stream c configures.
func StateBucket(c Config) string { return c.Stream + "_STATE" }

// EnsureState creates the state bucket, or opens it when it exists.
func EnsureState(ctx context.Context, js jetstream.JetStream, c Config) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      StateBucket(c),
		Description: "kvmesh: the compacted revision and the auth store's revision",
		History:     1,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, fmt.Errorf("nats: state bucket %s: %w", StateBucket(c), err)
	}
	return kv, nil
}

// PutState records st in the bucket.
func PutState(ctx context.Context, kv jetstream.KeyValue, st *replicav1.StreamState) error {
	data, err := proto.Marshal(st)
	if err != nil {
		return err
	}
	_, err = kv.Put(ctx, stateKey, data)
	return err
}

// WatchState calls fn with the bucket's state, then with every later one, until ctx
// ends or the watch fails; nil marks the end of what the bucket held when the watch
// began (nothing before it when the bucket is still empty).
func WatchState(ctx context.Context, kv jetstream.KeyValue, fn func(*replicav1.StreamState)) error {
	w, err := kv.Watch(ctx, stateKey)
	if err != nil {
		return err
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("nats: the state watch ended")
			}
			if e == nil {
				fn(nil)
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				continue
			}
			st := &replicav1.StreamState{}
			if err := proto.Unmarshal(e.Value(), st); err != nil {
				return fmt.Errorf("nats: decode the stream state: %w", err)
			}
			fn(st)
		}
	}
}
