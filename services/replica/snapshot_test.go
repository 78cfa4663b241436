package replica

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// TestFollowerBehindTruncatedLogCatchesUpBySnapshot cuts a follower off while the
// others write far past their log truncation, then heals: the follower can only catch
// up by a streamed snapshot, and afterwards it serves the same history as the others.
// Then the crash window of an install is recreated: the state directory switched to the
// snapshot but the raft log not yet reset (the log is put back as it was before the
// install), plus a staged snapshot that was never installed. The member must restart
// from that, drop the leftover, and converge again.
func TestFollowerBehindTruncatedLogCatchesUpBySnapshot(t *testing.T) {
	members := startClusterWith(t, 3, func(c *Config) { c.SnapshotCount = 50 })
	lead := leader(t, members)
	f := follower(members, lead)
	put := func(m *member, k, v string) {
		t.Helper()
		if _, err := m.kv.Put(context.Background(), &pb.PutRequest{Key: []byte(k), Value: []byte(v)}); err != nil {
			t.Fatalf("put %s: %v", k, err)
		}
	}
	for i := range 20 {
		put(lead, fmt.Sprintf("k%03d", i), "before")
	}
	requireEventually(t, func() bool { return f.r.applied.Load() >= lead.r.applied.Load() })

	// Keep a copy of the follower's raft log as it is now, for the crash below.
	f.stop(t)
	backup := t.TempDir()
	if err := os.CopyFS(backup, os.DirFS(filepath.Join(f.cfg.DataDir, walDirName))); err != nil {
		t.Fatal(err)
	}
	f.start(t)
	partition(members, f)
	for i := range 300 {
		put(lead, fmt.Sprintf("k%03d", i%100), fmt.Sprint("during", i))
	}
	if _, err := lead.kv.Compact(context.Background(), &pb.CompactionRequest{Revision: 200}); err != nil {
		t.Fatal(err)
	}
	first, _ := lead.r.raftLog.FirstIndex()
	if first <= f.r.applied.Load()+1 {
		t.Fatalf("the leader's log starts at %d, the follower applied %d: not truncated past it", first, f.r.applied.Load())
	}
	heal(members)
	requireEventually(t, func() bool { return testutil.ToFloat64(f.r.m.snapshotsInstalled) >= 1 })
	requireEventually(t, func() bool { return f.r.applied.Load() >= lead.r.applied.Load() })
	put(lead, "k", "after")
	requireEventually(t, func() bool { return f.r.applied.Load() >= lead.r.applied.Load() })
	requireSameHashKV(t, members)
	got, err := f.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte("k0"), RangeEnd: []byte("k1"), Serializable: true})
	if err != nil || got.GetCount() != 100 {
		t.Fatalf("follower after the snapshot: %v, %v; want 100 keys", got, err)
	}
	if _, err := f.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte("k000"), Revision: 150, Serializable: true}); err == nil {
		t.Fatal("the snapshot lost the compaction: a read below the compacted revision succeeded")
	}

	// The crash window: STATE names the installed snapshot, the log is the old one.
	f.stop(t)
	raftDir := filepath.Join(f.cfg.DataDir, walDirName)
	if err := os.RemoveAll(raftDir); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(raftDir, os.DirFS(backup)); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(f.cfg.DataDir, "snap-1-1")
	if err := os.MkdirAll(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	f.start(t)
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("a staged snapshot that was never installed survived the restart: %v", err)
	}
	put(lead, "k", "after-restart")
	requireEventually(t, func() bool { return f.r.applied.Load() >= lead.r.applied.Load() })
	requireSameHashKV(t, members)
}
