package replica

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	raftpb "go.etcd.io/raft/v3/raftpb"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/libs/replicaapi"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// member is one replica of an in-process cluster: its own data directory and internal
// listener (which serves the internal and peer APIs), reached by the test over it.
type member struct {
	cfg  Config
	r    *Replica
	kv   replicaapi.API
	stat replicaapi.API
	cl   replicaapi.API
	run  *running
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func (m *member) start(t *testing.T) {
	t.Helper()
	tel, err := telemetry.New(context.Background(), "cluster-test", telemetry.Config{LogLevel: "warn", LogFormat: "text"}, testLogOutput())
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(m.cfg, tel)
	if err != nil {
		t.Fatalf("start %s: %v", m.cfg.Name, err)
	}
	if err := r.Listen(); err != nil {
		t.Fatalf("listen %s: %v", m.cfg.Name, err)
	}
	m.r, m.run = r, runReplica(t, r)
	// The test calls each member as gateways do, over grpc-go.
	c, err := replicaapi.Network{Options: tel.GRPCInternalClient()}.Dial("http://" + r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	m.kv, m.stat, m.cl = c, c, c
}

// testLogOutput is where in-process replicas log: nowhere, unless KVMESH_TEST_LOG=1.
func testLogOutput() io.Writer {
	if os.Getenv("KVMESH_TEST_LOG") == "1" {
		return os.Stderr
	}
	return io.Discard
}

func (m *member) stop(t *testing.T) {
	t.Helper()
	if m.r == nil {
		return
	}
	if err := m.run.stop(); err != nil {
		t.Errorf("stop %s: %v", m.cfg.Name, err)
	}
	m.r = nil
}

func startCluster(t *testing.T, n int) []*member {
	t.Helper()
	return startClusterWith(t, n, nil)
}

// startClusterWith starts n members, each configured by tune (when not nil).
func startClusterWith(t *testing.T, n int, tune func(*Config)) []*member {
	t.Helper()
	var initial []string
	members := make([]*member, n)
	for i := range members {
		addr := freeAddr(t)
		cfg := testConfig(t)
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Listen = addr
		cfg.PeerURLs = []string{"http://" + addr}
		if tune != nil {
			tune(&cfg)
		}
		members[i] = &member{cfg: cfg}
		initial = append(initial, cfg.Name+"=http://"+addr)
	}
	for _, m := range members {
		m.cfg.InitialCluster = initial
		m.start(t)
	}
	t.Cleanup(func() {
		for _, m := range members {
			m.stop(t)
		}
	})
	return members
}

// leader waits until the running members agree on a leader and returns it.
func leader(t *testing.T, members []*member) *member {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		var lead uint64
		agree := true
		for _, m := range members {
			if m.r == nil {
				continue
			}
			st, err := m.stat.Status(context.Background(), &pb.StatusRequest{})
			if err != nil || st.GetLeader() == 0 || (lead != 0 && st.GetLeader() != lead) {
				agree = false
				break
			}
			lead = st.GetLeader()
		}
		if agree && lead != 0 {
			for _, m := range members {
				if m.r != nil && m.r.ID() == lead {
					return m
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("the running members did not agree on a leader within 15s")
	return nil
}

func follower(members []*member, lead *member) *member {
	for _, m := range members {
		if m != lead && m.r != nil {
			return m
		}
	}
	return nil
}

func TestThreeReplicasReplicateAndSurviveLeaderLoss(t *testing.T) {
	members := startCluster(t, 3)
	lead := leader(t, members)
	f := follower(members, lead)

	// A write accepted by a follower reaches the leader and is applied everywhere.
	put, err := f.kv.Put(context.Background(), &pb.PutRequest{Key: []byte("k"), Value: []byte("v1")})
	if err != nil {
		t.Fatalf("put through follower %s: %v", f.cfg.Name, err)
	}
	for _, m := range members {
		got, err := m.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte("k")})
		if err != nil || len(got.GetKvs()) != 1 || string(got.GetKvs()[0].GetValue()) != "v1" {
			t.Fatalf("linearizable read on %s: %v, %v; want v1", m.cfg.Name, got, err)
		}
		if h := got.GetHeader(); h.GetClusterId() != put.GetHeader().GetClusterId() || h.GetMemberId() != m.r.ID() {
			t.Fatalf("%s answers header %v: want the cluster's ID and its own member ID", m.cfg.Name, h)
		}
	}

	requireSameHashKV(t, members)

	// Lose the leader: the others elect a new one and keep accepting writes.
	lead.stop(t)
	newLead := leader(t, members)
	if newLead == lead {
		t.Fatal("the stopped member is still reported leader")
	}
	other := follower(members, newLead)
	for i := range 20 {
		if _, err := other.kv.Put(context.Background(), &pb.PutRequest{Key: []byte("k"), Value: []byte(fmt.Sprint("v", i+2))}); err != nil {
			t.Fatalf("put %d after leader loss: %v", i, err)
		}
	}

	// The old leader comes back and catches up from the log.
	lead.start(t)
	deadline := time.Now().Add(15 * time.Second)
	for {
		got, err := lead.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte("k")})
		if err == nil && len(got.GetKvs()) == 1 && string(got.GetKvs()[0].GetValue()) == "v21" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarted member did not catch up: %v, %v", got, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	requireSameHashKV(t, members)
}

// requireSameHashKV checks that every member hashes the same history at the current
// revision: replicas never diverge.
func requireSameHashKV(t *testing.T, members []*member) {
	t.Helper()
	var rev int64
	for _, m := range members {
		got, err := m.kv.Range(context.Background(), &pb.RangeRequest{Key: []byte("k")})
		if err != nil {
			t.Fatal(err)
		}
		rev = max(rev, got.GetHeader().GetRevision())
	}
	hashes := map[uint32][]string{}
	for _, m := range members {
		h, err := m.stat.HashKV(context.Background(), &pb.HashKVRequest{Revision: rev})
		if err != nil {
			t.Fatalf("HashKV on %s at %d: %v", m.cfg.Name, rev, err)
		}
		hashes[h.GetHash()] = append(hashes[h.GetHash()], m.cfg.Name)
	}
	if len(hashes) != 1 {
		t.Fatalf("members disagree on their history at revision %d: %v", rev, hashes)
	}
}

func TestInitialClusterMustNameThisMember(t *testing.T) {
	cfg := testConfig(t)
	cfg.InitialCluster = []string{"other=http://127.0.0.1:1"}
	if _, _, err := cfg.initialMembers(); err == nil {
		t.Fatal("a member missing from KVMESH_REPLICA_INITIAL_CLUSTER was accepted")
	}
	cfg.InitialCluster = []string{"test=http://127.0.0.1:9"}
	if _, _, err := cfg.initialMembers(); err == nil {
		t.Fatal("an initial cluster whose peer URL for this member differs from PEER_URLS was accepted")
	}
}

// partition cuts the members in side off from the others (messages both ways are
// dropped by their senders); heal undoes it.
func partition(members []*member, side ...*member) {
	cut := map[uint64]bool{}
	for _, m := range side {
		cut[m.r.ID()] = true
	}
	drop := func(msg *raftpb.Message) bool { return cut[msg.GetFrom()] != cut[msg.GetTo()] }
	for _, m := range members {
		if m.r != nil {
			m.r.peers.drop.Store(&drop)
		}
	}
}

func heal(members []*member) {
	for _, m := range members {
		if m.r != nil {
			m.r.peers.drop.Store(nil)
		}
	}
}

func TestPartitionedMinorityNeitherWritesNorReadsStale(t *testing.T) {
	members := startCluster(t, 3)
	lead := leader(t, members)
	f := follower(members, lead)
	put := func(m *member, v string, timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		_, err := m.kv.Put(ctx, &pb.PutRequest{Key: []byte("p"), Value: []byte(v)})
		return err
	}
	read := func(m *member, serializable bool, timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		r, err := m.kv.Range(ctx, &pb.RangeRequest{Key: []byte("p"), Serializable: serializable})
		if err != nil {
			return "", err
		}
		if len(r.GetKvs()) == 0 {
			return "", nil
		}
		return string(r.GetKvs()[0].GetValue()), nil
	}
	if err := put(lead, "before", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if v, err := read(f, false, 5*time.Second); err != nil || v != "before" {
		t.Fatalf("follower before the partition: %q, %v", v, err)
	}

	// A follower alone: the majority goes on; the follower accepts no write and serves
	// no linearizable read (a serializable read may be stale).
	partition(members, f)
	if err := put(lead, "during", 5*time.Second); err != nil {
		t.Fatalf("majority write during the partition: %v", err)
	}
	if err := put(f, "minority", time.Second); err == nil {
		t.Fatal("the cut-off follower accepted a write")
	}
	if v, err := read(f, false, time.Second); err == nil {
		t.Fatalf("the cut-off follower served a linearizable read (%q)", v)
	}
	if v, err := read(f, true, time.Second); err != nil || v != "before" {
		t.Fatalf("serializable read on the cut-off follower: %q, %v; want its own (stale) state", v, err)
	}

	// Healing converges: the follower catches up, and the write it was offered
	// during the partition is not there unless it was acknowledged (it was not).
	heal(members)
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := read(f, false, 2*time.Second)
		if err == nil && v == "during" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("follower after healing: %q, %v; want during", v, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The leader alone: it steps down (check quorum), the majority elects another and
	// goes on; the old leader serves no linearizable read.
	lead = leader(t, members)
	partition(members, lead)
	others := []*member{}
	for _, m := range members {
		if m != lead {
			others = append(others, m)
		}
	}
	newLead := leader(t, others)
	if err := put(newLead, "after", 5*time.Second); err != nil {
		t.Fatalf("write on the new majority: %v", err)
	}
	if v, err := read(lead, false, time.Second); err == nil {
		t.Fatalf("the cut-off old leader served a linearizable read (%q)", v)
	}
	heal(members)
	requireEventually(t, func() bool { v, err := read(lead, false, 2*time.Second); return err == nil && v == "after" })
	requireSameHashKV(t, members)
}

func requireEventually(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 15s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
