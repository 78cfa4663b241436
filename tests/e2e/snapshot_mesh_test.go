package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// snapKeys is how many keys TestMeshSnapshotRestore writes.
const snapKeys = 50_000

// TestMeshSnapshotRestore backs a 3-replica mesh up with `etcdctl snapshot save`
// (Debian's 3.4, and the pinned 3.7) and restores the file into a new 3-replica
// cluster: every key with its history (revision, create and mod revisions, versions,
// the compaction), the leases with their keys and whole TTLs again, the users and
// roles are the same, HashKV at the snapshot's revision is equal, the new cluster has
// new IDs, and clients work against it. A truncated file is refused and writes
// nothing.
func TestMeshSnapshotRestore(t *testing.T) {
	t.Parallel()
	m := startMesh(t, 3)
	cli := etcdclient.NewClientFor(t, m.endpoints...)

	// 50,000 keys in txns of 100 puts, 10,000 of them written again, 1,000 deleted,
	// the history compacted half way.
	putBatch := func(from, to int, value string) {
		ops := make([]clientv3.Op, 0, 100)
		for i := from; i < to; i++ {
			ops = append(ops, clientv3.OpPut(fmt.Sprintf("snap/k%05d", i), value))
			if len(ops) == cap(ops) || i == to-1 {
				if _, err := cli.Txn(ctxT(t)).Then(ops...).Commit(); err != nil {
					t.Fatalf("write keys: %v", err)
				}
				ops = ops[:0]
			}
		}
	}
	putBatch(0, snapKeys, "first")
	mid := mustGet(t, cli, "snap/k00000").Header.Revision
	putBatch(0, 10_000, "second")
	for i := 10_000; i < 11_000; i += 100 {
		if _, err := cli.Delete(ctxT(t), fmt.Sprintf("snap/k%05d", i), clientv3.WithRange(fmt.Sprintf("snap/k%05d", i+100))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cli.Compact(ctxT(t), mid, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	var leases []clientv3.LeaseID
	for i := range 5 {
		l, err := cli.Grant(ctxT(t), 600)
		if err != nil {
			t.Fatal(err)
		}
		leases = append(leases, l.ID)
		for j := range 20 {
			mustPut(t, cli, fmt.Sprintf("snap/lease%d/%02d", i, j), "v", clientv3.WithLease(l.ID))
		}
	}
	for _, call := range []func() error{
		func() error { _, err := cli.RoleAdd(ctxT(t), "reader"); return err },
		func() error {
			_, err := cli.RoleGrantPermission(ctxT(t), "reader", "snap/", clientv3.GetPrefixRangeEnd("snap/"), clientv3.PermissionType(clientv3.PermRead))
			return err
		},
		func() error { _, err := cli.UserAdd(ctxT(t), "alice", "alice-pw"); return err },
		func() error { _, err := cli.UserGrantRole(ctxT(t), "alice", "reader"); return err },
		func() error { _, err := cli.UserAdd(ctxT(t), "bob", "bob-pw"); return err },
	} {
		if err := call(); err != nil {
			t.Fatal(err)
		}
	}
	before := snapState(t, cli, m.endpoints[0])

	dir := t.TempDir()
	files := []string{filepath.Join(dir, "etcdctl-3.4.db")}
	saveSnapshot(t, "", m.endpoints[0], files[0])
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if ctl37 := filepath.Join(root, ".bin", "etcdctl"); fileExists(ctl37) {
		files = append(files, filepath.Join(dir, "etcdctl-3.7.db"))
		saveSnapshot(t, ctl37, m.endpoints[0], files[1])
	} else {
		t.Logf("no etcdctl 3.7 in .bin (scripts/tools.sh builds it): saved with 3.4 only")
	}
	for _, f := range files {
		var st struct {
			Revision int64 `json:"revision"`
			TotalKey int64 `json:"totalKey"`
		}
		out, err := exec.Command(m.replicaBin, "snapshot", "status", "-w", "json", f).Output()
		if err != nil || json.Unmarshal(out, &st) != nil {
			t.Fatalf("snapshot status %s: %v: %s", f, err, out)
		}
		if st.Revision != before.rev || st.TotalKey != before.count {
			t.Fatalf("snapshot status %s: revision %d with %d keys, want %d with %d", f, st.Revision, st.TotalKey, before.rev, before.count)
		}
	}

	// A damaged file is refused, and nothing is written.
	b, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "truncated.db")
	if err := os.WriteFile(bad, b[:len(b)-512], 0o600); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "never")
	if out, err := exec.Command(m.replicaBin, "snapshot", "restore", bad, "--data-dir", target).CombinedOutput(); err == nil || !bytes.Contains(out, []byte("corrupt")) {
		t.Fatalf("restore of a truncated snapshot: %v: %s; want a refusal naming the corruption", err, out)
	}
	if fileExists(target) {
		t.Fatalf("the refused restore wrote %s", target)
	}

	// Each file into a new cluster.
	for _, f := range files {
		m2 := startMeshWith(t, meshOptions{restore: f}, 3)
		cli2 := etcdclient.NewClientFor(t, m2.endpoints...)
		after := snapState(t, cli2, m2.endpoints[0])
		if after.cluster == before.cluster {
			t.Errorf("%s: the restored cluster kept the old cluster ID %x", f, before.cluster)
		}
		if msg := before.diff(after); msg != "" {
			t.Fatalf("%s: the restored cluster differs: %s", f, msg)
		}
		for _, id := range leases {
			ttl, err := cli2.TimeToLive(ctxT(t), id)
			if err != nil || ttl.TTL < 590 {
				t.Fatalf("%s: lease %x after restore: %v %v; want its whole TTL (600 s) again", f, id, ttl, err)
			}
		}
		r := mustPut(t, cli2, "snap/after-restore", "v")
		if r.Header.Revision != before.rev+1 {
			t.Fatalf("%s: first put after restore at revision %d, want %d", f, r.Header.Revision, before.rev+1)
		}
		old := mustGet(t, cli2, "snap/k00001", clientv3.WithRev(mid))
		if len(old.Kvs) != 1 || string(old.Kvs[0].Value) != "first" {
			t.Fatalf("%s: snap/k00001 at revision %d after restore: %v, want its first value", f, mid, old.Kvs)
		}
		if _, err := cli2.Get(ctxT(t), "snap/k00001", clientv3.WithRev(mid-1)); err == nil {
			t.Fatalf("%s: a read below the compaction succeeded after restore", f)
		}
	}
}

// snapshotState is what a restore must keep, read through a client.
type snapshotState struct {
	cluster uint64
	rev     int64
	count   int64
	kvs     []*mvccpb.KeyValue
	hash    uint32
	compact int64
	leases  []string // id: ttl keys
	users   []string
	roles   []string
}

func snapState(t *testing.T, cli *clientv3.Client, endpoint string) snapshotState {
	t.Helper()
	r, err := cli.Get(ctxT(t), "snap/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	s := snapshotState{cluster: r.Header.ClusterId, rev: r.Header.Revision, count: r.Count, kvs: r.Kvs}
	h, err := cli.HashKV(ctxT(t), endpoint, s.rev)
	if err != nil {
		t.Fatal(err)
	}
	s.hash, s.compact = h.Hash, h.CompactRevision
	ls, err := cli.Leases(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls.Leases {
		ttl, err := cli.TimeToLive(ctxT(t), l.ID, clientv3.WithAttachedKeys())
		if err != nil {
			t.Fatal(err)
		}
		keys := make([]string, 0, len(ttl.Keys))
		for _, k := range ttl.Keys {
			keys = append(keys, string(k))
		}
		slices.Sort(keys)
		s.leases = append(s.leases, fmt.Sprintf("%x: granted %d, keys %v", l.ID, ttl.GrantedTTL, keys))
	}
	slices.Sort(s.leases)
	ul, err := cli.UserList(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range ul.Users {
		ug, err := cli.UserGet(ctxT(t), u)
		if err != nil {
			t.Fatal(err)
		}
		s.users = append(s.users, fmt.Sprintf("%s %v", u, ug.Roles))
	}
	rl, err := cli.RoleList(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range rl.Roles {
		rg, err := cli.RoleGet(ctxT(t), name)
		if err != nil {
			t.Fatal(err)
		}
		s.roles = append(s.roles, fmt.Sprintf("%s %v", name, rg.Perm))
	}
	return s
}

func (a snapshotState) diff(b snapshotState) string {
	switch {
	case a.rev != b.rev || a.count != b.count:
		return fmt.Sprintf("revision %d with %d keys, want %d with %d", b.rev, b.count, a.rev, a.count)
	case a.hash != b.hash || a.compact != b.compact:
		return fmt.Sprintf("HashKV at %d: %d (compacted at %d), want %d (%d)", a.rev, b.hash, b.compact, a.hash, a.compact)
	case !slices.Equal(a.leases, b.leases):
		return fmt.Sprintf("leases %v, want %v", b.leases, a.leases)
	case !slices.Equal(a.users, b.users) || !slices.Equal(a.roles, b.roles):
		return fmt.Sprintf("users %v roles %v, want %v and %v", b.users, b.roles, a.users, a.roles)
	}
	for i := range a.kvs {
		x, y := a.kvs[i], b.kvs[i]
		if !bytes.Equal(x.Key, y.Key) || !bytes.Equal(x.Value, y.Value) || x.CreateRevision != y.CreateRevision ||
			x.ModRevision != y.ModRevision || x.Version != y.Version || x.Lease != y.Lease {
			return fmt.Sprintf("key %d: %v, want %v", i, y, x)
		}
	}
	return ""
}

// saveSnapshot runs `etcdctl snapshot save` (ctl: that etcdctl, "" for Debian's).
func saveSnapshot(t *testing.T, ctl, endpoint, file string) {
	t.Helper()
	if ctl == "" {
		var err error
		if ctl, err = harness.EtcdctlBinary(); err != nil {
			harness.SkipOrFail(t, err)
		}
	}
	cmd := exec.Command(ctl, "--endpoints="+endpoint, "snapshot", "save", file)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("Snapshot saved at "+file)) {
		t.Fatalf("%s snapshot save: %v\n%s", ctl, err, out)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
