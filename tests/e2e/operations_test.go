package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestMeshQuota fills a 3-replica mesh past a small backend quota: the NOSPACE alarm
// is raised through Raft, so every replica lists it and refuses puts; after deletes, a
// compaction, a defragmentation (of every replica, through the gateway) and a disarm,
// writes work again, and every acknowledged put was readable throughout.
func TestMeshQuota(t *testing.T) {
	t.Parallel()
	m := startMesh(t, 3, fmt.Sprintf("KVMESH_REPLICA_QUOTA_BACKEND_BYTES=%d", opsQuotaBytes))
	cli := etcdclient.NewClientFor(t, m.endpoints...)
	value := strings.Repeat("q", 100<<10)
	var acked []string
	var refusal error
	for i := range 400 {
		k := fmt.Sprintf("quota/%04d", i)
		if _, err := cli.Put(ctxT(t), k, value); err != nil {
			refusal = err
			break
		}
		acked = append(acked, k)
	}
	if errDesc(refusal) != "ResourceExhausted: etcdserver: mvcc: database space exceeded" {
		t.Fatalf("after %d puts: %s, want etcd's NOSPACE refusal", len(acked), errDesc(refusal))
	}
	// Every member knows the alarm (it is replicated state) and refuses writes itself.
	for _, u := range m.urls {
		var al pb.AlarmResponse
		if err := callReplica(ctxT(t), u, "MaintenanceService/Alarm", &pb.AlarmRequest{Action: pb.AlarmRequest_GET}, &al); err != nil {
			t.Fatalf("%s: Alarm: %v", u, err)
		}
		if len(al.Alarms) != 1 || al.Alarms[0].Alarm != pb.AlarmType_NOSPACE {
			t.Fatalf("%s: alarms %v, want one NOSPACE", u, al.Alarms)
		}
		var st pb.StatusResponse
		if err := callReplica(ctxT(t), u, "MaintenanceService/Status", &pb.StatusRequest{}, &st); err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(st.Errors, func(e string) bool { return strings.HasSuffix(e, "alarm:NOSPACE") }) {
			t.Fatalf("%s: Status errors %q, want the NOSPACE alarm", u, st.Errors)
		}
		var put pb.PutResponse
		err := callReplica(ctxT(t), u, "KVService/Put", &pb.PutRequest{Key: []byte("quota/direct"), Value: []byte("v")}, &put)
		if err == nil || !strings.Contains(err.Error(), "database space exceeded") {
			t.Fatalf("%s: a put to the replica itself: %v, want NOSPACE", u, err)
		}
	}
	r, err := cli.Get(ctxT(t), "quota/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil || r.Count != int64(len(acked)) {
		t.Fatalf("under NOSPACE: %v keys (%v), want the %d acknowledged", r, err, len(acked))
	}
	d, err := cli.Delete(ctxT(t), "quota/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctxT(t), d.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Defragment(ctxT(t), m.endpoints[0]); err != nil {
		t.Fatal(err)
	}
	for _, u := range m.urls {
		var st pb.StatusResponse
		if err := callReplica(ctxT(t), u, "MaintenanceService/Status", &pb.StatusRequest{}, &st); err != nil {
			t.Fatal(err)
		}
		if st.DbSize >= opsQuotaBytes {
			t.Fatalf("%s: db size %d after defragmenting, want below the quota %d", u, st.DbSize, opsQuotaBytes)
		}
	}
	al, err := cli.AlarmList(ctxT(t))
	if err != nil || len(al.Alarms) != 1 {
		t.Fatalf("alarm list: %v %v", al, err)
	}
	if _, err := cli.AlarmDisarm(ctxT(t), (*clientv3.AlarmMember)(al.Alarms[0])); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctxT(t), "quota/after", "v"); err != nil {
		t.Fatalf("put after the disarm: %v", err)
	}
}

// TestScheduledBackups runs the all-in-one with scheduled backups every 300 ms, keeping
// 3: the files appear, rotate (the oldest go, three stay), are whole snapshots, and the
// newest restores into a server with the data.
func TestScheduledBackups(t *testing.T) {
	t.Parallel()
	if harness.MustTarget(t) != harness.KindKvmesh {
		t.Skip("kvmesh's own feature")
	}
	if harness.Topology() == harness.TopologyMesh {
		t.Skip("restores the all-in-one's data directory (TestMeshSnapshotRestore restores meshes)")
	}
	dir := t.TempDir()
	s := harness.StartKvmesh(t, harness.Options{Name: "backups", Env: []string{
		"KVMESH_REPLICA_BACKUP_DIR=" + dir, "KVMESH_REPLICA_BACKUP_INTERVAL=300ms", "KVMESH_REPLICA_BACKUP_KEEP=3"}})
	cli := etcdclient.NewClient(t, s)
	rev := mustPut(t, cli, "backup/k", "v").Header.Revision

	backups := func() []string {
		ents, _ := os.ReadDir(dir)
		var names []string
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "kvmesh-backup-") && strings.HasSuffix(e.Name(), ".db") {
				names = append(names, e.Name())
			}
		}
		slices.Sort(names)
		return names
	}
	// Wait for a backup taken after the put, then for it to be rotated out.
	var first []string
	deadline := time.Now().Add(20 * time.Second)
	for len(first) < 3 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		first = backups()
	}
	if len(first) < 3 {
		t.Fatalf("backups after waiting: %v, want 3", first)
	}
	for time.Now().Before(deadline) && slices.Contains(backups(), first[0]) {
		time.Sleep(100 * time.Millisecond)
	}
	now := backups()
	if slices.Contains(now, first[0]) || len(now) > 3 {
		t.Fatalf("backups %v after %v: the oldest was not rotated out, or more than 3 are kept", now, first)
	}

	bin, err := harness.KvmeshBinary()
	if err != nil {
		t.Fatal(err)
	}
	newest := filepath.Join(dir, now[len(now)-1])
	restored := filepath.Join(t.TempDir(), "restored")
	if out, err := exec.Command(bin, "snapshot", "restore", newest, "--data-dir", restored).CombinedOutput(); err != nil {
		t.Fatalf("restore %s: %v\n%s", newest, err, out)
	}
	s2 := harness.StartKvmesh(t, harness.Options{Name: "from-backup", DataDir: restored})
	g := mustGet(t, etcdclient.NewClient(t, s2), "backup/k")
	if len(g.Kvs) != 1 || string(g.Kvs[0].Value) != "v" || g.Kvs[0].ModRevision != rev {
		t.Fatalf("restored from %s: %v, want backup/k=v at revision %d", newest, g.Kvs, rev)
	}
}
