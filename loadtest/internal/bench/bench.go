// Package bench is a load generator for the etcd v3 KV API, modelled on
// etcd's own `benchmark` tool. It talks gRPC over plaintext HTTP/2 (h2c)
// through connect-go, so it can drive kvmesh and a real etcd alike.
package bench

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/cheggaaa/pb/v3"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// Config holds the options shared by all benchmarks.
type Config struct {
	// Endpoints are host:port addresses; connections are spread over them
	// round-robin.
	Endpoints []string
	// Conns is the number of TCP connections; Clients the number of
	// concurrent request loops, spread round-robin over the connections.
	Conns   int
	Clients int
	// Total is the number of requests to send; 0 means unbounded, in which
	// case Duration must be set. With both set the run stops at whichever
	// limit is reached first.
	Total    int64
	Duration time.Duration
	// Timeout bounds each request.
	Timeout time.Duration
	// User and Password, when User is set, authenticate each connection once before
	// the run (as etcd's benchmark --user does); every request carries the token.
	User, Password string
	// TargetName is a free-form label copied into the report.
	TargetName string
	// Progress, if non-nil, receives a progress bar (meant for terminals).
	Progress io.Writer
}

func (c *Config) validate() error {
	switch {
	case len(c.Endpoints) == 0:
		return errors.New("at least one endpoint is required")
	case c.Conns < 1:
		return errors.New("conns must be >= 1")
	case c.Clients < 1:
		return errors.New("clients must be >= 1")
	case c.Total < 0:
		return errors.New("total must be >= 0")
	case c.Duration < 0:
		return errors.New("duration must be >= 0")
	case c.Total == 0 && c.Duration == 0:
		return errors.New("either total or duration must be set")
	case c.Timeout <= 0:
		return errors.New("timeout must be > 0")
	}
	return nil
}

// PutOptions configures the put benchmark.
type PutOptions struct {
	KeySize int // bytes per key
	ValSize int // bytes per value
	// KeySpaceSize bounds the key numbers: random keys are drawn from
	// [0, KeySpaceSize) (0 is treated as 1). Sequential keys use i for the
	// i-th request, modulo KeySpaceSize when KeySpaceSize > 0.
	KeySpaceSize   int64
	SequentialKeys bool
}

// keyCapacity is how many non-negative integers fit, varint-encoded as
// etcd's benchmark does, into keySize bytes.
func keyCapacity(keySize int) int64 {
	// A zig-zag varint of v >= 0 encodes 2v in 7 bits per byte.
	if bits := 7*keySize - 1; bits < 63 {
		return 1 << bits
	}
	return math.MaxInt64
}

// encodeKey writes n into a zeroed keySize-byte key, exactly like etcd's
// benchmark (binary.PutVarint into a fixed-size buffer).
func encodeKey(n int64, keySize int) []byte {
	k := make([]byte, keySize)
	binary.PutVarint(k, n)
	return k
}

// Put benchmarks KV.Put.
func Put(ctx context.Context, cfg Config, opts PutOptions) (*Report, error) {
	if opts.KeySize < 1 {
		return nil, errors.New("key-size must be >= 1")
	}
	if opts.ValSize < 0 {
		return nil, errors.New("val-size must be >= 0")
	}
	if opts.KeySpaceSize < 0 {
		return nil, errors.New("key-space-size must be >= 0")
	}
	space := opts.KeySpaceSize
	capacity := keyCapacity(opts.KeySize)
	if !opts.SequentialKeys && space == 0 {
		space = 1
	}
	if space > capacity {
		return nil, fmt.Errorf("key-space-size %d does not fit in key-size %d (max %d keys)", space, opts.KeySize, capacity)
	}
	if opts.SequentialKeys && space == 0 {
		if cfg.Total > capacity {
			return nil, fmt.Errorf("%d sequential keys do not fit in key-size %d (max %d keys)", cfg.Total, opts.KeySize, capacity)
		}
		space = capacity // only reachable in duration mode with tiny keys
	}

	// One random value shared by all requests, as in etcd's benchmark.
	val := make([]byte, opts.ValSize)
	if _, err := rand.Read(val); err != nil {
		return nil, err
	}
	params := map[string]any{
		"key_size": opts.KeySize, "val_size": opts.ValSize,
		"key_space_size": opts.KeySpaceSize, "sequential_keys": opts.SequentialKeys,
	}
	return run(ctx, cfg, "put", params, nil, func(int) requestFunc {
		rng := mrand.New(mrand.NewPCG(mrand.Uint64(), mrand.Uint64()))
		return func(ctx context.Context, c *conn, i int64) error {
			var n int64
			if opts.SequentialKeys {
				n = i % space
			} else {
				n = rng.Int64N(space)
			}
			req := &etcdserverpb.PutRequest{Key: encodeKey(n, opts.KeySize), Value: val}
			_, err := c.kv.Put(ctx, connect.NewRequest(req))
			return err
		}
	})
}

// RangeOptions configures the range benchmark.
type RangeOptions struct {
	Key      string
	RangeEnd string
	// Consistency is "l" (linearizable) or "s" (serializable).
	Consistency string
	Limit       int64
}

// Range benchmarks KV.Range.
func Range(ctx context.Context, cfg Config, opts RangeOptions) (*Report, error) {
	if opts.Consistency == "" {
		opts.Consistency = "l"
	}
	if opts.Consistency != "l" && opts.Consistency != "s" {
		return nil, fmt.Errorf("consistency must be l or s, got %q", opts.Consistency)
	}
	if opts.Limit < 0 {
		return nil, errors.New("limit must be >= 0")
	}
	params := map[string]any{
		"key": opts.Key, "consistency": opts.Consistency, "limit": opts.Limit,
	}
	if opts.RangeEnd != "" {
		params["range_end"] = opts.RangeEnd
	}
	return run(ctx, cfg, "range", params, nil, func(int) requestFunc {
		return func(ctx context.Context, c *conn, _ int64) error {
			req := &etcdserverpb.RangeRequest{
				Key:          []byte(opts.Key),
				Serializable: opts.Consistency == "s",
				Limit:        opts.Limit,
			}
			if opts.RangeEnd != "" {
				req.RangeEnd = []byte(opts.RangeEnd)
			}
			_, err := c.kv.Range(ctx, connect.NewRequest(req))
			return err
		}
	})
}

// requestFunc sends the i-th request of the run over c.
type requestFunc func(ctx context.Context, c *conn, i int64) error

// prepareFunc readies a client before the measured run starts (for example grants
// the leases it will keep alive).
type prepareFunc func(ctx context.Context, client int, c *conn) error

// clientResult is what one client goroutine collected, on its own (no lock per
// request): the latency of each successful request and when it completed (ends[i]
// for lats[i]), when each failed one completed, and the failures by error. The
// completion times, measured from the start of the run, make the timeline.
type clientResult struct {
	lats     []time.Duration
	ends     []time.Duration
	failEnds []time.Duration
	errs     map[errKey]int64
}

// run dials the connections, then has cfg.Clients goroutines pull request
// numbers from a shared counter until cfg.Total requests were issued, the
// duration elapsed, or ctx was cancelled. Cancelling ctx stops dispatching new
// requests; in-flight ones finish (bounded by cfg.Timeout) and the partial
// run is reported.
func run(ctx context.Context, cfg Config, op string, params map[string]any, prepare prepareFunc, newClient func(client int) requestFunc) (*Report, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	conns, err := dialConns(ctx, cfg.Endpoints, cfg.Conns, cfg.Timeout, cfg.User, cfg.Password)
	if err != nil {
		return nil, err
	}
	defer closeConns(conns)

	var (
		next atomic.Int64 // next request number to hand out
		stop atomic.Bool
	)
	reqCtx := context.WithoutCancel(ctx)
	results := make([]clientResult, cfg.Clients)
	fns := make([]requestFunc, cfg.Clients)
	for i := range fns {
		fns[i] = newClient(i)
	}
	if prepare != nil {
		if err := prepareAll(ctx, cfg, conns, prepare); err != nil {
			return nil, err
		}
	}

	var bar *pb.ProgressBar
	if cfg.Progress != nil {
		bar = startProgress(cfg.Progress, cfg.Total, cfg.Duration)
	}
	start := time.Now()
	var timer *time.Timer
	if cfg.Duration > 0 {
		timer = time.AfterFunc(cfg.Duration, func() { stop.Store(true) })
	}
	interrupted := context.AfterFunc(ctx, func() { stop.Store(true) })

	var wg sync.WaitGroup
	for c := 0; c < cfg.Clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cn := conns[c%len(conns)]
			send := fns[c]
			res := &results[c]
			res.errs = map[errKey]int64{}
			if cfg.Total > 0 {
				// Preallocate (bounded) so appends stay off the hot path.
				n := min(cfg.Total/int64(cfg.Clients)+1, 1<<18)
				res.lats = make([]time.Duration, 0, n)
				res.ends = make([]time.Duration, 0, n)
			}
			for !stop.Load() {
				i := next.Add(1) - 1
				if cfg.Total > 0 && i >= cfg.Total {
					return
				}
				rctx, cancel := context.WithTimeout(reqCtx, cfg.Timeout)
				t0 := time.Now()
				err := send(rctx, cn, i)
				d := time.Since(t0)
				cancel()
				end := t0.Sub(start) + d
				if err != nil {
					res.errs[classify(err)]++
					res.failEnds = append(res.failEnds, end)
				} else {
					res.lats = append(res.lats, d)
					res.ends = append(res.ends, end)
				}
				if bar != nil {
					bar.Increment()
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if timer != nil {
		timer.Stop()
	}
	wasInterrupted := !interrupted() // AfterFunc already ran => ctx was cancelled
	if bar != nil {
		bar.Finish()
	}

	var n, nf int
	for _, r := range results {
		n += len(r.lats)
		nf += len(r.failEnds)
	}
	lats := make([]time.Duration, 0, n)
	ends := make([]time.Duration, 0, n)
	failEnds := make([]time.Duration, 0, nf)
	errs := map[errKey]int64{}
	for _, r := range results {
		lats = append(lats, r.lats...)
		ends = append(ends, r.ends...)
		failEnds = append(failEnds, r.failEnds...)
		for k, v := range r.errs {
			errs[k] += v
		}
	}
	// The timeline first: newReport sorts lats, which ends no longer match then.
	iv, timeline := newTimeline(lats, ends, failEnds, elapsed)
	rep := newReport(lats, errs, elapsed)
	rep.TimelineInterval = iv.Seconds()
	rep.Timeline = timeline
	rep.Target = cfg.TargetName
	rep.Op = op
	rep.Params = params
	rep.Endpoints = append([]string(nil), cfg.Endpoints...)
	rep.Conns = cfg.Conns
	rep.Clients = cfg.Clients
	rep.Interrupted = wasInterrupted
	return rep, nil
}

// prepareAll runs prepare for every client, a few hundred at a time.
func prepareAll(ctx context.Context, cfg Config, conns []*conn, prepare prepareFunc) error {
	sem := make(chan struct{}, 256)
	errc := make(chan error, cfg.Clients)
	var wg sync.WaitGroup
	for c := 0; c < cfg.Clients; c++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			pctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
			defer cancel()
			if err := prepare(pctx, c, conns[c%len(conns)]); err != nil {
				errc <- fmt.Errorf("preparing client %d: %w", c, err)
			}
		}()
	}
	wg.Wait()
	close(errc)
	return <-errc
}

// classify maps an error to its gRPC code and message.
func classify(err error) errKey {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return errKey{code: ce.Code().String(), msg: ce.Message()}
	}
	return errKey{code: connect.CodeOf(err).String(), msg: err.Error()}
}
