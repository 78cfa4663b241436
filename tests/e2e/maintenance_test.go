package e2e

import (
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/kvmesh/kvmesh/tests/harness"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestMaintenanceStatus checks the Maintenance.Status RPC of a single node.
func TestMaintenanceStatus(t *testing.T) {
	s := shared(t)
	cli := sharedClient(t)
	p := prefixFor(t)
	rev := mustPut(t, cli, p+"k", "v").Header.Revision

	st, err := cli.Status(ctxT(t), s.Endpoint())
	requireOK(t, "Status", err)
	checkHeader(t, "Status", st.Header, rev)
	if st.Leader != st.Header.MemberId {
		t.Errorf("Status: leader=%x, want the member itself (%x): a single node leads", st.Leader, st.Header.MemberId)
	}
	if st.RaftIndex == 0 {
		t.Errorf("Status: raft_index=0, want > 0")
	}
	if st.RaftTerm < 1 {
		t.Errorf("Status: raft_term=%d, want >= 1", st.RaftTerm)
	}
	if st.DbSize <= 0 {
		t.Errorf("Status: db_size=%d, want > 0", st.DbSize)
	}
	if st.Version == "" {
		t.Errorf("Status: empty version")
	}
	if st.IsLearner {
		t.Errorf("Status: is_learner=true for the only member")
	}
	if len(st.Errors) != 0 {
		t.Errorf("Status: errors %q", st.Errors)
	}
	t.Logf("status: version=%s db_size=%d raft_index=%d raft_term=%d", st.Version, st.DbSize, st.RaftIndex, st.RaftTerm)

	// The raft index advances with writes.
	mustPut(t, cli, p+"k", "v2")
	st2, err := cli.Status(ctxT(t), s.Endpoint())
	requireOK(t, "second Status", err)
	if st2.RaftIndex <= st.RaftIndex {
		t.Errorf("raft_index did not advance after a write: %d then %d", st.RaftIndex, st2.RaftIndex)
	}
	checkHeader(t, "second Status", st2.Header, rev+1)
	if st2.Header.MemberId != st.Header.MemberId || st2.Header.ClusterId != st.Header.ClusterId {
		t.Errorf("member/cluster id changed between two Status calls")
	}
}

// TestClusterMemberList checks the Cluster.MemberList RPC of a single node.
func TestClusterMemberList(t *testing.T) {
	s := shared(t)
	cli := sharedClient(t)
	// Members publish their client URLs once they run (the mesh's, each on its own).
	var ml *clientv3.MemberListResponse
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var err error
		ml, err = cli.MemberList(ctxT(t))
		requireOK(t, "MemberList", err)
		if !slices.ContainsFunc(ml.Members, func(o *pb.Member) bool { return len(o.ClientURLs) == 0 }) || time.Now().After(deadline) {
			break
		}
	}
	checkHeader(t, "MemberList", ml.Header, 0)
	want := 1
	if harness.Topology() == harness.TopologyMesh {
		want = 3 // the mesh's replicas; the first has the configured name
	}
	if len(ml.Members) != want {
		t.Fatalf("MemberList: %d members %v, want exactly %d", len(ml.Members), ml.Members, want)
	}
	m := ml.Members[0]
	for _, o := range ml.Members {
		if o.Name == sharedName {
			m = o
		}
	}
	if m.ID == 0 || (want == 1 && m.ID != ml.Header.MemberId) {
		t.Errorf("member id %x, want the header's member id %x", m.ID, ml.Header.MemberId)
	}
	if m.Name != sharedName {
		t.Errorf("member name %q, want %q (the configured name)", m.Name, sharedName)
	}
	if m.IsLearner {
		t.Errorf("the only member is a learner")
	}
	found := false
	for _, u := range m.ClientURLs {
		pu, err := url.Parse(u)
		if err != nil {
			t.Errorf("client URL %q does not parse: %v", u, err)
			continue
		}
		if pu.Host == s.Endpoint() {
			found = true
		}
	}
	if !found {
		t.Errorf("client URLs %q do not include the endpoint %s", m.ClientURLs, s.Endpoint())
	}

	// The member id agrees with Status (a mesh's gateway answers the leader's, some
	// member's).
	st, err := cli.Status(ctxT(t), s.Endpoint())
	requireOK(t, "Status", err)
	if (want == 1 && st.Header.MemberId != m.ID) || !slices.ContainsFunc(ml.Members, func(o *pb.Member) bool { return o.ID == st.Header.MemberId }) ||
		st.Header.ClusterId != ml.Header.ClusterId {
		t.Errorf("Status header (cluster %x member %x) disagrees with MemberList (cluster %x member %x)",
			st.Header.ClusterId, st.Header.MemberId, ml.Header.ClusterId, m.ID)
	}
	// A serializable MemberList works too (etcd 3.4 ignores the flag).
	_, err = cli.MemberList(ctxT(t), clientv3.WithSerializable())
	requireOK(t, "serializable MemberList", err)
}
