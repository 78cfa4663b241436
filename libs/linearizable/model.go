// Package linearizable holds the model kvmesh's linearizability tests check histories
// against with porcupine (github.com/anishathalye/porcupine): in-process cluster tests
// and black-box tests of real processes record operations on a few keys and must
// produce the same kind of history.
package linearizable

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anishathalye/porcupine"
)

// Register is the model: one key's value ("" when absent), with put, get and
// compare-and-swap (a txn comparing the value). An operation whose outcome is unknown
// (it failed or timed out, so it may or may not have been applied) may take effect at
// any point after its call, or never: porcupine's nondeterministic model with
// unknown operations returning at the end of the history.
type Input struct {
	Op       string // "get", "put", "cas"
	Key      string
	Value    string
	Expected string // cas: the value compared
}

type Output struct {
	Value   string // get: what was read
	OK      bool   // cas: whether the compare held
	Unknown bool   // the operation failed or timed out: it may or may not have happened
}

var Register = porcupine.NondeterministicModel{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(Input).Key
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
		s, in, out := state.(string), input.(Input), output.(Output)
		switch in.Op {
		case "get":
			if out.Value == s {
				return []interface{}{s}
			}
			return nil
		case "put":
			if out.Unknown {
				return []interface{}{s, in.Value}
			}
			return []interface{}{in.Value}
		case "cas":
			switch {
			case out.Unknown && s == in.Expected:
				return []interface{}{s, in.Value}
			case out.Unknown:
				return []interface{}{s}
			case out.OK && s == in.Expected:
				return []interface{}{in.Value}
			case !out.OK && s != in.Expected:
				return []interface{}{s}
			}
			return nil
		}
		return nil
	},
	Equal: func(a, b interface{}) bool { return a == b },
	DescribeOperation: func(input, output interface{}) string {
		in, out := input.(Input), output.(Output)
		switch {
		case out.Unknown:
			return fmt.Sprintf("%s(%s,%q,%q) = ?", in.Op, in.Key, in.Value, in.Expected)
		case in.Op == "get":
			return fmt.Sprintf("get(%s) = %q", in.Key, out.Value)
		case in.Op == "cas":
			return fmt.Sprintf("cas(%s, %q→%q) = %v", in.Key, in.Expected, in.Value, out.OK)
		}
		return fmt.Sprintf("put(%s, %q)", in.Key, in.Value)
	},
}

// Workload runs concurrent clients doing random register operations (40% gets, 40%
// puts of unique values, 20% compare-and-swaps) on Keys, and records the history.
type Workload struct {
	Keys    []string
	Clients int
	Seed    uint64
	// Timeout bounds each operation.
	Timeout time.Duration
	// Do runs one operation for a client. A failed get is dropped from the history
	// (it had no effect); a failed put or cas has an unknown outcome.
	Do func(ctx context.Context, client int, in Input) (Output, error)

	mu      sync.Mutex
	history []porcupine.Operation
	stop    atomic.Bool
	wg      sync.WaitGroup
	seq     atomic.Int64
	start   time.Time
}

// Start starts the clients.
func (w *Workload) Start() {
	w.start = time.Now()
	for c := range w.Clients {
		w.wg.Add(1)
		go w.client(c)
	}
}

func (w *Workload) client(c int) {
	defer w.wg.Done()
	rng := rand.New(rand.NewPCG(uint64(c), w.Seed))
	for !w.stop.Load() {
		in := Input{Key: w.Keys[rng.IntN(len(w.Keys))]}
		switch p := rng.IntN(10); {
		case p < 4:
			in.Op = "get"
		case p < 8:
			in.Op, in.Value = "put", fmt.Sprint(w.seq.Add(1))
		default:
			in.Op, in.Value, in.Expected = "cas", fmt.Sprint(w.seq.Add(1)), fmt.Sprint(rng.Int64N(w.seq.Load()+1))
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.Timeout)
		call := int64(time.Since(w.start))
		out, err := w.Do(ctx, c, in)
		ret := int64(time.Since(w.start))
		cancel()
		if err != nil {
			if in.Op == "get" {
				continue
			}
			out, ret = Output{Unknown: true}, 1<<62
		}
		w.mu.Lock()
		w.history = append(w.history, porcupine.Operation{ClientId: c, Input: in, Call: call, Output: out, Return: ret})
		w.mu.Unlock()
	}
}

// Stop stops the clients, waits for them, and checks the history with porcupine
// within timeout. known is how many operations had a known outcome. When the history
// is not linearizable, its visualization is written to visualization.
func (w *Workload) Stop(timeout time.Duration, visualization string) (res porcupine.CheckResult, ops, known int, err error) {
	w.stop.Store(true)
	w.wg.Wait()
	model := Register.ToModel()
	res, info := porcupine.CheckOperationsVerbose(model, w.history, timeout)
	for _, op := range w.history {
		if !op.Output.(Output).Unknown {
			known++
		}
	}
	if res != porcupine.Ok {
		err = porcupine.VisualizePath(model, info, visualization)
	}
	return res, len(w.history), known, err
}
