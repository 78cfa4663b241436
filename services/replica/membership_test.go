package replica

import (
	"context"
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/etcderr"
)

func requireEtcdErr(t *testing.T, err, want error) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want %v", want)
	}
	gc, gm := etcderr.CodeMessage(err)
	wc, wm := etcderr.CodeMessage(want)
	if gc != wc || gm != wm {
		t.Fatalf("error %v %q; want %v %q", gc, gm, wc, wm)
	}
}

// TestLearnerJoinsBySnapshotIsPromotedAndAnotherMemberIsRemoved walks the membership
// life cycle through the ClusterService of followers (forwarded to the leader): a
// learner is added after the log was truncated, catches up by snapshot, is promoted;
// an original member is removed and stops; etcd's errors for the invalid requests.
func TestLearnerJoinsBySnapshotIsPromotedAndAnotherMemberIsRemoved(t *testing.T) {
	ctx := context.Background()
	members := startClusterWith(t, 3, func(c *Config) { c.SnapshotCount = 50 })
	lead := leader(t, members)
	f := follower(members, lead)
	for i := range 200 {
		if _, err := f.kv.Put(ctx, &pb.PutRequest{Key: []byte(fmt.Sprintf("k%03d", i)), Value: []byte("v")}); err != nil {
			t.Fatal(err)
		}
	}
	if first, _ := lead.r.raftLog.FirstIndex(); first < 50 {
		t.Fatalf("the leader's log was not truncated (first index %d)", first)
	}

	// Invalid requests first.
	_, err := f.cl.MemberAdd(ctx, &pb.MemberAddRequest{PeerURLs: []string{"not a url"}})
	requireEtcdErr(t, err, etcderr.ErrMemberBadURLs)
	_, err = f.cl.MemberAdd(ctx, &pb.MemberAddRequest{PeerURLs: lead.cfg.PeerURLs, IsLearner: true})
	requireEtcdErr(t, err, etcderr.ErrPeerURLExist)
	_, err = f.cl.MemberRemove(ctx, &pb.MemberRemoveRequest{ID: 42})
	requireEtcdErr(t, err, etcderr.ErrMemberNotFound)
	_, err = f.cl.MemberPromote(ctx, &pb.MemberPromoteRequest{ID: f.r.ID()})
	requireEtcdErr(t, err, etcderr.ErrMemberNotLearner)

	// Add a learner and start it: it joins with no data and catches up by snapshot.
	addr := freeAddr(t)
	cfg := testConfig(t)
	cfg.Name, cfg.Listen, cfg.PeerURLs, cfg.SnapshotCount = "m3", addr, []string{"http://" + addr}, 50
	cfg.InitialClusterState = "existing"
	cfg.InitialCluster = members[0].cfg.InitialCluster
	added, err := f.cl.MemberAdd(ctx, &pb.MemberAddRequest{PeerURLs: cfg.PeerURLs, IsLearner: true})
	if err != nil {
		t.Fatalf("add learner: %v", err)
	}
	if !added.GetMember().GetIsLearner() || len(added.GetMembers()) != 4 {
		t.Fatalf("MemberAdd answered %v", added)
	}
	_, err = f.cl.MemberAdd(ctx, &pb.MemberAddRequest{PeerURLs: []string{"http://127.0.0.1:1"}, IsLearner: true})
	requireEtcdErr(t, err, etcderr.ErrTooManyLearners)
	learner := &member{cfg: cfg}
	learner.start(t)
	t.Cleanup(func() { learner.stop(t) })
	if learner.r.ID() != added.GetMember().GetID() {
		t.Fatalf("the joining member took ID %x; MemberAdd assigned %x", learner.r.ID(), added.GetMember().GetID())
	}
	requireEventually(t, func() bool { return testutil.ToFloat64(learner.r.m.snapshotsInstalled) >= 1 })
	requireEventually(t, func() bool { return learner.r.applied.Load() >= lead.r.applied.Load() })

	// A learner serves serializable reads and Status only.
	_, err = learner.kv.Put(ctx, &pb.PutRequest{Key: []byte("x")})
	requireEtcdErr(t, err, etcderr.ErrNotSupportedForLearner)
	_, err = learner.kv.Range(ctx, &pb.RangeRequest{Key: []byte("k000")})
	requireEtcdErr(t, err, etcderr.ErrNotSupportedForLearner)
	got, err := learner.kv.Range(ctx, &pb.RangeRequest{Key: []byte("k"), RangeEnd: []byte("l"), Serializable: true})
	if err != nil || got.GetCount() != 200 {
		t.Fatalf("serializable read on the learner: %v, %v", got, err)
	}
	st, err := learner.stat.Status(ctx, &pb.StatusRequest{})
	if err != nil || !st.GetIsLearner() {
		t.Fatalf("learner's Status: %v, %v", st, err)
	}

	// Promote it, then remove an original follower (not the leader).
	requireEventually(t, func() bool {
		_, err := f.cl.MemberPromote(ctx, &pb.MemberPromoteRequest{ID: learner.r.ID()})
		return err == nil
	})
	requireEventually(t, func() bool { return !learner.r.isLearner() })
	all := append(append([]*member(nil), members...), learner)
	victim := follower(members, lead)
	if _, err := lead.cl.MemberRemove(ctx, &pb.MemberRemoveRequest{ID: victim.r.ID()}); err != nil {
		t.Fatalf("remove %s: %v", victim.cfg.Name, err)
	}
	requireEventually(t, func() bool { return victim.r.isRemoved() })
	_, err = victim.kv.Put(ctx, &pb.PutRequest{Key: []byte("x")})
	requireEtcdErr(t, err, etcderr.ErrStopped)
	victim.stop(t)
	var rest []*member
	for _, m := range all {
		if m != victim {
			rest = append(rest, m)
		}
	}
	list, err := learner.cl.MemberList(ctx, &pb.MemberListRequest{Linearizable: true})
	if err != nil || len(list.GetMembers()) != 3 {
		t.Fatalf("MemberList after the removal: %v, %v", list, err)
	}
	if _, err := learner.kv.Put(ctx, &pb.PutRequest{Key: []byte("k"), Value: []byte("after")}); err != nil {
		t.Fatalf("write through the promoted member: %v", err)
	}
	for _, m := range rest {
		requireEventually(t, func() bool { return m.r.applied.Load() >= lead.r.applied.Load() })
	}
	requireSameHashKV(t, rest)

	// Leadership moves to the promoted member on request.
	lead = leader(t, rest)
	if _, err := lead.stat.MoveLeader(ctx, &pb.MoveLeaderRequest{TargetID: learner.r.ID()}); err != nil {
		t.Fatalf("MoveLeader: %v", err)
	}
	if leader(t, rest) != learner {
		t.Fatal("leadership did not move")
	}
	_, err = lead.stat.MoveLeader(ctx, &pb.MoveLeaderRequest{TargetID: learner.r.ID()})
	requireEtcdErr(t, err, etcderr.ErrNotLeader)
}
