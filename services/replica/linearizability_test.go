package replica

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/anishathalye/porcupine"

	"github.com/kvmesh/kvmesh/libs/linearizable"

	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
)

// TestLinearizableUnderPartitionsAndRestarts runs concurrent clients (puts, linearizable
// gets, compare-and-swap txns, each through a random member) against a three-member
// cluster while members are partitioned away, healed, stopped and restarted, and checks
// the recorded history with porcupine. A history that is not linearizable is kept as a
// visualization under the test's output directory.
func TestLinearizableUnderPartitionsAndRestarts(t *testing.T) {
	members := startCluster(t, 3)
	leader(t, members)
	var (
		mu      sync.Mutex
		history []porcupine.Operation
		stop    atomic.Bool
		wg      sync.WaitGroup
		seq     atomic.Int64
	)
	start := time.Now()
	now := func() int64 { return int64(time.Since(start)) }
	keys := []string{"a", "b", "c"}
	var live sync.RWMutex // held for reading while a client picks a member
	for c := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 42))
			for !stop.Load() {
				live.RLock()
				var running []*member
				for _, m := range members {
					if m.r != nil {
						running = append(running, m)
					}
				}
				m := running[rng.IntN(len(running))]
				kv := m.kv
				live.RUnlock()
				in := linearizable.Input{Key: keys[rng.IntN(len(keys))]}
				switch p := rng.IntN(10); {
				case p < 4:
					in.Op = "get"
				case p < 8:
					in.Op, in.Value = "put", fmt.Sprint(seq.Add(1))
				default:
					in.Op, in.Value, in.Expected = "cas", fmt.Sprint(seq.Add(1)), fmt.Sprint(rng.Int64N(seq.Load()+1))
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				call := now()
				out, err := runOp(ctx, kv, in)
				ret := now()
				cancel()
				if err != nil {
					if in.Op == "get" {
						continue // a failed read has no effect
					}
					out, ret = linearizable.Output{Unknown: true}, 1<<62
				}
				mu.Lock()
				history = append(history, porcupine.Operation{ClientId: c, Input: in, Call: call, Output: out, Return: ret})
				mu.Unlock()
			}
		}()
	}

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
			live.Unlock()
		}
	}
	time.Sleep(500 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	model := linearizable.Register.ToModel()
	res, info := porcupine.CheckOperationsVerbose(model, history, 60*time.Second)
	known := 0
	for _, op := range history {
		if !op.Output.(linearizable.Output).Unknown {
			known++
		}
	}
	t.Logf("%d operations (%d with known outcome) checked: %s", len(history), known, res)
	if known < 100 {
		t.Fatalf("only %d operations completed: the history proves little", known)
	}
	if res != porcupine.Ok {
		path := filepath.Join(t.TempDir(), "history.html")
		if dir := os.Getenv("KVMESH_ARTIFACTS"); dir != "" {
			path = filepath.Join(dir, "linearizability-history.html")
		}
		porcupine.VisualizePath(model, info, path)
		t.Fatalf("history is %s; visualization in %s", res, path)
	}
}

func runOp(ctx context.Context, kv interface {
	Range(context.Context, *connect.Request[pb.RangeRequest]) (*connect.Response[pb.RangeResponse], error)
	Put(context.Context, *connect.Request[pb.PutRequest]) (*connect.Response[pb.PutResponse], error)
	Txn(context.Context, *connect.Request[pb.TxnRequest]) (*connect.Response[pb.TxnResponse], error)
}, in linearizable.Input) (linearizable.Output, error) {
	switch in.Op {
	case "get":
		r, err := kv.Range(ctx, connect.NewRequest(&pb.RangeRequest{Key: []byte(in.Key)}))
		if err != nil {
			return linearizable.Output{}, err
		}
		if len(r.Msg.GetKvs()) == 0 {
			return linearizable.Output{}, nil
		}
		return linearizable.Output{Value: string(r.Msg.GetKvs()[0].GetValue())}, nil
	case "put":
		_, err := kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte(in.Key), Value: []byte(in.Value)}))
		return linearizable.Output{}, err
	default:
		cmp := &pb.Compare{Key: []byte(in.Key), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL,
			TargetUnion: &pb.Compare_Value{Value: []byte(in.Expected)}}
		if in.Expected == "" {
			// The register's empty state is an absent key: compare its version with 0.
			cmp = &pb.Compare{Key: []byte(in.Key), Target: pb.Compare_VERSION, Result: pb.Compare_EQUAL,
				TargetUnion: &pb.Compare_Version{Version: 0}}
		}
		r, err := kv.Txn(ctx, connect.NewRequest(&pb.TxnRequest{
			Compare: []*pb.Compare{cmp},
			Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(in.Key), Value: []byte(in.Value)}}}},
		}))
		if err != nil {
			return linearizable.Output{}, err
		}
		return linearizable.Output{OK: r.Msg.GetSucceeded()}, nil
	}
}
