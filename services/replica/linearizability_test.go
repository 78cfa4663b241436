package replica

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	raftpb "go.etcd.io/raft/v3/raftpb"

	"github.com/kvmesh/kvmesh/libs/linearizable"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// TestLinearizableUnderPartitionsAndRestarts runs concurrent clients (puts, linearizable
// gets, compare-and-swap txns, each through a random member) against a three-member
// cluster over slow, reordering links while members are partitioned away, healed,
// stopped and restarted, and checks
// the recorded history with porcupine. A history that is not linearizable is kept as a
// visualization under the test's output directory.
func TestLinearizableUnderPartitionsAndRestarts(t *testing.T) {
	members := startCluster(t, 3)
	leader(t, members)
	for _, m := range members {
		slowLinks(m)
	}
	var live sync.RWMutex // held for reading while a client picks a member
	w := &linearizable.Workload{Keys: []string{"a", "b", "c"}, Clients: 6, Seed: 42, Timeout: 2 * time.Second,
		Do: func(ctx context.Context, c int, in linearizable.Input) (linearizable.Output, error) {
			live.RLock()
			var running []*member
			for _, m := range members {
				if m.r != nil {
					running = append(running, m)
				}
			}
			kv := running[rand.IntN(len(running))].kv
			live.RUnlock()
			return runOp(ctx, kv, in)
		}}
	w.Start()

	// Faults: partition each member away in turn, then stop and restart one.
	for i, m := range members {
		time.Sleep(400 * time.Millisecond)
		partition(members, m)
		time.Sleep(800 * time.Millisecond)
		heal(members)
		if i == 1 {
			time.Sleep(300 * time.Millisecond)
			live.Lock()
			m.stop(t)
			live.Unlock()
			time.Sleep(800 * time.Millisecond)
			live.Lock()
			m.start(t)
			slowLinks(m)
			live.Unlock()
		}
	}
	time.Sleep(500 * time.Millisecond)
	checkHistory(t, w, 100, "linearizability-history.html")
}

// slowLinks delays a fifth of m's outgoing Raft messages by up to 30ms, which also
// reorders them.
func slowLinks(m *member) {
	delay := func(*raftpb.Message) time.Duration {
		if rand.IntN(5) == 0 {
			return time.Duration(rand.IntN(30)) * time.Millisecond
		}
		return 0
	}
	m.r.peers.delay.Store(&delay)
}

// checkHistory stops the workload and requires its history to be linearizable with at
// least minKnown operations of known outcome; a failing history is kept (under
// KVMESH_ARTIFACTS when set).
func checkHistory(t *testing.T, w *linearizable.Workload, minKnown int, name string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if dir := os.Getenv("KVMESH_ARTIFACTS"); dir != "" {
		path = filepath.Join(dir, name)
	}
	res, ops, known, err := w.Stop(60*time.Second, path)
	t.Logf("%d operations (%d with known outcome) checked: %s", ops, known, res)
	if known < minKnown {
		t.Fatalf("only %d operations completed: the history proves little", known)
	}
	if res != porcupine.Ok {
		t.Fatalf("history is %s; visualization in %s (%v)", res, path, err)
	}
}

func runOp(ctx context.Context, kv interface {
	Range(context.Context, *pb.RangeRequest) (*pb.RangeResponse, error)
	Put(context.Context, *pb.PutRequest) (*pb.PutResponse, error)
	Txn(context.Context, *pb.TxnRequest) (*pb.TxnResponse, error)
}, in linearizable.Input) (linearizable.Output, error) {
	switch in.Op {
	case "get":
		r, err := kv.Range(ctx, &pb.RangeRequest{Key: []byte(in.Key)})
		if err != nil {
			return linearizable.Output{}, err
		}
		if len(r.GetKvs()) == 0 {
			return linearizable.Output{}, nil
		}
		return linearizable.Output{Value: string(r.GetKvs()[0].GetValue())}, nil
	case "put":
		_, err := kv.Put(ctx, &pb.PutRequest{Key: []byte(in.Key), Value: []byte(in.Value)})
		return linearizable.Output{}, err
	default:
		cmp := &pb.Compare{Key: []byte(in.Key), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL,
			TargetUnion: &pb.Compare_Value{Value: []byte(in.Expected)}}
		if in.Expected == "" {
			// The register's empty state is an absent key: compare its version with 0.
			cmp = &pb.Compare{Key: []byte(in.Key), Target: pb.Compare_VERSION, Result: pb.Compare_EQUAL,
				TargetUnion: &pb.Compare_Version{Version: 0}}
		}
		r, err := kv.Txn(ctx, &pb.TxnRequest{
			Compare: []*pb.Compare{cmp},
			Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(in.Key), Value: []byte(in.Value)}}}},
		})
		if err != nil {
			return linearizable.Output{}, err
		}
		return linearizable.Output{OK: r.GetSucceeded()}, nil
	}
}
