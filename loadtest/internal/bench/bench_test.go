package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
)

// memKV is a trivial in-memory KV service, for tests only.
type memKV struct {
	etcdserverpbconnect.UnimplementedKVHandler

	mu   sync.Mutex
	data map[string][]byte
	rev  int64

	puts, ranges atomic.Int64
	protocols    sync.Map // protocol name -> struct{}
	keys         sync.Map // put keys seen -> struct{}

	// Optional fault injection, called before serving a request.
	fail func(n int64) error
	// Optional per-request delay.
	delay time.Duration
	// Optional: told of every put, under the store's lock.
	onPut func(key []byte, rev int64)
	// Optional Watch service.
	watch etcdserverpbconnect.WatchHandler
	// Optional Lease service.
	lease etcdserverpbconnect.LeaseHandler
}

func (m *memKV) Put(ctx context.Context, req *connect.Request[etcdserverpb.PutRequest]) (*connect.Response[etcdserverpb.PutResponse], error) {
	n := m.puts.Add(1)
	m.protocols.Store(req.Peer().Protocol, struct{}{})
	m.keys.Store(string(req.Msg.Key), struct{}{})
	if m.fail != nil {
		if err := m.fail(n); err != nil {
			return nil, err
		}
	}
	if m.delay > 0 {
		select {
		case <-time.After(m.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rev++
	m.data[string(req.Msg.Key)] = req.Msg.Value
	if m.onPut != nil {
		m.onPut(req.Msg.Key, m.rev)
	}
	return connect.NewResponse(&etcdserverpb.PutResponse{
		Header: &etcdserverpb.ResponseHeader{Revision: m.rev},
	}), nil
}

func (m *memKV) Range(ctx context.Context, req *connect.Request[etcdserverpb.RangeRequest]) (*connect.Response[etcdserverpb.RangeResponse], error) {
	n := m.ranges.Add(1)
	m.protocols.Store(req.Peer().Protocol, struct{}{})
	if m.fail != nil {
		if err := m.fail(n); err != nil {
			return nil, err
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	resp := &etcdserverpb.RangeResponse{Header: &etcdserverpb.ResponseHeader{Revision: m.rev}}
	if v, ok := m.data[string(req.Msg.Key)]; ok {
		resp.Count = 1
		resp.Kvs = []*mvccpb.KeyValue{{Key: req.Msg.Key, Value: v, ModRevision: m.rev}}
	}
	return connect.NewResponse(resp), nil
}

// startServer serves m over HTTP/1.1 + h2c on a random loopback port and
// returns its "host:port" and a counter of accepted TCP connections.
func startServer(t *testing.T, m *memKV) (string, *atomic.Int64) {
	t.Helper()
	if m.data == nil {
		m.data = map[string][]byte{}
	}
	mux := http.NewServeMux()
	mux.Handle(etcdserverpbconnect.NewKVHandler(m))
	if m.watch != nil {
		mux.Handle(etcdserverpbconnect.NewWatchHandler(m.watch))
	}
	if m.lease != nil {
		mux.Handle(etcdserverpbconnect.NewLeaseHandler(m.lease))
	}
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	var conns atomic.Int64
	srv := &http.Server{
		Handler:   mux,
		Protocols: p,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), &conns
}

func testConfig(addr string) Config {
	return Config{
		Endpoints:  []string{addr},
		Conns:      2,
		Clients:    4,
		Total:      200,
		Timeout:    5 * time.Second,
		TargetName: "memkv",
	}
}

func checkSane(t *testing.T, r *Report) {
	t.Helper()
	l := r.Latency
	if !(l.Fastest > 0 && l.Fastest <= l.P10 && l.P10 <= l.P25 && l.P25 <= l.P50 &&
		l.P50 <= l.P75 && l.P75 <= l.P90 && l.P90 <= l.P95 && l.P95 <= l.P99 &&
		l.P99 <= l.P999 && l.P999 <= l.Slowest) {
		t.Errorf("latencies not ordered: %+v", l)
	}
	if !(l.Fastest <= l.Average && l.Average <= l.Slowest) || l.Stddev < 0 {
		t.Errorf("bad average/stddev: %+v", l)
	}
	if r.RequestsPerSec <= 0 || r.TotalSeconds <= 0 {
		t.Errorf("qps=%v total=%v, want > 0", r.RequestsPerSec, r.TotalSeconds)
	}
	var inHist int64
	for _, b := range r.Histogram {
		inHist += b.Count
	}
	if inHist != r.Succeeded {
		t.Errorf("histogram holds %d requests, want %d", inHist, r.Succeeded)
	}
	var text bytes.Buffer
	if err := r.WriteText(&text, false); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Summary:", "Requests/sec:", "Response time histogram:", "Latency distribution:", "99.9% in"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, text.String())
		}
	}
	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	if strings.Count(js.String(), "\n") != 1 {
		t.Errorf("JSON report is not a single line: %q", js.String())
	}
	var back map[string]any
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("JSON report does not parse: %v", err)
	}
}

func TestPutAndRange(t *testing.T) {
	m := &memKV{}
	addr, conns := startServer(t, m)
	cfg := testConfig(addr)

	rep, err := Put(context.Background(), cfg, PutOptions{KeySize: 8, ValSize: 256, KeySpaceSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Succeeded != 200 || rep.Failed != 0 || rep.Requests != 200 {
		t.Fatalf("put: requests=%d succeeded=%d failed=%d errors=%v, want 200/200/0", rep.Requests, rep.Succeeded, rep.Failed, rep.Errors)
	}
	if got := m.puts.Load(); got != 200 {
		t.Fatalf("server saw %d puts, want 200", got)
	}
	if len(rep.Latencies()) != 200 {
		t.Fatalf("%d latencies recorded, want 200", len(rep.Latencies()))
	}
	checkSane(t, rep)
	if rep.Op != "put" || rep.Target != "memkv" || rep.Conns != 2 || rep.Clients != 4 {
		t.Errorf("report metadata: %+v", rep)
	}

	rep, err = Range(context.Background(), cfg, RangeOptions{Key: "foo", Consistency: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Succeeded != 200 || rep.Failed != 0 {
		t.Fatalf("range: succeeded=%d failed=%d errors=%v, want 200/0", rep.Succeeded, rep.Failed, rep.Errors)
	}
	if got := m.ranges.Load(); got != 200 {
		t.Fatalf("server saw %d ranges, want 200", got)
	}
	checkSane(t, rep)

	// Each run opened exactly --conns TCP connections.
	if got := conns.Load(); got != 4 {
		t.Errorf("server accepted %d TCP connections over two runs, want 4", got)
	}
	// Requests used the gRPC protocol, like any etcd client.
	m.protocols.Range(func(k, _ any) bool {
		if k != connect.ProtocolGRPC {
			t.Errorf("request used protocol %q, want %q", k, connect.ProtocolGRPC)
		}
		return true
	})
}

func TestPutKeys(t *testing.T) {
	t.Run("random", func(t *testing.T) {
		m := &memKV{}
		addr, _ := startServer(t, m)
		if _, err := Put(context.Background(), testConfig(addr), PutOptions{KeySize: 8, ValSize: 16, KeySpaceSize: 4}); err != nil {
			t.Fatal(err)
		}
		n := 0
		m.keys.Range(func(k, _ any) bool {
			n++
			if len(k.(string)) != 8 {
				t.Errorf("key %q has %d bytes, want 8", k, len(k.(string)))
			}
			return true
		})
		if n < 1 || n > 4 {
			t.Errorf("%d distinct keys, want 1..4", n)
		}
		for k, v := range m.data {
			if len(v) != 16 {
				t.Errorf("value for %q has %d bytes, want 16", k, len(v))
			}
		}
	})
	t.Run("sequential", func(t *testing.T) {
		m := &memKV{}
		addr, _ := startServer(t, m)
		if _, err := Put(context.Background(), testConfig(addr), PutOptions{KeySize: 8, SequentialKeys: true}); err != nil {
			t.Fatal(err)
		}
		for i := int64(0); i < 200; i++ {
			if _, ok := m.data[string(encodeKey(i, 8))]; !ok {
				t.Fatalf("sequential key %d was not written", i)
			}
		}
		if len(m.data) != 200 {
			t.Errorf("%d keys written, want 200", len(m.data))
		}
	})
	t.Run("too small", func(t *testing.T) {
		_, err := Put(context.Background(), testConfig("127.0.0.1:1"), PutOptions{KeySize: 1, KeySpaceSize: 1000})
		if err == nil || !strings.Contains(err.Error(), "does not fit") {
			t.Errorf("err = %v, want key space error", err)
		}
	})
}

func TestErrorsCountedByCode(t *testing.T) {
	m := &memKV{fail: func(n int64) error {
		switch n % 4 {
		case 1:
			return connect.NewError(connect.CodeResourceExhausted, errors.New("etcdserver: too many requests"))
		case 2:
			return connect.NewError(connect.CodeUnavailable, errors.New("etcdserver: leader changed"))
		}
		return nil
	}}
	addr, _ := startServer(t, m)
	rep, err := Put(context.Background(), testConfig(addr), PutOptions{KeySize: 8, ValSize: 8, KeySpaceSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Requests != 200 || rep.Succeeded != 100 || rep.Failed != 100 {
		t.Fatalf("requests=%d succeeded=%d failed=%d, want 200/100/100", rep.Requests, rep.Succeeded, rep.Failed)
	}
	want := []ErrorCount{
		{Code: "resource_exhausted", Message: "etcdserver: too many requests", Count: 50},
		{Code: "unavailable", Message: "etcdserver: leader changed", Count: 50},
	}
	if len(rep.Errors) != len(want) {
		t.Fatalf("errors = %+v, want %+v", rep.Errors, want)
	}
	for i := range want {
		if rep.Errors[i] != want[i] {
			t.Errorf("errors[%d] = %+v, want %+v", i, rep.Errors[i], want[i])
		}
	}
	checkSane(t, rep)
	var text bytes.Buffer
	rep.WriteText(&text, false)
	if !strings.Contains(text.String(), "[50]\tresource_exhausted: etcdserver: too many requests") {
		t.Errorf("text report lacks error distribution:\n%s", text.String())
	}
}

func TestTimeoutCounted(t *testing.T) {
	m := &memKV{delay: 2 * time.Second}
	addr, _ := startServer(t, m)
	cfg := testConfig(addr)
	cfg.Total = 8
	cfg.Timeout = 50 * time.Millisecond
	rep, err := Put(context.Background(), cfg, PutOptions{KeySize: 8, ValSize: 8, KeySpaceSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Failed != 8 || rep.Succeeded != 0 {
		t.Fatalf("succeeded=%d failed=%d, want 0/8", rep.Succeeded, rep.Failed)
	}
	if len(rep.Errors) != 1 || rep.Errors[0].Code != "deadline_exceeded" {
		t.Errorf("errors = %+v, want deadline_exceeded only", rep.Errors)
	}
	var text bytes.Buffer
	if err := rep.WriteText(&text, false); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "No successful requests.") {
		t.Errorf("text report:\n%s", text.String())
	}
}

func TestDuration(t *testing.T) {
	m := &memKV{}
	addr, _ := startServer(t, m)
	cfg := testConfig(addr)
	cfg.Total = 0
	cfg.Duration = 300 * time.Millisecond
	start := time.Now()
	rep, err := Range(context.Background(), cfg, RangeOptions{Key: "a", RangeEnd: "z", Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < cfg.Duration || el > cfg.Duration+2*time.Second {
		t.Errorf("run took %v, want about %v", el, cfg.Duration)
	}
	if rep.Succeeded == 0 || rep.Failed != 0 || rep.Succeeded != m.ranges.Load() {
		t.Errorf("succeeded=%d failed=%d server=%d", rep.Succeeded, rep.Failed, m.ranges.Load())
	}
	checkSane(t, rep)
}

func TestInterrupt(t *testing.T) {
	m := &memKV{delay: 5 * time.Millisecond}
	addr, _ := startServer(t, m)
	cfg := testConfig(addr)
	cfg.Total = 1 << 40
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	rep, err := Put(ctx, cfg, PutOptions{KeySize: 8, ValSize: 8, KeySpaceSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Interrupted || rep.Succeeded == 0 || rep.Failed != 0 {
		t.Errorf("interrupted=%v succeeded=%d failed=%d errors=%v", rep.Interrupted, rep.Succeeded, rep.Failed, rep.Errors)
	}
}

func TestDialFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = Put(context.Background(), testConfig(addr), PutOptions{KeySize: 8})
	if err == nil {
		t.Fatal("expected a dial error")
	}
}

func TestEndpoints(t *testing.T) {
	// Conns are spread round-robin over endpoints.
	m1, m2 := &memKV{}, &memKV{}
	a1, c1 := startServer(t, m1)
	a2, c2 := startServer(t, m2)
	cfg := testConfig(a1)
	cfg.Endpoints = []string{"http://" + a1, a2}
	cfg.Conns = 4
	rep, err := Range(context.Background(), cfg, RangeOptions{Key: "k"})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Succeeded != 200 {
		t.Fatalf("succeeded=%d", rep.Succeeded)
	}
	if c1.Load() != 2 || c2.Load() != 2 {
		t.Errorf("connections per endpoint: %d, %d; want 2, 2", c1.Load(), c2.Load())
	}
	if n1, n2 := m1.ranges.Load(), m2.ranges.Load(); n1 == 0 || n2 == 0 || n1+n2 != 200 {
		t.Errorf("requests per endpoint: %d, %d; want both > 0, 200 in all", n1, n2)
	}
}

// trackingListener records accepted connections so a test can sever them.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *trackingListener) severAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.Close()
	}
	l.conns = nil
}

func TestReconnect(t *testing.T) {
	m := &memKV{data: map[string][]byte{}}
	mux := http.NewServeMux()
	mux.Handle(etcdserverpbconnect.NewKVHandler(m))
	if m.watch != nil {
		mux.Handle(etcdserverpbconnect.NewWatchHandler(m.watch))
	}
	if m.lease != nil {
		mux.Handle(etcdserverpbconnect.NewLeaseHandler(m.lease))
	}
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: mux, Protocols: p}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &trackingListener{Listener: inner}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	cfg := testConfig(inner.Addr().String())
	cfg.Total = 0
	cfg.Duration = time.Second
	cfg.Timeout = 500 * time.Millisecond
	var before int64
	time.AfterFunc(300*time.Millisecond, func() {
		before = m.puts.Load()
		ln.severAll()
	})
	rep, err := Put(context.Background(), cfg, PutOptions{KeySize: 8, ValSize: 8, KeySpaceSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	after := m.puts.Load()
	if before == 0 || after <= before {
		t.Fatalf("puts before severing=%d, at end=%d: client did not reconnect (errors %v)", before, after, rep.Errors)
	}
	for _, e := range rep.Errors {
		if e.Code == "deadline_exceeded" {
			t.Errorf("requests timed out after the connections were severed: %+v", rep.Errors)
		}
	}
	t.Logf("before=%d after=%d errors=%+v", before, after, rep.Errors)
}
