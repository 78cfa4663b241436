package replica

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1/replicav1connect"
	"github.com/kvmesh/kvmesh/libs/inproc"
)

func (m *member) feed() replicav1connect.FeedServiceClient {
	return replicav1connect.NewFeedServiceClient(inproc.NewClient(m.r.Handler()), "http://replica", m.r.tel.InternalClient()...)
}

// readFeed collects revisions from a feed until it has n of them.
func readFeed(t *testing.T, s *connect.ServerStreamForClient[replicav1.FeedResponse], n int) []*replicav1.Revision {
	t.Helper()
	var out []*replicav1.Revision
	for len(out) < n && s.Receive() {
		out = append(out, s.Msg().GetRevisions()...)
	}
	if len(out) < n {
		t.Fatalf("feed ended after %d of %d revisions: %v", len(out), n, s.Err())
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

	live, err := f.feed().Feed(ctx, connect.NewRequest(&replicav1.FeedRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if !live.Receive() || len(live.Msg().GetRevisions()) != 0 || live.Msg().GetHeader().GetMemberId() != f.r.ID() {
		t.Fatalf("first feed response: %v, %v", live.Msg(), live.Err())
	}
	const writes = 200
	for i := range writes {
		var err error
		if i%10 == 9 {
			_, err = lead.kv.DeleteRange(ctx, connect.NewRequest(&pb.DeleteRangeRequest{Key: []byte("k0"), RangeEnd: []byte("k5")}))
		} else {
			_, err = lead.kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte(fmt.Sprintf("k%d", i%7)), Value: []byte(fmt.Sprint(i))}))
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
		hist, err := m.feed().Feed(ctx, connect.NewRequest(&replicav1.FeedRequest{FromRevision: 2, ToRevision: writes + 1}))
		if err != nil {
			t.Fatal(err)
		}
		other := readFeed(t, hist, writes)
		if hist.Receive() {
			t.Fatalf("%s's feed went past to_revision: %v", m.cfg.Name, hist.Msg())
		}
		for i := range got {
			other[i].CompactRevision = got[i].CompactRevision
			if !proto.Equal(got[i], other[i]) {
				t.Fatalf("%s's history differs at revision %d:\n%v\n%v", m.cfg.Name, got[i].GetRevision(), other[i], got[i])
			}
		}
	}

	// Below the compacted revision the feed says so, with etcd's error.
	if _, err := lead.kv.Compact(ctx, connect.NewRequest(&pb.CompactionRequest{Revision: 50})); err != nil {
		t.Fatal(err)
	}
	old, err := lead.feed().Feed(ctx, connect.NewRequest(&replicav1.FeedRequest{FromRevision: 10}))
	if err != nil {
		t.Fatal(err)
	}
	if !old.Receive() || old.Msg().GetCompactRevision() != 50 {
		t.Fatalf("compacted feed's first response: %v, %v", old.Msg(), old.Err())
	}
	var ce *connect.Error
	if old.Receive() || !errors.As(old.Err(), &ce) || ce.Code() != connect.CodeOutOfRange || ce.Message() != "etcdserver: mvcc: required revision has been compacted" {
		t.Fatalf("compacted feed: %v", old.Err())
	}
	pos, err := f.feed().Position(ctx, connect.NewRequest(&replicav1.PositionRequest{}))
	if err != nil || pos.Msg.GetHeader().GetRevision() != writes+1 {
		t.Fatalf("Position: %v, %v", pos, err)
	}
}
