package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// callReplica calls a replica's internal API directly over grpc-go, with etcd's own
// messages: the replica's KV and Maintenance services take and answer etcd's, wire for
// wire (this test binary links etcd's protos through clientv3, so it cannot link
// kvmesh's generated ones too).
func callReplica(ctx context.Context, url, method string, req, resp any) error {
	cc, err := grpc.NewClient(strings.TrimPrefix(url, "http://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	return cc.Invoke(ctx, "/kvmesh.replica.v1."+method, req, resp)
}

// metricOf reads one unlabeled metric of a process's /metrics.
func metricOf(url, name string) float64 {
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f
		}
	}
	return -1
}

func waitFor(t *testing.T, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMeshPartitionMembershipAndSnapshots drives a mesh of real processes with
// clientv3 through both gateways:
//   - a follower cut off from its peers accepts no write and serves no linearizable
//     read while the majority goes on; healed, it converges;
//   - a fourth member added as a learner after the log was truncated catches up by
//     snapshot, is promoted, and another member is removed (its process exits);
//   - writes go on with hasleader, and every member hashes the same history;
//   - with one gateway killed, clientv3 fails over to the other.
func TestMeshPartitionMembershipAndSnapshots(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	env := []string{"KVMESH_REPLICA_SNAPSHOT_COUNT=100", "KVMESH_REPLICA_ENABLE_FAULT_INJECTION=true"}
	m := startMesh(t, 3, env...)
	cli, err := clientv3.New(etcdclient.ClientConfig(m.endpoints...))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	put := func(prefix string, n int) {
		t.Helper()
		for i := range n {
			if _, err := cli.Put(ctxT(t), fmt.Sprintf("%s/%04d", prefix, i), "v"); err != nil {
				t.Fatalf("put %s/%d: %v", prefix, i, err)
			}
		}
	}
	put("a", 300)

	// Map member IDs to processes; find the leader.
	ml, err := cli.MemberList(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	procOf := map[uint64]int{}
	for _, mem := range ml.Members {
		for i, u := range m.urls {
			if len(mem.PeerURLs) > 0 && mem.PeerURLs[0] == u {
				procOf[mem.ID] = i
			}
		}
	}
	st, err := cli.Status(ctxT(t), m.endpoints[0])
	if err != nil {
		t.Fatal(err)
	}
	lead, ok := procOf[st.Leader]
	if !ok {
		t.Fatalf("leader %x unknown (members %v)", st.Leader, procOf)
	}
	f := (lead + 1) % 3
	fURL := m.urls[f]

	// Partition the follower.
	post := func(url string) {
		t.Helper()
		resp, err := http.Post(url, "text/plain", nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("POST %s: %v %v", url, resp, err)
		}
		resp.Body.Close()
	}
	post(fURL + "/debug/faults/isolate")
	put("b", 50)
	short := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	if r := new(pb.PutResponse); callReplica(short(), fURL, "KVService/Put", &pb.PutRequest{Key: []byte("minority"), Value: []byte("x")}, r) == nil {
		t.Fatalf("the cut-off follower accepted a write: %v", r)
	}
	if r := new(pb.RangeResponse); callReplica(short(), fURL, "KVService/Range", &pb.RangeRequest{Key: []byte("b/0000")}, r) == nil {
		t.Fatalf("the cut-off follower served a linearizable read: %v", r)
	}
	if r := new(pb.RangeResponse); callReplica(short(), fURL, "KVService/Range", &pb.RangeRequest{Key: []byte("a/0000"), Serializable: true}, r) != nil || r.Count != 1 {
		t.Fatalf("serializable read on the cut-off follower: %v", r)
	}
	// Its health endpoints say so, as an etcd member's do: alive, not ready.
	expectHTTP(t, fURL+"/livez", 200, "ok\n")
	expectHTTP(t, fURL+"/health?serializable=true", 200, `{"health":"true","reason":""}`)
	expectHTTP(t, fURL+"/readyz/linearizable_read", 503, "[-]linearizable_read failed: etcdserver: request timed out\n\n")
	expectHTTP(t, m.urls[lead]+"/readyz?verbose", 200, "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\n[+]non_learner ok\nok\n")
	post(fURL + "/debug/faults/heal")
	cur, err := cli.Get(ctxT(t), "b/0049")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the healed follower catches up", 20*time.Second, func() bool {
		return currentRevisionOf(fURL) >= cur.Header.Revision
	})

	// Add a learner: the log has long been truncated, so it needs a snapshot.
	addr, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	add, err := cli.MemberAddAsLearner(ctxT(t), []string{"http://" + addr})
	if err != nil {
		t.Fatalf("MemberAddAsLearner: %v", err)
	}
	if !add.Member.IsLearner {
		t.Fatalf("MemberAddAsLearner answered %v", add.Member)
	}
	learner := m.replicaProc("r3", addr, append(env, "KVMESH_REPLICA_INITIAL_CLUSTER_STATE=existing",
		"KVMESH_REPLICA_INITIAL_CLUSTER="+strings.Join(m.initial, ","))...)
	m.all = append(m.all, learner)
	learner.start()
	lURL := "http://" + addr
	waitFor(t, "the learner catches up", 30*time.Second, func() bool {
		return currentRevisionOf(lURL) >= cur.Header.Revision
	})
	if n := metricOf(lURL, "kvmesh_replica_snapshots_installed_total"); n < 1 {
		t.Fatalf("the learner installed %v snapshots; it should have needed one", n)
	}
	expectHTTP(t, lURL+"/readyz/non_learner", 503, "[-]non_learner failed: not supported for learner\n\n")
	expectHTTP(t, lURL+"/livez", 200, "ok\n")
	waitFor(t, "the learner is promoted", 30*time.Second, func() bool {
		_, err := cli.MemberPromote(ctxT(t), add.Member.ID)
		return err == nil
	})

	// Remove the partitioned follower (not the leader): its process stops by itself.
	var fID uint64
	for id, i := range procOf {
		if i == f {
			fID = id
		}
	}
	if _, err := cli.MemberRemove(ctxT(t), fID); err != nil {
		t.Fatalf("MemberRemove: %v", err)
	}
	select {
	case <-m.replicas[f].done:
		m.replicas[f].cmd = nil
	case <-time.After(15 * time.Second):
		t.Fatal("the removed member's process did not stop")
	}
	ml, err = cli.MemberList(ctxT(t))
	if err != nil || len(ml.Members) != 3 {
		t.Fatalf("MemberList after the removal: %v, %v", ml, err)
	}
	for _, mem := range ml.Members {
		if mem.IsLearner {
			t.Fatalf("member %x is still a learner after its promotion", mem.ID)
		}
	}
	expectHTTP(t, lURL+"/readyz", 200, "ok\n")

	// Writes go on, also with hasleader; every member hashes the same history.
	for i := range 50 {
		ctx := clientv3.WithRequireLeader(ctxT(t))
		if _, err := cli.Put(ctx, fmt.Sprintf("c/%04d", i), "v"); err != nil {
			t.Fatalf("put after the membership changes: %v", err)
		}
	}
	last, err := cli.Get(ctxT(t), "c/0049")
	if err != nil {
		t.Fatal(err)
	}
	rev := last.Header.Revision
	var hashes []string
	for _, u := range []string{m.urls[lead], m.urls[3-lead-f], lURL} {
		waitFor(t, u+" reaches the revision", 20*time.Second, func() bool { return currentRevisionOf(u) >= rev })
		h := new(pb.HashKVResponse)
		if err := callReplica(ctxT(t), u, "MaintenanceService/HashKV", &pb.HashKVRequest{Revision: rev}, h); err != nil {
			t.Fatalf("HashKV on %s: %v", u, err)
		}
		hashes = append(hashes, fmt.Sprint(h.Hash))
	}
	if hashes[0] != hashes[1] || hashes[1] != hashes[2] {
		t.Fatalf("members disagree on their history at revision %d: %v", rev, hashes)
	}

	// A gateway dies: clientv3, given both endpoints, goes on through the other. A put
	// sent on the dead connection before clientv3 saw it close fails Unavailable (as
	// with etcd: clientv3 does not repeat a write that may have been sent); sent again,
	// it goes through the other gateway.
	m.gateways[0].kill()
	for i := range 20 {
		_, err := cli.Put(ctxT(t), fmt.Sprintf("d/%04d", i), "v")
		if status.Code(err) == codes.Unavailable {
			time.Sleep(100 * time.Millisecond)
			_, err = cli.Put(ctxT(t), fmt.Sprintf("d/%04d", i), "v")
		}
		if err != nil {
			t.Fatalf("put after losing a gateway: %v", err)
		}
	}
	if r, err := cli.Get(ctxT(t), "d/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || r.Count != 20 {
		t.Fatalf("read after losing a gateway: %v, %v", r, err)
	}
}

// expectHTTP checks the status and body of a GET.
func expectHTTP(t *testing.T, url string, code int, body string) {
	t.Helper()
	client := &http.Client{Timeout: 15 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != code || string(b) != body {
		t.Fatalf("GET %s: %d %q, want %d %q", url, resp.StatusCode, b, code, body)
	}
}
