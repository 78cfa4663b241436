package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// opsQuotaBytes is the backend quota both servers run with in
// TestDifferentialMaintenance: small, so that 100 KB values reach it fast.
const opsQuotaBytes = 4 << 20

// TestDifferentialMaintenance runs the operator's half of etcd on the target and on a
// reference etcd side by side, with the same small backend quota, and requires the same
// answers: the NOSPACE alarm raised when the quota is reached (listed with the member
// that raised it, shown in Status), the refusal of puts, txns with puts and lease
// grants with etcd's error, what still works under the alarm (reads, deletes,
// read-only and delete-only txns, lease revokes, compaction, defragmentation,
// snapshots), etcdctl's alarm and defrag output, disarming once space is back, nothing
// acknowledged lost, and (against etcd 3.6 or later) the answers to Downgrade.
func TestDifferentialMaintenance(t *testing.T) {
	t.Parallel()
	kind := harness.MustTarget(t)
	quota := fmt.Sprint(opsQuotaBytes)
	target := harness.Start(t, kind, harness.Options{Name: "ops-target",
		Env: []string{"KVMESH_REPLICA_QUOTA_BACKEND_BYTES=" + quota}, Args: etcdQuotaArgs(kind, quota)})
	oracle := harness.StartEtcd(t, harness.Options{Name: "ops-oracle", Args: etcdQuotaArgs(harness.KindEtcd, quota)})
	servers := []*opsServer{newOpsServer(t, string(kind), target), newOpsServer(t, "etcd(oracle)", oracle)}

	// same runs step on both servers and requires the same description of the outcome.
	same := func(step string, fn func(s *opsServer) string) []string {
		t.Helper()
		out := make([]string, len(servers))
		for i, s := range servers {
			out[i] = fn(s)
		}
		if out[0] != out[1] {
			t.Fatalf("%s differs:\n  %-14s %s\n  %-14s %s", step, servers[0].name+":", out[0], servers[1].name+":", out[1])
		}
		t.Logf("%s: %s", step, out[0])
		return out
	}

	same("alarm list before", func(s *opsServer) string { return s.alarms() })
	same("etcdctl alarm list before", func(s *opsServer) string { return s.ctl("alarm", "list") })
	same("lease grant before", func(s *opsServer) string {
		l, err := s.cli.Grant(ctxT(t), 600)
		if err != nil {
			return errDesc(err)
		}
		s.lease = l.ID
		_, err = s.cli.Put(ctxT(t), "ops/leased", "v", clientv3.WithLease(l.ID))
		return errDesc(err)
	})

	// Fill until the quota refuses a put.
	value := strings.Repeat("x", 100<<10)
	same("filling to the quota", func(s *opsServer) string {
		for i := range 400 {
			_, err := s.cli.Put(ctxT(t), fmt.Sprintf("ops/fill/%04d", i), value)
			if err != nil {
				return errDesc(err)
			}
			s.acked++
		}
		return "the quota never refused a put"
	})
	for _, s := range servers {
		t.Logf("%s acknowledged %d puts of 100 KB before NOSPACE", s.name, s.acked)
	}
	same("alarm list under NOSPACE", func(s *opsServer) string { return s.alarms() })
	same("etcdctl alarm list under NOSPACE", func(s *opsServer) string {
		return strings.ReplaceAll(s.ctl("alarm", "list"), fmt.Sprint(s.member()), "<member>")
	})
	same("Status errors under NOSPACE", func(s *opsServer) string {
		st, err := s.cli.Status(ctxT(t), s.srv.Endpoint())
		if err != nil {
			return errDesc(err)
		}
		var errs []string
		for _, e := range st.Errors {
			// etcd prints its alarms in its protobuf's text form, whose spacing varies
			// (a trailing space in 3.4; protobuf-go randomizes it in 3.6+ to stop byte
			// comparisons): the words are compared.
			e = strings.Join(strings.Fields(e), " ")
			errs = append(errs, strings.ReplaceAll(e, fmt.Sprint(st.Header.MemberId), "<member>"))
		}
		return strings.Join(errs, "; ")
	})

	// Refused under NOSPACE, with etcd's error.
	same("put under NOSPACE", func(s *opsServer) string { _, err := s.cli.Put(ctxT(t), "ops/more", "v"); return errDesc(err) })
	same("txn with a put under NOSPACE", func(s *opsServer) string {
		_, err := s.cli.Txn(ctxT(t)).Then(clientv3.OpGet("ops/leased"), clientv3.OpPut("ops/more", "v")).Commit()
		return errDesc(err)
	})
	same("lease grant under NOSPACE", func(s *opsServer) string { _, err := s.cli.Grant(ctxT(t), 60); return errDesc(err) })

	// Still served under NOSPACE.
	same("range under NOSPACE", func(s *opsServer) string {
		r, err := s.cli.Get(ctxT(t), "ops/fill/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return errDesc(err)
		}
		return fmt.Sprintf("count equals the acknowledged puts: %v", r.Count == s.acked)
	})
	same("serializable range under NOSPACE", func(s *opsServer) string {
		_, err := s.cli.Get(ctxT(t), "ops/leased", clientv3.WithSerializable())
		return errDesc(err)
	})
	same("read-only txn under NOSPACE", func(s *opsServer) string {
		_, err := s.cli.Txn(ctxT(t)).Then(clientv3.OpGet("ops/leased")).Commit()
		return errDesc(err)
	})
	same("delete-only txn under NOSPACE", func(s *opsServer) string {
		r, err := s.cli.Txn(ctxT(t)).Then(clientv3.OpDelete("ops/fill/0000")).Commit()
		if err != nil {
			return errDesc(err)
		}
		return fmt.Sprintf("deleted %d", r.Responses[0].GetResponseDeleteRange().Deleted)
	})
	same("lease revoke under NOSPACE", func(s *opsServer) string { _, err := s.cli.Revoke(ctxT(t), s.lease); return errDesc(err) })
	same("snapshot under NOSPACE", func(s *opsServer) string {
		rc, err := s.cli.Snapshot(ctxT(t))
		if err != nil {
			return errDesc(err)
		}
		defer rc.Close()
		var b bytes.Buffer
		if _, err := b.ReadFrom(rc); err != nil {
			return errDesc(err)
		}
		return fmt.Sprintf("size %% 512 = %d", b.Len()%512)
	})

	// Space back: delete, compact, defragment; then disarm.
	same("delete the fill under NOSPACE", func(s *opsServer) string {
		r, err := s.cli.Delete(ctxT(t), "ops/fill/", clientv3.WithPrefix())
		if err != nil {
			return errDesc(err)
		}
		s.rev = r.Header.Revision
		return fmt.Sprintf("deleted the rest: %v", r.Deleted == s.acked-1)
	})
	same("compact under NOSPACE", func(s *opsServer) string {
		_, err := s.cli.Compact(ctxT(t), s.rev, clientv3.WithCompactPhysical())
		return errDesc(err)
	})
	same("etcdctl defrag", func(s *opsServer) string {
		return strings.ReplaceAll(s.ctl("defrag"), s.srv.Endpoint(), "<endpoint>")
	})
	same("etcdctl defrag --cluster", func(s *opsServer) string {
		ml, err := s.cli.MemberList(ctxT(t))
		if err != nil {
			return errDesc(err)
		}
		out, err := s.ctlOutput("defrag", "--cluster")
		for _, m := range ml.Members {
			for _, u := range m.ClientURLs {
				out = strings.ReplaceAll(out, u, "<member>")
			}
		}
		// One line per member: a mesh's three say the same.
		lines := strings.Split(out, "\n")
		slices.Sort(lines)
		return fmt.Sprintf("%q (%v)", slices.Compact(lines), err)
	})
	same("dbSize after defrag", func(s *opsServer) string {
		st, err := s.cli.Status(ctxT(t), s.srv.Endpoint())
		if err != nil {
			return errDesc(err)
		}
		return fmt.Sprintf("below the quota: %v, in use at most the size: %v", st.DbSize < opsQuotaBytes, st.DbSizeInUse <= st.DbSize)
	})
	same("etcdctl alarm disarm", func(s *opsServer) string {
		return strings.ReplaceAll(s.ctl("alarm", "disarm"), fmt.Sprint(s.member()), "<member>")
	})
	same("alarm list after disarm", func(s *opsServer) string { return s.alarms() })
	same("put after disarm", func(s *opsServer) string { _, err := s.cli.Put(ctxT(t), "ops/after", "v"); return errDesc(err) })
	same("disarm with no alarm", func(s *opsServer) string {
		r, err := s.cli.AlarmDisarm(ctxT(t), &clientv3.AlarmMember{MemberID: s.member(), Alarm: pb.AlarmType_NOSPACE})
		if err != nil {
			return errDesc(err)
		}
		return fmt.Sprintf("%d alarms", len(r.Alarms))
	})

	if etcdAtLeast(3, 6) {
		m := func(s *opsServer) pb.MaintenanceClient { return pb.NewMaintenanceClient(s.cli.ActiveConnection()) }
		for _, v := range []string{"abc", "", "3.4", "3.7.0", "4.0"} {
			same("downgrade validate "+v, func(s *opsServer) string {
				_, err := m(s).Downgrade(ctxT(t), &pb.DowngradeRequest{Action: pb.DowngradeRequest_VALIDATE, Version: v})
				return errDesc(err)
			})
		}
		same("downgrade cancel", func(s *opsServer) string {
			_, err := m(s).Downgrade(ctxT(t), &pb.DowngradeRequest{Action: pb.DowngradeRequest_CANCEL})
			return errDesc(err)
		})
	}
}

// ctlTimeout bounds one etcdctl run.
const ctlTimeout = 30 * time.Second

// etcdAtLeast tells whether the oracle etcd is at least version major.minor.
func etcdAtLeast(major, minor int) bool {
	var ma, mi int
	_, v, _ := strings.Cut(harness.EtcdVersion(), "Version:")
	if _, err := fmt.Sscanf(strings.TrimSpace(v), "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || (ma == major && mi >= minor)
}

// etcdQuotaArgs is etcd's flag for the quota (kvmesh takes its variable).
func etcdQuotaArgs(kind harness.Kind, quota string) []string {
	if kind != harness.KindEtcd {
		return nil
	}
	return []string{"--quota-backend-bytes=" + quota}
}

type opsServer struct {
	t     *testing.T
	name  string
	srv   *harness.Server
	cli   *clientv3.Client
	lease clientv3.LeaseID
	acked int64
	rev   int64
}

func newOpsServer(t *testing.T, name string, srv *harness.Server) *opsServer {
	return &opsServer{t: t, name: name, srv: srv, cli: etcdclient.NewClient(t, srv)}
}

// member is the ID of the member that answers the server's Status (a mesh gateway's:
// the leader's).
func (s *opsServer) member() uint64 {
	st, err := s.cli.Status(ctxT(s.t), s.srv.Endpoint())
	if err != nil {
		s.t.Fatalf("%s: Status: %v", s.name, err)
	}
	return st.Header.MemberId
}

// alarms describes the active alarms, the member that raised each named by whether it
// is the one answering Status.
func (s *opsServer) alarms() string {
	r, err := s.cli.AlarmList(ctxT(s.t))
	if err != nil {
		return errDesc(err)
	}
	self := s.member()
	var out []string
	for _, a := range r.Alarms {
		out = append(out, fmt.Sprintf("%s of member self=%v", a.Alarm, a.MemberID == self))
	}
	return fmt.Sprintf("%d alarms %v", len(r.Alarms), out)
}

// ctl runs Debian's etcdctl against the server and describes its output (stdout) and
// a failure's exit status.
func (s *opsServer) ctl(args ...string) string {
	out, err := s.ctlOutput(args...)
	if err != nil {
		return fmt.Sprintf("%q (%v)", out, err)
	}
	return fmt.Sprintf("%q", out)
}

// ctlOutput runs Debian's etcdctl against the server and returns its trimmed stdout.
func (s *opsServer) ctlOutput(args ...string) (string, error) {
	bin, err := harness.EtcdctlBinary()
	if err != nil {
		harness.SkipOrFail(s.t, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--endpoints=" + s.srv.Endpoint()}, args...)...)
	cmd.Env = append(cmd.Environ(), "ETCDCTL_API=3")
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	err = cmd.Run()
	return strings.TrimSpace(stdout.String()), err
}
