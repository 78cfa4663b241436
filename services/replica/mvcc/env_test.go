package mvcc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
)

// testEnv is a store over a Pebble database in a temporary directory, driven as the
// replica's apply loop drives it.
type testEnv struct {
	t    testing.TB
	dir  string
	db   *pebble.DB
	s    *Store
	logs *recordingHandler
	// commit is the sync mode of the apply batches (the apply loop uses Sync).
	commit *pebble.WriteOptions
}

func newEnv(t testing.TB) *testEnv { return newEnvWithLeases(t, nil) }

// newEnvWithLeases opens a store in which the leases of the set are granted.
func newEnvWithLeases(t testing.TB, leases leaseSet) *testEnv {
	t.Helper()
	e := &testEnv{t: t, dir: t.TempDir(), logs: &recordingHandler{}, commit: pebble.Sync}
	e.openDB()
	e.openStore()
	t.Cleanup(func() {
		e.closeAll()
		for _, r := range e.logs.errors() {
			t.Errorf("store logged an error: %s", r)
		}
	})
	for id, ok := range leases {
		if ok {
			if _, err := e.apply(&pb.LeaseGrantRequest{ID: id, TTL: 60}); err != nil {
				t.Fatalf("grant lease %d: %v", id, err)
			}
		}
	}
	return e
}

func (e *testEnv) openDB() {
	e.t.Helper()
	db, err := pebble.Open(e.dir, &pebble.Options{Logger: pebbleLogger{e.logs}})
	if err != nil {
		e.t.Fatalf("pebble.Open(%s): %v", e.dir, err)
	}
	e.db = db
}

func (e *testEnv) openStore() {
	e.t.Helper()
	s, err := Open(e.db, slog.New(e.logs))
	if err != nil {
		e.t.Fatalf("mvcc.Open: %v", err)
	}
	e.s = s
}

func (e *testEnv) closeAll() {
	if e.s != nil {
		e.s.Close()
		e.s = nil
	}
	if e.db != nil {
		if err := e.db.Close(); err != nil {
			e.t.Errorf("closing pebble: %v", err)
		}
		e.db = nil
	}
}

// reopenStore closes the Store and opens a new one on the same, still open, database.
func (e *testEnv) reopenStore() {
	e.t.Helper()
	e.s.Close()
	e.openStore()
}

// restart closes the store and the database and opens both again.
func (e *testEnv) restart() {
	e.t.Helper()
	e.closeAll()
	e.openDB()
	e.openStore()
}

// result is the outcome of one write request.
type result struct {
	resp proto.Message
	err  error
}

// applyOne applies one write request (*pb.PutRequest, *pb.DeleteRangeRequest,
// *pb.TxnRequest or *pb.CompactionRequest) through w.
func applyOne(ctx context.Context, w *Writer, req proto.Message) (resp proto.Message, err error) {
	defer recoverAsError(&err)
	switch r := req.(type) {
	case *pb.PutRequest:
		return nilIfErr(w.Put(ctx, r))
	case *pb.DeleteRangeRequest:
		return nilIfErr(w.DeleteRange(ctx, r))
	case *pb.TxnRequest:
		return nilIfErr(w.Txn(ctx, r))
	case *pb.CompactionRequest:
		return nilIfErr(w.Compact(r))
	case *pb.LeaseGrantRequest:
		if err := w.LeaseGrant(r.GetID(), r.GetTTL()); err != nil {
			return nil, err
		}
		return &pb.LeaseGrantResponse{ID: r.GetID(), TTL: r.GetTTL()}, nil
	case *pb.LeaseRevokeRequest:
		return nilIfErr(w.LeaseRevoke(ctx, r.GetID()))
	}
	panic(fmt.Sprintf("applyOne: unexpected request %T", req))
}

// nilIfErr turns a typed nil response into an untyped nil so that results compare
// simply.
func nilIfErr[M proto.Message](m M, err error) (proto.Message, error) {
	if err != nil {
		return nil, err
	}
	return m, nil
}

// applyBatch applies every request in ONE Pebble batch, as the apply loop does with
// the entries of one Ready, then commits it and publishes it.
func (e *testEnv) applyBatch(reqs ...proto.Message) []result {
	e.t.Helper()
	ctx := context.Background()
	b := e.db.NewIndexedBatch()
	defer b.Close()
	w := e.s.NewWriter(b)
	out := make([]result, len(reqs))
	for i, r := range reqs {
		resp, err := applyOne(ctx, w, r)
		out[i] = result{resp, err}
	}
	if err := e.s.Commit(w, e.commit); err != nil {
		e.t.Fatalf("commit: %v", err)
	}
	return out
}

// apply applies one request in its own batch.
func (e *testEnv) apply(req proto.Message) (proto.Message, error) {
	e.t.Helper()
	r := e.applyBatch(req)[0]
	return r.resp, r.err
}

func (e *testEnv) put(r *pb.PutRequest) (*pb.PutResponse, error) {
	e.t.Helper()
	resp, err := e.apply(r)
	if err != nil {
		return nil, err
	}
	return resp.(*pb.PutResponse), nil
}

func (e *testEnv) mustPut(key, value string) *pb.PutResponse {
	e.t.Helper()
	resp, err := e.put(&pb.PutRequest{Key: []byte(key), Value: []byte(value)})
	if err != nil {
		e.t.Fatalf("put %q=%q: %v", key, value, err)
	}
	return resp
}

func (e *testEnv) mustDelete(key, end string) *pb.DeleteRangeResponse {
	e.t.Helper()
	r := &pb.DeleteRangeRequest{Key: []byte(key)}
	if end != "" {
		r.RangeEnd = []byte(end)
	}
	resp, err := e.apply(r)
	if err != nil {
		e.t.Fatalf("delete [%q, %q): %v", key, end, err)
	}
	return resp.(*pb.DeleteRangeResponse)
}

func (e *testEnv) txn(r *pb.TxnRequest) (*pb.TxnResponse, error) {
	e.t.Helper()
	resp, err := e.apply(r)
	if err != nil {
		return nil, err
	}
	return resp.(*pb.TxnResponse), nil
}

func (e *testEnv) mustTxn(r *pb.TxnRequest) *pb.TxnResponse {
	e.t.Helper()
	resp, err := e.txn(r)
	if err != nil {
		e.t.Fatalf("txn %v: %v", r, err)
	}
	return resp
}

func (e *testEnv) compact(rev int64) error {
	e.t.Helper()
	_, err := e.apply(&pb.CompactionRequest{Revision: rev})
	return err
}

func (e *testEnv) mustCompact(rev int64) {
	e.t.Helper()
	if err := e.compact(rev); err != nil {
		e.t.Fatalf("compact at %d: %v", rev, err)
	}
}

func (e *testEnv) waitCompacted(rev int64) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.s.WaitCompacted(ctx, rev); err != nil {
		e.t.Fatalf("WaitCompacted(%d): %v", rev, err)
	}
}

// rangeReq reads through Store.Range; a panic in the store becomes an error, so that
// one crashing read fails its test instead of the whole test binary.
func (e *testEnv) rangeReq(r *pb.RangeRequest) (*pb.RangeResponse, error) {
	return safeRange(e.s, r)
}

// readTxn runs Store.ReadTxn, turning a panic into an error.
func (e *testEnv) readTxn(r *pb.TxnRequest) (*pb.TxnResponse, error) {
	return safeReadTxn(e.s, r)
}

func safeRange(s *Store, r *pb.RangeRequest) (resp *pb.RangeResponse, err error) {
	defer recoverAsError(&err)
	return s.Range(context.Background(), r)
}

func safeReadTxn(s *Store, r *pb.TxnRequest) (resp *pb.TxnResponse, err error) {
	defer recoverAsError(&err)
	return s.ReadTxn(context.Background(), r)
}

// errPanic marks an error made from a panic of the store.
var errPanic = errors.New("store panicked")

func recoverAsError(err *error) {
	if p := recover(); p != nil {
		*err = fmt.Errorf("%w: %v\n%s", errPanic, p, panicSite(debug.Stack()))
	}
}

// panicSite keeps the frames of a stack trace from the panic call on, a few deep.
func panicSite(stack []byte) string {
	lines := strings.Split(string(stack), "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "panic(") {
			return strings.Join(lines[i:min(len(lines), i+9)], "\n")
		}
	}
	return string(stack)
}

// pebbleLogger keeps Pebble quiet but records its errors.
type pebbleLogger struct{ h *recordingHandler }

func (pebbleLogger) Infof(string, ...any) {}
func (l pebbleLogger) Errorf(format string, args ...any) {
	l.h.mu.Lock()
	l.h.errs = append(l.h.errs, "pebble: "+fmt.Sprintf(format, args...))
	l.h.mu.Unlock()
}
func (pebbleLogger) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf("pebble: "+format, args...))
}

func (e *testEnv) mustRange(r *pb.RangeRequest) *pb.RangeResponse {
	e.t.Helper()
	resp, err := e.rangeReq(r)
	if err != nil {
		e.t.Fatalf("range %v: %v", r, err)
	}
	return resp
}

// get reads one key at rev (0: current); nil when absent.
func (e *testEnv) get(key string, rev int64) *mvccpb.KeyValue {
	e.t.Helper()
	resp := e.mustRange(&pb.RangeRequest{Key: []byte(key), Revision: rev})
	switch len(resp.GetKvs()) {
	case 0:
		return nil
	case 1:
		return resp.GetKvs()[0]
	}
	e.t.Fatalf("get %q at %d: %d kvs", key, rev, len(resp.GetKvs()))
	return nil
}

// countPrefix counts the Pebble keys whose first byte is p.
func (e *testEnv) countPrefix(p byte) int {
	e.t.Helper()
	it, err := e.db.NewIter(&pebble.IterOptions{LowerBound: []byte{p}, UpperBound: []byte{p + 1}})
	if err != nil {
		e.t.Fatalf("NewIter: %v", err)
	}
	defer it.Close()
	n := 0
	for it.First(); it.Valid(); it.Next() {
		n++
	}
	if err := it.Error(); err != nil {
		e.t.Fatalf("iterating %q keys: %v", p, err)
	}
	return n
}

// testSeed is the seed of a randomized test: $MVCC_SEED when set, else the clock. It
// is logged so that a failure can be replayed.
func testSeed(t testing.TB) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("MVCC_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("MVCC_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (replay with MVCC_SEED=%d)", seed, seed)
	return seed
}

// leaseSet is a fixed set of leases: granted in a test store, known to the model.
type leaseSet map[int64]bool

func (l leaseSet) Exists(id int64) bool { return l[id] }

// recordingHandler is a slog handler that remembers errors, so that a failing
// background compaction (which the store only logs) fails the test.
type recordingHandler struct {
	mu   sync.Mutex
	errs []string
}

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level < slog.LevelError {
		return nil
	}
	msg := r.Message
	r.Attrs(func(a slog.Attr) bool {
		msg += " " + a.String()
		return true
	})
	h.mu.Lock()
	h.errs = append(h.errs, msg)
	h.mu.Unlock()
	return nil
}

func (h *recordingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordingHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordingHandler) errors() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.errs...)
}

// kv builds an expected KeyValue.
func kv(key, value string, create, mod, version int64) *mvccpb.KeyValue {
	return &mvccpb.KeyValue{Key: []byte(key), Value: []byte(value), CreateRevision: create, ModRevision: mod, Version: version}
}

// prefixEnd is etcd's clientv3.GetPrefixRangeEnd.
func prefixEnd(prefix string) string {
	end := []byte(prefix)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return string(end[:i+1])
		}
	}
	return "\x00"
}

func isErr(err, target error) bool { return errors.Is(err, target) }

// protoDiff renders two messages for a failure message.
func protoDiff(got, want proto.Message) string {
	return fmt.Sprintf("\n got: %v\nwant: %v", got, want)
}

func keysOf(kvs []*mvccpb.KeyValue) []string {
	out := make([]string, len(kvs))
	for i, kv := range kvs {
		out[i] = string(kv.GetKey())
	}
	return out
}
