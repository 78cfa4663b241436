// Package linearizable holds the model kvmesh's linearizability tests check histories
// against with porcupine (github.com/anishathalye/porcupine): in-process cluster tests
// and black-box tests of real processes record operations on a few keys and must
// produce the same kind of history.
package linearizable

import (
	"fmt"

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
