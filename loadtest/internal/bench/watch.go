package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
)

// WatchOptions configures the watch benchmark: Watchers watches over Streams Watch
// streams (spread round-robin over the connections), then one step per rate in
// Rates, each putting watched keys at that rate for Step and waiting up to Drain for
// every event the puts caused.
type WatchOptions struct {
	Watchers int
	Streams  int
	// Hot puts every watch on one key; otherwise watch i is on its own key i and each
	// put writes a random watched key.
	Hot     bool
	Prefix  string
	ValSize int
	// Writers is how many put loops share the rate.
	Writers int
	Rates   []float64
	Step    time.Duration
	Drain   time.Duration
	// Settle is how long the watches stay idle before the servers' memory is read.
	Settle time.Duration
	// MaxP99, when set, ends the run after the first step whose p99 delivery latency
	// exceeds it (the server no longer keeps up; higher rates only queue more).
	MaxP99 time.Duration
	// ServerPIDs are the processes whose resident memory is read before the watches
	// are created and after they settled (Linux /proc).
	ServerPIDs []int
	// FromPast creates every watch with a start revision (the revision before the
	// run), as Kubernetes reflectors do, rather than from now on.
	FromPast bool
	// CoreMetrics are /metrics URLs of the consensus core (kvmesh's replicas) and
	// CorePIDs its processes: their RPCs (grpc_server_started_total, by method) and CPU
	// are read over an idle window as long as IdleWindow, then over the creation.
	CoreMetrics []string
	CorePIDs    []int
	IdleWindow  time.Duration
}

// WatchReport is the outcome of one watch benchmark run.
type WatchReport struct {
	Target    string   `json:"target,omitempty"`
	Scenario  string   `json:"scenario"`
	Endpoints []string `json:"endpoints"`
	Conns     int      `json:"conns"`
	Watchers  int      `json:"watchers"`
	Streams   int      `json:"streams"`
	// CreateSeconds is the time from the first create request to the last created
	// response.
	CreateSeconds float64         `json:"create_seconds"`
	Memory        []ProcessMemory `json:"memory,omitempty"`
	// BytesPerWatcher is the servers' resident memory growth over the idle watches,
	// divided by the number of watches (all ServerPIDs together).
	BytesPerWatcher float64     `json:"bytes_per_watcher,omitempty"`
	Steps           []WatchStep `json:"steps"`
	// Core is what the creation cost the core (with CoreMetrics, CorePIDs).
	Core *CoreCost `json:"core,omitempty"`
	// Canceled counts watches the server canceled during the run.
	Canceled    int64 `json:"canceled"`
	Interrupted bool  `json:"interrupted,omitempty"`
}

// CoreCost is the core's RPCs and CPU while the watches were created, beside the same
// over an idle window before.
type CoreCost struct {
	IdleSeconds      float64            `json:"idle_seconds"`
	IdleCalls        map[string]float64 `json:"idle_calls"`
	IdleCPUSeconds   float64            `json:"idle_cpu_seconds"`
	CreateSeconds    float64            `json:"create_seconds"`
	CreateCalls      map[string]float64 `json:"create_calls"`
	CreateCPUSeconds float64            `json:"create_cpu_seconds"`
	CallsAboveIdle   float64            `json:"calls_above_idle"`
}

// coreSample is the core's RPC counts by method and CPU seconds at one moment.
type coreSample struct {
	calls map[string]float64
	cpu   float64
}

func sampleCore(ctx context.Context, opts WatchOptions) (coreSample, error) {
	s := coreSample{calls: map[string]float64{}}
	for _, u := range opts.CoreMetrics {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return s, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return s, fmt.Errorf("core metrics %s: %w", u, err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return s, err
		}
		for _, line := range strings.Split(string(body), "\n") {
			rest, ok := strings.CutPrefix(line, "grpc_server_started_total{")
			if !ok {
				continue
			}
			labels, value, _ := strings.Cut(rest, "} ")
			var service, method string
			for _, kv := range strings.Split(labels, ",") {
				k, v, _ := strings.Cut(kv, "=")
				switch v = strings.Trim(v, `"`); k {
				case "grpc_service":
					service = v
				case "grpc_method":
					method = v
				}
			}
			f, _ := strconv.ParseFloat(strings.TrimSpace(value), 64)
			s.calls[service+"/"+method] += f
		}
	}
	for _, pid := range opts.CorePIDs {
		sec, err := cpuSeconds(pid)
		if err != nil {
			return s, err
		}
		s.cpu += sec
	}
	return s, nil
}

func diffCalls(a, b coreSample) map[string]float64 {
	out := map[string]float64{}
	for k, v := range b.calls {
		if d := v - a.calls[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

// cpuSeconds is the user and system CPU time process pid has used (Linux /proc).
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The fields after the command's closing parenthesis; utime and stime are the
	// 14th and 15th of the line.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b)[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100, nil // clock ticks (USER_HZ, 100 on Linux)
}

// ProcessMemory is one server process's resident memory around the watch creation.
type ProcessMemory struct {
	PID         int   `json:"pid"`
	RSSBefore   int64 `json:"rss_before_bytes"`
	RSSWatching int64 `json:"rss_watching_bytes"`
}

// WatchStep is one rate step.
type WatchStep struct {
	TargetPutsPerSec float64 `json:"target_puts_per_sec"`
	Puts             int64   `json:"puts"`
	PutErrors        int64   `json:"put_errors"`
	PutsPerSec       float64 `json:"puts_per_sec"`
	// Expected events: puts × watches per put; Delivered: events received before the
	// drain deadline; Missing: the rest.
	Expected  int64 `json:"expected_events"`
	Delivered int64 `json:"delivered_events"`
	Missing   int64 `json:"missing_events"`
	// EventsPerSec is Delivered over the time from the step's first put to its last
	// event received.
	EventsPerSec float64 `json:"delivered_events_per_sec"`
	// Latencies (seconds) from a put's acknowledgement to the receipt of each of its
	// events; an event that arrives before its put's acknowledgement counts as 0.
	// Missing events count as later than any; a percentile among them is null.
	P50 *float64 `json:"p50_seconds"`
	P90 *float64 `json:"p90_seconds"`
	P99 *float64 `json:"p99_seconds"`
	Max *float64 `json:"max_seconds"`
}

// latHist is a log-linear latency histogram in nanoseconds: 16 buckets per power of
// two (at most 6% wide), so percentiles need no per-event storage.
type latHist struct {
	counts [1024]int64
	n      int64
	max    int64
}

func latBucket(ns int64) int {
	if ns < 16 {
		return int(max(ns, 0))
	}
	b := bits.Len64(uint64(ns))
	top := ns >> (b - 5) // 16..31
	return (b-4)*16 + int(top-16)
}

// latBucketUpper is the largest value in bucket i.
func latBucketUpper(i int) int64 {
	if i < 16 {
		return int64(i)
	}
	b := i/16 + 4
	top := int64(i%16 + 16)
	return (top+1)<<(b-5) - 1
}

func (h *latHist) add(ns int64) {
	h.counts[latBucket(ns)]++
	h.n++
	h.max = max(h.max, ns)
}

func (h *latHist) merge(o *latHist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the q-quantile (nearest rank, bucket upper bound) of the
// histogram's values together with missing values larger than all of them; false
// when it falls among the missing.
func (h *latHist) quantile(q float64, missing int64) (int64, bool) {
	total := h.n + missing
	if total == 0 {
		return 0, false
	}
	rank := int64(math.Ceil(q * float64(total)))
	rank = max(rank, 1)
	if rank > h.n {
		return 0, false
	}
	var seen int64
	for i, c := range h.counts {
		if seen += c; seen >= rank {
			return min(latBucketUpper(i), h.max), true
		}
	}
	return h.max, true
}

// watchResp is what the benchmark reads of a WatchResponse: decoding only these
// fields keeps the load generator's cost per event small, so that it measures the
// server rather than itself.
type watchResp struct {
	created  bool
	canceled bool
	reason   string
	revs     []int64 // mod_revision of each event
}

// watchCodec marshals requests with protobuf and reads responses as watchResp.
type watchCodec struct{}

func (watchCodec) Name() string { return "proto" }

func (watchCodec) Marshal(m any) ([]byte, error) {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("watch codec: cannot marshal %T", m)
	}
	return proto.Marshal(pm)
}

func (watchCodec) Unmarshal(b []byte, m any) error {
	r, ok := m.(*watchResp)
	if !ok {
		pm, ok := m.(proto.Message)
		if !ok {
			return fmt.Errorf("watch codec: cannot unmarshal into %T", m)
		}
		return proto.Unmarshal(b, pm)
	}
	*r = watchResp{}
	return r.parse(b)
}

var errBadWire = errors.New("watch codec: malformed WatchResponse")

// parse reads a WatchResponse: created (3), canceled (4), cancel_reason (6) and
// events (11), of which Event.kv (2) and KeyValue.mod_revision (3).
func (r *watchResp) parse(b []byte) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errBadWire
		}
		b = b[n:]
		switch {
		case (num == 3 || num == 4) && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return errBadWire
			}
			if num == 3 {
				r.created = v != 0
			} else {
				r.canceled = v != 0
			}
			b = b[n:]
		case (num == 6 || num == 11) && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errBadWire
			}
			if num == 6 {
				r.reason = string(v)
			} else {
				rev, err := eventModRevision(v)
				if err != nil {
					return err
				}
				r.revs = append(r.revs, rev)
			}
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return errBadWire
			}
			b = b[n:]
		}
	}
	return nil
}

func eventModRevision(ev []byte) (int64, error) {
	kv, err := subMessage(ev, 2)
	if err != nil || kv == nil {
		return 0, err
	}
	for len(kv) > 0 {
		num, typ, n := protowire.ConsumeTag(kv)
		if n < 0 {
			return 0, errBadWire
		}
		kv = kv[n:]
		if num == 3 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(kv)
			if n < 0 {
				return 0, errBadWire
			}
			return int64(v), nil
		}
		n = protowire.ConsumeFieldValue(num, typ, kv)
		if n < 0 {
			return 0, errBadWire
		}
		kv = kv[n:]
	}
	return 0, nil
}

// subMessage returns the bytes of field num (a message) in b, nil when absent.
func subMessage(b []byte, num protowire.Number) ([]byte, error) {
	for len(b) > 0 {
		n0, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, errBadWire
		}
		b = b[n:]
		if n0 == num && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, errBadWire
			}
			return v, nil
		}
		n = protowire.ConsumeFieldValue(n0, typ, b)
		if n < 0 {
			return nil, errBadWire
		}
		b = b[n:]
	}
	return nil, nil
}

// watchStream is one Watch stream of the benchmark and what its receiver saw.
type watchStream struct {
	stream *connect.BidiStreamForClient[etcdserverpb.WatchRequest, watchResp]

	mu    sync.Mutex
	hists []*latHist // per step
	last  []int64    // per step: when the last event arrived (unix ns)
	count []int64    // per step: events received
}

// watchRun is the state the writers and receivers share.
type watchRun struct {
	opts    WatchOptions
	base    int64          // revisions after base are the benchmark's puts
	acks    []atomic.Int64 // acks[rev-base-1]: when that put was acknowledged (unix ns)
	step    atomic.Int64   // current step, -1 between steps
	created atomic.Int64
	cancels atomic.Int64
}

// Watch runs the watch benchmark.
func Watch(ctx context.Context, cfg Config, opts WatchOptions) (*WatchReport, error) {
	switch {
	case len(cfg.Endpoints) == 0:
		return nil, errors.New("at least one endpoint is required")
	case cfg.Conns < 1:
		return nil, errors.New("conns must be >= 1")
	case cfg.Timeout <= 0:
		return nil, errors.New("timeout must be > 0")
	case opts.Watchers < 1:
		return nil, errors.New("watchers must be >= 1")
	case opts.Streams < 1 || opts.Streams > opts.Watchers:
		return nil, errors.New("streams must be between 1 and the number of watchers")
	case len(opts.Rates) == 0:
		return nil, errors.New("at least one put rate is required")
	case opts.Step <= 0 || opts.Drain <= 0:
		return nil, errors.New("step and drain must be > 0")
	case opts.Writers < 1:
		return nil, errors.New("writers must be >= 1")
	case opts.ValSize < 0:
		return nil, errors.New("val-size must be >= 0")
	}
	for _, r := range opts.Rates {
		if r <= 0 {
			return nil, fmt.Errorf("put rate %v must be > 0", r)
		}
	}
	conns, err := dialConns(ctx, cfg.Endpoints, cfg.Conns+1, cfg.Timeout, cfg.User, cfg.Password)
	if err != nil {
		return nil, err
	}
	defer closeConns(conns)
	kv := conns[cfg.Conns].kv // the writers' own connection

	// The revision before the first put (the writers' connection is used at once: a
	// server may close a connection that stays silent).
	val := make([]byte, opts.ValSize)
	for i := range val {
		val[i] = 'a' + byte(i%26)
	}
	warm, err := kv.Put(ctx, connect.NewRequest(&etcdserverpb.PutRequest{Key: []byte(opts.Prefix + "start"), Value: val}))
	if err != nil {
		return nil, fmt.Errorf("put before the run: %w", err)
	}
	base := warm.Msg.GetHeader().GetRevision()
	// Every connection speaks at once too (kvmesh's gateways close one whose first
	// request does not come within 10 s, and the idle window below is that long).
	for _, c := range conns[:cfg.Conns] {
		if _, err := c.kv.Range(ctx, connect.NewRequest(&etcdserverpb.RangeRequest{Key: []byte(opts.Prefix + "start"), Serializable: true})); err != nil {
			return nil, fmt.Errorf("first request on %s: %w", c.endpoint, err)
		}
	}
	rep := &WatchReport{Target: cfg.TargetName, Scenario: "spread", Endpoints: cfg.Endpoints,
		Conns: cfg.Conns, Watchers: opts.Watchers, Streams: opts.Streams}
	if opts.Hot {
		rep.Scenario = "hot"
	}
	before := make([]int64, len(opts.ServerPIDs))
	for i, pid := range opts.ServerPIDs {
		if before[i], err = residentBytes(pid); err != nil {
			return nil, err
		}
	}

	var core *CoreCost
	var coreBefore coreSample
	if len(opts.CoreMetrics)+len(opts.CorePIDs) > 0 {
		idleStart, err := sampleCore(ctx, opts)
		if err != nil {
			return nil, err
		}
		t := time.Now()
		sleepCtx(ctx, opts.IdleWindow)
		if coreBefore, err = sampleCore(ctx, opts); err != nil {
			return nil, err
		}
		core = &CoreCost{IdleSeconds: time.Since(t).Seconds(), IdleCalls: diffCalls(idleStart, coreBefore), IdleCPUSeconds: coreBefore.cpu - idleStart.cpu}
	}

	run := &watchRun{opts: opts, base: base}
	run.step.Store(-1)
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	streams := make([]*watchStream, opts.Streams)
	t0 := time.Now()
	for i := range streams {
		c := conns[i%cfg.Conns]
		client := connect.NewClient[etcdserverpb.WatchRequest, watchResp](&http.Client{Transport: c.transport},
			"http://"+c.endpoint+etcdserverpbconnect.WatchWatchProcedure, connect.WithGRPC(), connect.WithCodec(watchCodec{}))
		s := &watchStream{stream: client.CallBidiStream(sctx),
			hists: make([]*latHist, len(opts.Rates)), last: make([]int64, len(opts.Rates)), count: make([]int64, len(opts.Rates))}
		streams[i] = s
		// The receivers end with sctx (when Watch returns).
		go run.receive(s)
	}
	// Create the watches, every stream at once, each stream's in order.
	sendErr := make(chan error, len(streams))
	for i, s := range streams {
		go func() {
			for w := i; w < opts.Watchers; w += len(streams) {
				key := opts.Prefix + "hot"
				if !opts.Hot {
					key = spreadKey(opts.Prefix, w)
				}
				cr := &etcdserverpb.WatchCreateRequest{Key: []byte(key)}
				if opts.FromPast {
					cr.StartRevision = base
				}
				req := &etcdserverpb.WatchRequest{RequestUnion: &etcdserverpb.WatchRequest_CreateRequest{CreateRequest: cr}}
				if err := s.stream.Send(req); err != nil {
					sendErr <- fmt.Errorf("stream %d: create watch %d: %w", i, w, err)
					return
				}
			}
			sendErr <- nil
		}()
	}
	for range streams {
		if err := <-sendErr; err != nil {
			return nil, err
		}
	}
	createDeadline := time.Now().Add(5 * time.Minute)
	for run.created.Load() < int64(opts.Watchers) {
		if time.Now().After(createDeadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("only %d of %d watches were created", run.created.Load(), opts.Watchers)
		}
		if n := run.cancels.Load(); n > 0 {
			return nil, fmt.Errorf("the server canceled %d watches while they were created", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	rep.CreateSeconds = time.Since(t0).Seconds()
	if core != nil {
		after, err := sampleCore(ctx, opts)
		if err != nil {
			return nil, err
		}
		core.CreateSeconds = rep.CreateSeconds
		core.CreateCalls = diffCalls(coreBefore, after)
		core.CreateCPUSeconds = after.cpu - coreBefore.cpu
		for k, n := range core.CreateCalls {
			core.CallsAboveIdle += max(0, n-core.IdleCalls[k]*core.CreateSeconds/core.IdleSeconds)
		}
		rep.Core = core
	}

	if len(opts.ServerPIDs) > 0 {
		sleepCtx(ctx, opts.Settle)
		var grew int64
		for i, pid := range opts.ServerPIDs {
			after, err := residentBytes(pid)
			if err != nil {
				return nil, err
			}
			rep.Memory = append(rep.Memory, ProcessMemory{PID: pid, RSSBefore: before[i], RSSWatching: after})
			grew += after - before[i]
		}
		rep.BytesPerWatcher = float64(grew) / float64(opts.Watchers)
	}

	// The table of acknowledgements is sized for every planned put (and a margin).
	var planned float64
	for _, r := range opts.Rates {
		planned += r * opts.Step.Seconds()
	}
	run.acks = make([]atomic.Int64, int(planned*1.05)+len(opts.Rates)+16)

	perPut := int64(1)
	if opts.Hot {
		perPut = int64(opts.Watchers)
	}
	next := int64(0) // puts issued so far (indexes the planned puts)
	for si, rate := range opts.Rates {
		if ctx.Err() != nil {
			rep.Interrupted = true
			break
		}
		st := WatchStep{TargetPutsPerSec: rate}
		run.step.Store(int64(si))
		start := time.Now()
		puts, perrs := run.write(ctx, kv, val, rate, next)
		wrote := time.Since(start)
		next += int64(math.Ceil(rate * opts.Step.Seconds()))
		st.Puts, st.PutErrors = puts, perrs
		st.PutsPerSec = float64(puts) / wrote.Seconds()
		st.Expected = puts * perPut

		// Wait for every event of the step's puts, or the drain deadline.
		deadline := time.Now().Add(opts.Drain)
		for ctx.Err() == nil && time.Now().Before(deadline) && stepCount(streams, si) < st.Expected {
			time.Sleep(5 * time.Millisecond)
		}
		run.step.Store(-1)
		h := &latHist{}
		var last int64
		for _, s := range streams {
			s.mu.Lock()
			if s.hists[si] != nil {
				h.merge(s.hists[si])
			}
			last = max(last, s.last[si])
			st.Delivered += s.count[si]
			s.mu.Unlock()
		}
		st.Missing = max(st.Expected-st.Delivered, 0)
		if last > 0 {
			st.EventsPerSec = float64(st.Delivered) / (float64(last-start.UnixNano()) / 1e9)
		}
		sec := func(q float64) *float64 {
			if v, ok := h.quantile(q, st.Missing); ok {
				f := float64(v) / 1e9
				return &f
			}
			return nil
		}
		st.P50, st.P90, st.P99 = sec(0.50), sec(0.90), sec(0.99)
		if st.Missing == 0 && h.n > 0 {
			f := float64(h.max) / 1e9
			st.Max = &f
		}
		rep.Steps = append(rep.Steps, st)
		if opts.MaxP99 > 0 && (st.P99 == nil || *st.P99 > opts.MaxP99.Seconds()) {
			break
		}
	}
	rep.Canceled = run.cancels.Load()
	return rep, nil
}

func stepCount(streams []*watchStream, step int) int64 {
	var n int64
	for _, s := range streams {
		s.mu.Lock()
		n += s.count[step]
		s.mu.Unlock()
	}
	return n
}

// spreadKey is the key of watch w in the spread scenario.
func spreadKey(prefix string, w int) string { return prefix + fmt.Sprintf("%07d", w) }

// write puts at rate for one step: put i of the step is due at start + i/rate, taken
// by whichever writer is free (an open loop: a slow server gets the puts later, not
// fewer). first numbers the step's puts among all planned ones.
func (run *watchRun) write(ctx context.Context, kv etcdserverpbconnect.KVClient, val []byte, rate float64, first int64) (puts, errs int64) {
	opts := run.opts
	n := int64(math.Ceil(rate * opts.Step.Seconds()))
	var (
		seq      atomic.Int64
		ok, fail atomic.Int64
		wg       sync.WaitGroup
	)
	start := time.Now()
	for w := 0; w < opts.Writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(first), uint64(w)))
			for {
				i := seq.Add(1) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				if d := time.Until(start.Add(time.Duration(float64(i) / rate * 1e9))); d > 0 {
					time.Sleep(d)
				}
				key := opts.Prefix + "hot"
				if !opts.Hot {
					key = spreadKey(opts.Prefix, rng.IntN(opts.Watchers))
				}
				rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				resp, err := kv.Put(rctx, connect.NewRequest(&etcdserverpb.PutRequest{Key: []byte(key), Value: val}))
				now := time.Now().UnixNano()
				cancel()
				if err != nil {
					fail.Add(1)
					continue
				}
				ok.Add(1)
				if idx := resp.Msg.GetHeader().GetRevision() - run.base - 1; idx >= 0 && idx < int64(len(run.acks)) {
					run.acks[idx].Store(now)
				}
			}
		}()
	}
	wg.Wait()
	return ok.Load(), fail.Load()
}

// receive reads one stream until it ends, timing each event against its put's
// acknowledgement.
func (run *watchRun) receive(s *watchStream) {
	for {
		r, err := s.stream.Receive()
		if err != nil {
			return
		}
		now := time.Now().UnixNano()
		if r.created {
			run.created.Add(1)
		}
		if r.canceled {
			run.cancels.Add(1)
		}
		if len(r.revs) == 0 {
			continue
		}
		step := run.step.Load()
		if step < 0 {
			continue // after its step's drain: already counted missing
		}
		s.mu.Lock()
		h := s.hists[step]
		if h == nil {
			h = &latHist{}
			s.hists[step] = h
		}
		for _, rev := range r.revs {
			var lat int64
			if idx := rev - run.base - 1; idx >= 0 && idx < int64(len(run.acks)) {
				if ack := run.acks[idx].Load(); ack > 0 {
					lat = max(now-ack, 0)
				}
			}
			h.add(lat)
		}
		s.count[step] += int64(len(r.revs))
		s.last[step] = now
		s.mu.Unlock()
	}
}

// residentBytes reads a process's resident set size from /proc.
func residentBytes(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("server memory: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("server memory: pid %d: %q: %w", pid, line, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("server memory: pid %d: no VmRSS", pid)
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// WriteJSON writes the report as one JSON object on a line.
func (r *WatchReport) WriteJSON(w io.Writer) error {
	return json.NewEncoder(w).Encode(r)
}

// WriteText prints the report for people.
func (r *WatchReport) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "Watch benchmark (%s): %d watches over %d streams, %d conns", r.Scenario, r.Watchers, r.Streams, r.Conns)
	if r.Target != "" {
		fmt.Fprintf(&b, ", target %s", r.Target)
	}
	fmt.Fprintf(&b, "\n  created in %.2fs\n", r.CreateSeconds)
	for _, m := range r.Memory {
		fmt.Fprintf(&b, "  pid %d resident: %.1f MiB before, %.1f MiB watching\n", m.PID, float64(m.RSSBefore)/(1<<20), float64(m.RSSWatching)/(1<<20))
	}
	if len(r.Memory) > 0 {
		fmt.Fprintf(&b, "  memory per idle watch: %.0f bytes\n", r.BytesPerWatcher)
	}
	if c := r.Core; c != nil {
		fmt.Fprintf(&b, "  the core while idle %.1fs: %s, %.2fs CPU; while the watches were created (%.1fs): %s, %.2fs CPU; calls above the idle rate: %.0f\n",
			c.IdleSeconds, callList(c.IdleCalls), c.IdleCPUSeconds, c.CreateSeconds, callList(c.CreateCalls), c.CreateCPUSeconds, c.CallsAboveIdle)
	}
	ms := func(v *float64) string {
		if v == nil {
			return "missing"
		}
		return fmt.Sprintf("%.1fms", *v*1000)
	}
	for _, s := range r.Steps {
		fmt.Fprintf(&b, "  %8.0f puts/s target: %d puts (%.0f/s, %d failed), events %d/%d (%d missing), %.0f events/s, latency p50 %s p90 %s p99 %s max %s\n",
			s.TargetPutsPerSec, s.Puts, s.PutsPerSec, s.PutErrors, s.Delivered, s.Expected, s.Missing, s.EventsPerSec,
			ms(s.P50), ms(s.P90), ms(s.P99), ms(s.Max))
	}
	if r.Canceled > 0 {
		fmt.Fprintf(&b, "  the server canceled %d watches\n", r.Canceled)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// callList is calls by method, in the method's order.
func callList(calls map[string]float64) string {
	if len(calls) == 0 {
		return "no RPCs"
	}
	keys := make([]string, 0, len(calls))
	for k := range calls {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.0f", k, calls[k]))
	}
	return strings.Join(parts, ", ")
}
