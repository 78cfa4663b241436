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

	pb "github.com/kvmesh/kvmesh/libs/gen/etcdserverpb"
)

// The register model: one key's value ("" when absent), with put, get and
// compare-and-swap (a txn comparing the value). An operation whose outcome is unknown
// (it failed or timed out, so it may or may not have been applied) may take effect at
// any point after its call, or never: porcupine's nondeterministic model with
// unknown operations returning at the end of the history.
type regInput struct {
	op       string // "get", "put", "cas"
	key      string
	value    string
	expected string // cas: the value compared
}

type regOutput struct {
	value   string // get: what was read
	ok      bool   // cas: whether the compare held
	unknown bool
}

var registerModel = porcupine.NondeterministicModel{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(regInput).key
			byKey[k] = append(byKey[k], op)
		}
		var out [][]porcupine.Operation
		for _, ops := range byKey {
			out = append(out, ops)
		}
		return out
	},
	Init: func() []interface{} { return []interface{}{""} },
	Step: func(state, input, output interface{}) []interface{} {
		s, in, out := state.(string), input.(regInput), output.(regOutput)
		switch in.op {
		case "get":
			if out.value == s {
				return []interface{}{s}
			}
			return nil
		case "put":
			if out.unknown {
				return []interface{}{s, in.value}
			}
			return []interface{}{in.value}
		case "cas":
			switch {
			case out.unknown && s == in.expected:
				return []interface{}{s, in.value}
			case out.unknown:
				return []interface{}{s}
			case out.ok && s == in.expected:
				return []interface{}{in.value}
			case !out.ok && s != in.expected:
				return []interface{}{s}
			}
			return nil
		}
		return nil
	},
	Equal: func(a, b interface{}) bool { return a == b },
	DescribeOperation: func(input, output interface{}) string {
		in, out := input.(regInput), output.(regOutput)
		switch {
		case out.unknown:
			return fmt.Sprintf("%s(%s,%q,%q) = ?", in.op, in.key, in.value, in.expected)
		case in.op == "get":
			return fmt.Sprintf("get(%s) = %q", in.key, out.value)
		case in.op == "cas":
			return fmt.Sprintf("cas(%s, %q→%q) = %v", in.key, in.expected, in.value, out.ok)
		}
		return fmt.Sprintf("put(%s, %q)", in.key, in.value)
	},
}

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
				in := regInput{key: keys[rng.IntN(len(keys))]}
				switch p := rng.IntN(10); {
				case p < 4:
					in.op = "get"
				case p < 8:
					in.op, in.value = "put", fmt.Sprint(seq.Add(1))
				default:
					in.op, in.value, in.expected = "cas", fmt.Sprint(seq.Add(1)), fmt.Sprint(rng.Int64N(seq.Load()+1))
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				call := now()
				out, err := runOp(ctx, kv, in)
				ret := now()
				cancel()
				if err != nil {
					if in.op == "get" {
						continue // a failed read has no effect
					}
					out, ret = regOutput{unknown: true}, 1<<62
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

	model := registerModel.ToModel()
	res, info := porcupine.CheckOperationsVerbose(model, history, 60*time.Second)
	known := 0
	for _, op := range history {
		if !op.Output.(regOutput).unknown {
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
}, in regInput) (regOutput, error) {
	switch in.op {
	case "get":
		r, err := kv.Range(ctx, connect.NewRequest(&pb.RangeRequest{Key: []byte(in.key)}))
		if err != nil {
			return regOutput{}, err
		}
		if len(r.Msg.GetKvs()) == 0 {
			return regOutput{}, nil
		}
		return regOutput{value: string(r.Msg.GetKvs()[0].GetValue())}, nil
	case "put":
		_, err := kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte(in.key), Value: []byte(in.value)}))
		return regOutput{}, err
	default:
		cmp := &pb.Compare{Key: []byte(in.key), Target: pb.Compare_VALUE, Result: pb.Compare_EQUAL,
			TargetUnion: &pb.Compare_Value{Value: []byte(in.expected)}}
		if in.expected == "" {
			// The register's empty state is an absent key: compare its version with 0.
			cmp = &pb.Compare{Key: []byte(in.key), Target: pb.Compare_VERSION, Result: pb.Compare_EQUAL,
				TargetUnion: &pb.Compare_Version{Version: 0}}
		}
		r, err := kv.Txn(ctx, connect.NewRequest(&pb.TxnRequest{
			Compare: []*pb.Compare{cmp},
			Success: []*pb.RequestOp{{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte(in.key), Value: []byte(in.value)}}}},
		}))
		if err != nil {
			return regOutput{}, err
		}
		return regOutput{ok: r.Msg.GetSucceeded()}, nil
	}
}
