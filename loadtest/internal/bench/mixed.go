package bench

import (
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"

	"connectrpc.com/connect"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// MixedOptions configures the mixed benchmark: each request is a get, put, CAS or
// delete of a random key, drawn with the given weights.
type MixedOptions struct {
	KeySize, ValSize int
	KeySpaceSize     int64
	// Weights of the operations (their sum need not be 100).
	Get, Put, CAS, Delete int
}

// Mixed benchmarks a workload of gets (linearizable ranges of one key), puts, CAS
// txns (put if the key holds the benchmark's value) and deletes, as a configuration
// store sees it.
func Mixed(ctx context.Context, cfg Config, opts MixedOptions) (*Report, error) {
	switch {
	case opts.KeySize < 1:
		return nil, errors.New("key-size must be >= 1")
	case opts.ValSize < 0:
		return nil, errors.New("val-size must be >= 0")
	case opts.KeySpaceSize < 1:
		return nil, errors.New("key-space-size must be >= 1")
	case opts.KeySpaceSize > keyCapacity(opts.KeySize):
		return nil, fmt.Errorf("key-space-size %d does not fit in key-size %d", opts.KeySpaceSize, opts.KeySize)
	case opts.Get < 0 || opts.Put < 0 || opts.CAS < 0 || opts.Delete < 0 || opts.Get+opts.Put+opts.CAS+opts.Delete == 0:
		return nil, errors.New("the operation weights must be >= 0 and not all 0")
	}
	// The same value in every run, so a CAS finds what an earlier run put.
	val := make([]byte, opts.ValSize)
	fill := mrand.NewChaCha8([32]byte{'k', 'v', 'm', 'e', 's', 'h'})
	fill.Read(val)
	params := map[string]any{
		"key_size": opts.KeySize, "val_size": opts.ValSize, "key_space_size": opts.KeySpaceSize,
		"get": opts.Get, "put": opts.Put, "cas": opts.CAS, "delete": opts.Delete,
	}
	total := opts.Get + opts.Put + opts.CAS + opts.Delete
	return run(ctx, cfg, "mixed", params, nil, func(int) requestFunc {
		rng := mrand.New(mrand.NewPCG(mrand.Uint64(), mrand.Uint64()))
		return func(ctx context.Context, c *conn, _ int64) error {
			key := encodeKey(rng.Int64N(opts.KeySpaceSize), opts.KeySize)
			var err error
			switch p := rng.IntN(total); {
			case p < opts.Get:
				_, err = c.kv.Range(ctx, connect.NewRequest(&etcdserverpb.RangeRequest{Key: key}))
			case p < opts.Get+opts.Put:
				_, err = c.kv.Put(ctx, connect.NewRequest(&etcdserverpb.PutRequest{Key: key, Value: val}))
			case p < opts.Get+opts.Put+opts.CAS:
				_, err = c.kv.Txn(ctx, connect.NewRequest(&etcdserverpb.TxnRequest{
					Compare: []*etcdserverpb.Compare{{
						Key: key, Target: etcdserverpb.Compare_VALUE, Result: etcdserverpb.Compare_EQUAL,
						TargetUnion: &etcdserverpb.Compare_Value{Value: val},
					}},
					Success: []*etcdserverpb.RequestOp{{Request: &etcdserverpb.RequestOp_RequestPut{
						RequestPut: &etcdserverpb.PutRequest{Key: key, Value: val}}}},
				}))
			default:
				_, err = c.kv.DeleteRange(ctx, connect.NewRequest(&etcdserverpb.DeleteRangeRequest{Key: key}))
			}
			return err
		}
	})
}
