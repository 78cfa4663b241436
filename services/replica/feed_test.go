package replica

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

// feed is a feed read into a channel: each answer, then the feed's end (nil when it
// ended at its to_revision).
type feed struct {
	answers chan *replicav1.FeedResponse
	end     chan error
}

func (m *member) feed(ctx context.Context, req *replicav1.FeedRequest) *feed {
	f := &feed{answers: make(chan *replicav1.FeedResponse, 1024), end: make(chan error, 1)}
	go func() {
		f.end <- m.kv.Feed(ctx, req, func(r *replicav1.FeedResponse) error {
			f.answers <- r
			return nil
		})
	}()
	return f
}

// next is the feed's next answer; nil and the end when it ended.
func (f *feed) next(t *testing.T) (*replicav1.FeedResponse, error) {
	t.Helper()
	select {
	case r := <-f.answers:
		return r, nil
	case err := <-f.end:
		select {
		case r := <-f.answers:
			f.end <- err
			return r, nil
		default:
		}
		f.end <- err
		return nil, err
	case <-time.After(30 * time.Second):
		t.Fatal("feed: no answer in 30 s")
		return nil, nil
	}
}

// readFeed collects revisions from a feed until it has n of them.
func readFeed(t *testing.T, f *feed, n int) []*replicav1.Revision {
	t.Helper()
	var out []*replicav1.Revision
	for len(out) < n {
		r, err := f.next(t)
		if r == nil {
			t.Fatalf("feed ended after %d of %d revisions: %v", len(out), n, err)
		}
		out = append(out, r.GetRevisions()...)
	}
	return out
}

// Every member's feed, live from a follower and from history on another, shows the
// same revisions in order without gaps.
func TestFeedIsTheSameGaplessHistoryOnEveryMember(t *testing.T) {
	members := startCluster(t, 3)
	lead := leader(t, members)
	f := follower(members, lead)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	live := f.feed(ctx, &replicav1.FeedRequest{})
	if first, err := live.next(t); first == nil || len(first.GetRevisions()) != 0 || first.GetHeader().GetMemberId() != f.r.ID() {
		t.Fatalf("first feed response: %v, %v", first, err)
	}
	const writes = 200
	for i := range writes {
		var err error
		if i%10 == 9 {
			_, err = lead.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte("k0"), RangeEnd: []byte("k5")})
		} else {
			_, err = lead.kv.Put(ctx, &pb.PutRequest{Key: []byte(fmt.Sprintf("k%d", i%7)), Value: []byte(fmt.Sprint(i))})
		}
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	got := readFeed(t, live, writes)
	for i, r := range got {
		if r.GetRevision() != int64(i)+2 || len(r.GetEvents()) == 0 {
			t.Fatalf("live feed revision %d: %d with %d events", i, r.GetRevision(), len(r.GetEvents()))
		}
	}
	for _, m := range members {
		if m == f {
			continue
		}
		hist := m.feed(ctx, &replicav1.FeedRequest{FromRevision: 2, ToRevision: writes + 1})
		other := readFeed(t, hist, writes)
		if more, err := hist.next(t); more != nil || err != nil {
			t.Fatalf("%s's feed went past to_revision: %v, %v", m.cfg.Name, more, err)
		}
		for i := range got {
			other[i].CompactRevision = got[i].CompactRevision
			if !proto.Equal(got[i], other[i]) {
				t.Fatalf("%s's history differs at revision %d:\n%v\n%v", m.cfg.Name, got[i].GetRevision(), other[i], got[i])
			}
		}
	}

	// Below the compacted revision the feed says so, with etcd's error.
	if _, err := lead.kv.Compact(ctx, &pb.CompactionRequest{Revision: 50}); err != nil {
		t.Fatal(err)
	}
	old := lead.feed(ctx, &replicav1.FeedRequest{FromRevision: 10})
	if first, err := old.next(t); first == nil || first.GetCompactRevision() != 50 {
		t.Fatalf("compacted feed's first response: %v, %v", first, err)
	}
	// Over the wire, etcd's error comes back as itself.
	if more, err := old.next(t); more != nil || !errors.Is(err, etcderr.ErrCompacted) {
		t.Fatalf("compacted feed: %v, %v", more, err)
	}
	pos, err := f.kv.Position(ctx, &replicav1.PositionRequest{})
	if err != nil || pos.GetHeader().GetRevision() != writes+1 {
		t.Fatalf("Position: %v, %v", pos, err)
	}
}
