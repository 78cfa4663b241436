package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"image/png"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"

	"github.com/kvmesh/kvmesh/loadtest/internal/bench"
)

// invocation is what a command line asked the benchmarks for.
type invocation struct {
	cfg  bench.Config
	opts any
}

// parse runs the CLI on args with the benchmarks replaced, and returns what they
// were asked (nil if nothing ran), the exit status and stderr.
func parse(t *testing.T, args ...string) (*invocation, int, string) {
	t.Helper()
	var (
		got            *invocation
		stdout, stderr bytes.Buffer
	)
	a := &app{stdout: &stdout, stderr: &stderr,
		bench: func(_ context.Context, cfg bench.Config, opts any) (*bench.Report, error) {
			got = &invocation{cfg, opts}
			return &bench.Report{Op: "fake", Timeline: []bench.TimelinePoint{}}, nil
		},
		watch: func(_ context.Context, cfg bench.Config, opts bench.WatchOptions) (*bench.WatchReport, error) {
			got = &invocation{cfg, opts}
			return &bench.WatchReport{Scenario: "fake"}, nil
		},
	}
	code := a.run(context.Background(), args)
	return got, code, stderr.String()
}

var defaultCfg = bench.Config{Endpoints: []string{"127.0.0.1:2379"}, Conns: 1, Clients: 1, Total: 10000, Timeout: 10 * time.Second}

func TestParse(t *testing.T) {
	cfg := func(f func(*bench.Config)) bench.Config {
		c := defaultCfg
		f(&c)
		return c
	}
	total := func(n int64) bench.Config { return cfg(func(c *bench.Config) { c.Total = n }) }
	defPut := bench.PutOptions{KeySize: 8, ValSize: 256, KeySpaceSize: 1}
	defMixed := bench.MixedOptions{KeySize: 8, ValSize: 256, KeySpaceSize: 1000, Get: 50, Put: 25, CAS: 15, Delete: 10}
	defWatch := bench.WatchOptions{Watchers: 100000, Streams: 100, Prefix: "/loadtest/watch/", ValSize: 64, Writers: 32,
		Rates: []float64{1000}, Step: 10 * time.Second, Drain: 10 * time.Second, Settle: 5 * time.Second, IdleWindow: 10 * time.Second}
	watch := func(f func(*bench.WatchOptions)) bench.WatchOptions {
		o := defWatch
		f(&o)
		return o
	}
	for _, tc := range []struct {
		args []string
		cfg  bench.Config
		opts any
	}{
		// Defaults.
		{[]string{"put"}, defaultCfg, defPut},
		{[]string{"range", "foo"}, defaultCfg, bench.RangeOptions{Key: "foo", Consistency: "l"}},
		{[]string{"lease-keepalive"}, defaultCfg, bench.LeaseOptions{TTL: 100, LeasesPerClient: 1}},
		{[]string{"mixed"}, defaultCfg, defMixed},
		{[]string{"watch"}, cfg(func(c *bench.Config) { c.Total = 0 }), defWatch},

		// Flags before, between and after positional arguments; "--" ends the flags.
		{[]string{"range", "foo", "--total=5"}, total(5), bench.RangeOptions{Key: "foo", Consistency: "l"}},
		{[]string{"range", "--total", "5", "foo", "bar"}, total(5), bench.RangeOptions{Key: "foo", RangeEnd: "bar", Consistency: "l"}},
		{[]string{"range", "foo", "--total=5", "bar", "--limit", "3"}, total(5), bench.RangeOptions{Key: "foo", RangeEnd: "bar", Consistency: "l", Limit: 3}},
		{[]string{"range", "--", "-foo", "--total=5"}, defaultCfg, bench.RangeOptions{Key: "-foo", RangeEnd: "--total=5", Consistency: "l"}},
		{[]string{"range", "a", "--", "-b"}, defaultCfg, bench.RangeOptions{Key: "a", RangeEnd: "-b", Consistency: "l"}},

		// Global flags before or after the command, with = or a separate value.
		{[]string{"--endpoints", "a:1,b:2", "--clients", "4", "put", "--conns=3"},
			cfg(func(c *bench.Config) { c.Endpoints, c.Clients, c.Conns = []string{"a:1", "b:2"}, 4, 3 }), defPut},
		{[]string{"put", "--timeout=2s", "--target-name=x", "--user=u:p:w", "--json", "--precise"},
			cfg(func(c *bench.Config) { c.Timeout, c.TargetName, c.User, c.Password = 2*time.Second, "x", "u", "p:w" }), defPut},
		{[]string{"--endpoints= a:1 , ,b:2", "put"}, cfg(func(c *bench.Config) { c.Endpoints = []string{"a:1", "b:2"} }), defPut},

		// --duration alone: unbounded count; with --total: whichever comes first.
		{[]string{"--duration=2s", "put"}, cfg(func(c *bench.Config) { c.Total, c.Duration = 0, 2*time.Second }), defPut},
		{[]string{"put", "--duration", "2s"}, cfg(func(c *bench.Config) { c.Total, c.Duration = 0, 2*time.Second }), defPut},
		{[]string{"--duration=2s", "put", "--total=50"}, cfg(func(c *bench.Config) { c.Total, c.Duration = 50, 2*time.Second }), defPut},
		{[]string{"--duration=1m", "range", "k", "--total=10000"}, cfg(func(c *bench.Config) { c.Duration = time.Minute }),
			bench.RangeOptions{Key: "k", Consistency: "l"}},
		{[]string{"--duration=2s", "mixed"}, cfg(func(c *bench.Config) { c.Total, c.Duration = 0, 2*time.Second }), defMixed},

		// put --sequential-keys without --key-space-size: an unbounded key space.
		{[]string{"put", "--sequential-keys"}, defaultCfg, bench.PutOptions{KeySize: 8, ValSize: 256, SequentialKeys: true}},
		{[]string{"put", "--sequential-keys", "--key-space-size=1"}, defaultCfg, bench.PutOptions{KeySize: 8, ValSize: 256, KeySpaceSize: 1, SequentialKeys: true}},
		{[]string{"put", "--key-space-size=1000"}, defaultCfg, bench.PutOptions{KeySize: 8, ValSize: 256, KeySpaceSize: 1000}},

		// The command lines of scripts/bench.sh and scripts/bench-auth.sh.
		{strings.Fields("--endpoints=127.0.0.1:2379 --target-name=etcd --json --conns=1 --clients=1 put --key-size=8 --val-size=256 --total=5000"),
			cfg(func(c *bench.Config) { c.TargetName, c.Total = "etcd", 5000 }), defPut},
		{strings.Fields("--endpoints=127.0.0.1:2379,127.0.0.1:2380 --target-name=kvmesh --json --conns=100 --clients=1000 put --key-size=8 --val-size=256 --sequential-keys --total=100000"),
			cfg(func(c *bench.Config) {
				c.Endpoints, c.TargetName, c.Conns, c.Clients, c.Total = []string{"127.0.0.1:2379", "127.0.0.1:2380"}, "kvmesh", 100, 1000, 100000
			}), bench.PutOptions{KeySize: 8, ValSize: 256, SequentialKeys: true}},
		{strings.Fields("--endpoints=127.0.0.1:2379 --target-name=etcd --json --conns=100 --clients=1000 range foo --consistency=s --total=100000"),
			cfg(func(c *bench.Config) { c.TargetName, c.Conns, c.Clients, c.Total = "etcd", 100, 1000, 100000 }),
			bench.RangeOptions{Key: "foo", Consistency: "s"}},
		{strings.Fields("--endpoints=127.0.0.1:2379 --target-name=etcd --json --conns=100 --clients=1000 lease-keepalive --leases-per-client=10 --total=200000"),
			cfg(func(c *bench.Config) { c.TargetName, c.Conns, c.Clients, c.Total = "etcd", 100, 1000, 200000 }),
			bench.LeaseOptions{TTL: 100, LeasesPerClient: 10}},
		{strings.Fields("--endpoints=127.0.0.1:2379 --target-name=etcd --json --conns=100 --clients=1000 lease-keepalive --once --total=50000"),
			cfg(func(c *bench.Config) { c.TargetName, c.Conns, c.Clients, c.Total = "etcd", 100, 1000, 50000 }),
			bench.LeaseOptions{TTL: 100, LeasesPerClient: 1, Once: true}},
		{strings.Fields("--endpoints=127.0.0.1:2379 --target-name=etcd --json --conns=8 --clients=8 mixed --key-space-size=1000 --total=20000"),
			cfg(func(c *bench.Config) { c.TargetName, c.Conns, c.Clients, c.Total = "etcd", 8, 8, 20000 }), defMixed},
		{strings.Fields("--endpoints=127.0.0.1:2379 --target-name=auth-on --user=bench:benchpw --json --conns=100 --clients=1000 range foo --consistency=l --total=100000"),
			cfg(func(c *bench.Config) {
				c.TargetName, c.User, c.Password, c.Conns, c.Clients, c.Total = "auth-on", "bench", "benchpw", 100, 1000, 100000
			}), bench.RangeOptions{Key: "foo", Consistency: "l"}},

		// The command lines of scripts/bench-watch.sh.
		{[]string{"--json", "--endpoints=127.0.0.1:2379", "--conns=10", "--target-name=kvmesh gateway", "watch",
			"--watchers=100000", "--streams=100", "--rates=1000", "--step=30s", "--settle=10s", "--server-pids=42"},
			cfg(func(c *bench.Config) { c.Total, c.Conns, c.TargetName = 0, 10, "kvmesh gateway" }),
			watch(func(o *bench.WatchOptions) {
				o.Step, o.Settle, o.ServerPIDs = 30*time.Second, 10*time.Second, []int{42}
			})},
		{[]string{"--json", "--endpoints=127.0.0.1:2379,127.0.0.1:2380", "--conns=10", "--target-name=2 gateways", "watch", "--hot", "--prefix=/scale2/",
			"--watchers=1000", "--streams=10", "--rates=1, 2,4.5", "--step=10s", "--max-p99=1s"},
			cfg(func(c *bench.Config) {
				c.Total, c.Conns, c.TargetName, c.Endpoints = 0, 10, "2 gateways", []string{"127.0.0.1:2379", "127.0.0.1:2380"}
			}),
			watch(func(o *bench.WatchOptions) {
				o.Hot, o.Prefix, o.Watchers, o.Streams, o.Rates, o.MaxP99 = true, "/scale2/", 1000, 10, []float64{1, 2, 4.5}, time.Second
			})},
		{[]string{"--json", "--endpoints=127.0.0.1:2379", "--conns=100", "--target-name=kvmesh, 1 gateway", "watch", "--from-past",
			"--watchers=1000000", "--streams=1000", "--rates=1000", "--step=30s", "--drain=30s", "--settle=10s", "--server-pids=7,8",
			"--core-metrics=http://127.0.0.1:9/metrics", "--core-pids=9", "--idle-window=5s"},
			cfg(func(c *bench.Config) { c.Total, c.Conns, c.TargetName = 0, 100, "kvmesh, 1 gateway" }),
			watch(func(o *bench.WatchOptions) {
				o.FromPast, o.Watchers, o.Streams, o.Step, o.Drain, o.Settle = true, 1000000, 1000, 30*time.Second, 30*time.Second, 10*time.Second
				o.ServerPIDs, o.CoreMetrics, o.CorePIDs, o.IdleWindow = []int{7, 8}, []string{"http://127.0.0.1:9/metrics"}, []int{9}, 5*time.Second
			})},
	} {
		got, code, stderr := parse(t, tc.args...)
		if code != 0 || got == nil {
			t.Errorf("%q: exit %d, ran %v, stderr:\n%s", tc.args, code, got != nil, stderr)
			continue
		}
		if !reflect.DeepEqual(got.cfg, tc.cfg) {
			t.Errorf("%q: config\n got %+v\nwant %+v", tc.args, got.cfg, tc.cfg)
		}
		if !reflect.DeepEqual(got.opts, tc.opts) {
			t.Errorf("%q: options\n got %+v\nwant %+v", tc.args, got.opts, tc.opts)
		}
	}
}

func TestUsageErrorsRunNothing(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string // in stderr
	}{
		{[]string{}, "a command is required"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"range"}, "expected KEY [RANGE_END]"},
		{[]string{"range", "a", "b", "c"}, "expected KEY [RANGE_END]"},
		{[]string{"put", "extra"}, "unexpected arguments"},
		{[]string{"lease-keepalive", "x"}, "unexpected arguments"},
		{[]string{"mixed", "x"}, "unexpected arguments"},
		{[]string{"put", "--no-such-flag"}, "unknown flag: --no-such-flag"},
		{[]string{"put", "--total=many"}, "invalid argument"},
		{[]string{"--conns", "put"}, "invalid argument"},
		{[]string{"range", "k", "--duration=soon"}, "invalid argument"},
		{[]string{"--plot=" + filepath.Join(dir, "run.pdf"), "put"}, `unsupported format ".pdf": want .svg or .png`},
		{[]string{"put", "--plot", filepath.Join(dir, "run")}, "has no extension"},
		{[]string{"range", "k", "--plot=" + filepath.Join(dir, "run.jpg")}, "want .svg or .png"},
		{[]string{"watch", "--plot=" + filepath.Join(dir, "run.svg")}, "watch records no timeline"},
		{[]string{"watch", "--rates=1,x"}, "--rates"},
		{[]string{"watch", "--server-pids=1,x"}, "--server-pids"},
		{[]string{"watch", "--core-pids=x"}, "--core-pids"},
		{[]string{"chart", "results.tsv"}, "--out DIR is required"},
		{[]string{"chart", "--out", dir}, "expected one RESULTS.tsv"},
	} {
		got, code, stderr := parse(t, tc.args...)
		if code != 2 || got != nil {
			t.Errorf("%q: exit %d, ran %v; want exit 2 without running", tc.args, code, got != nil)
		}
		if !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: stderr lacks %q:\n%s", tc.args, tc.want, stderr)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("a rejected command line wrote %v", ents)
	}
	// Help is no error.
	for _, args := range [][]string{{"-h"}, {"--help"}, {"range", "-h"}, {"help", "put"}, {"chart", "--help"}} {
		var stdout bytes.Buffer
		a := &app{stdout: &stdout, stderr: io.Discard}
		if code := a.run(context.Background(), args); code != 0 || !strings.Contains(stdout.String(), "Usage:") {
			t.Errorf("%q: exit %d, stdout %q", args, code, stdout.String())
		}
	}
}

func TestExitCodes(t *testing.T) {
	run := func(rep *bench.Report, err error, args ...string) int {
		a := &app{stdout: io.Discard, stderr: io.Discard,
			bench: func(context.Context, bench.Config, any) (*bench.Report, error) { return rep, err }}
		return a.run(context.Background(), args)
	}
	if code := run(nil, errors.New("boom"), "put"); code != 1 {
		t.Errorf("failed run: exit %d, want 1", code)
	}
	if code := run(&bench.Report{Interrupted: true}, nil, "put"); code != 130 {
		t.Errorf("interrupted run: exit %d, want 130", code)
	}
	if code := run(&bench.Report{}, nil, "--plot="+filepath.Join(t.TempDir(), "no", "such", "dir.svg"), "put"); code != 1 {
		t.Errorf("unwritable plot: exit %d, want 1", code)
	}
}

type rangeRecorder struct {
	etcdserverpbconnect.UnimplementedKVHandler
	mu    sync.Mutex
	reqs  []*etcdserverpb.RangeRequest
	delay time.Duration
}

func (r *rangeRecorder) Range(_ context.Context, req *connect.Request[etcdserverpb.RangeRequest]) (*connect.Response[etcdserverpb.RangeResponse], error) {
	r.mu.Lock()
	r.reqs = append(r.reqs, req.Msg)
	r.mu.Unlock()
	time.Sleep(r.delay)
	return connect.NewResponse(&etcdserverpb.RangeResponse{}), nil
}

func startRangeServer(t *testing.T, rec *rangeRecorder) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(etcdserverpbconnect.NewKVHandler(rec))
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: mux, Protocols: p}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestRunRangeJSON(t *testing.T) {
	rec := &rangeRecorder{}
	addr := startRangeServer(t, rec)

	var stdout, stderr bytes.Buffer
	args := []string{"--endpoints=" + addr, "--conns=2", "--json",
		"range", "a", "--consistency=s", "z", "--total=30", "--limit=7", "--clients=3", "--target-name=mem"}
	if code := run(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, stderr.String())
	}
	var rep struct {
		Target    string         `json:"target"`
		Op        string         `json:"op"`
		Conns     int            `json:"conns"`
		Clients   int            `json:"clients"`
		Succeeded int64          `json:"succeeded"`
		Params    map[string]any `json:"params"`
		Timeline  []struct {
			Succeeded int64 `json:"succeeded"`
		} `json:"timeline"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("stdout is not one JSON object: %v\n%s", err, stdout.String())
	}
	if rep.Target != "mem" || rep.Op != "range" || rep.Conns != 2 || rep.Clients != 3 || rep.Succeeded != 30 {
		t.Errorf("report: %+v", rep)
	}
	var inTimeline int64
	for _, p := range rep.Timeline {
		inTimeline += p.Succeeded
	}
	if len(rep.Timeline) == 0 || inTimeline != 30 {
		t.Errorf("timeline of %d points holds %d requests, want 30", len(rep.Timeline), inTimeline)
	}
	if !strings.Contains(stderr.String(), "Latency distribution:") {
		t.Errorf("text report missing from stderr:\n%s", stderr.String())
	}
	if strings.Contains(stderr.String(), "\r") {
		t.Errorf("progress bar drawn on a non-terminal")
	}
	if len(rec.reqs) != 30 {
		t.Fatalf("server saw %d requests", len(rec.reqs))
	}
	got := rec.reqs[0]
	if string(got.Key) != "a" || string(got.RangeEnd) != "z" || !got.Serializable || got.Limit != 7 {
		t.Errorf("request = %v", got)
	}
}

func TestRunUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"range"},
		{"range", "a", "b", "c"},
		{"put", "extra"},
		{"put", "--no-such-flag"},
	} {
		if code := run(context.Background(), args, io.Discard, io.Discard); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"range", "a", "--consistency=x", "--endpoints=127.0.0.1:1"}, io.Discard, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "consistency") {
		t.Errorf("bad consistency: exit %d, stderr %q", code, stderr.String())
	}
}

// TestPlot runs a benchmark against a test server with --plot and checks the
// charts: an SVG that parses as XML and names the run, a PNG that decodes.
func TestPlot(t *testing.T) {
	rec := &rangeRecorder{delay: time.Millisecond}
	addr := startRangeServer(t, rec)
	dir := t.TempDir()

	svgPath := filepath.Join(dir, "run.svg")
	var stdout, stderr bytes.Buffer
	args := []string{"--endpoints=" + addr, "--clients=4", "--target-name=memkv", "--duration=300ms", "range", "k", "--plot=" + svgPath}
	if code := run(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), "Latency distribution:") {
		t.Errorf("no report on stdout:\n%s", stdout.String())
	}
	b, err := os.ReadFile(svgPath)
	if err != nil {
		t.Fatal(err)
	}
	texts := svgTexts(t, b)
	for _, want := range []string{"memkv: range, 1 conn / 4 clients", "requests/s (succeeded)", "latency (ms)", "p50", "p99", "average"} {
		if !slices.ContainsFunc(texts, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("SVG has no text %q; it has %q", want, texts)
		}
	}

	pngPath := filepath.Join(dir, "RUN.PNG")
	args = []string{"--endpoints=" + addr, "--clients=2", "--json", "put", "--total=50", "--plot", pngPath}
	stdout.Reset()
	// The fake server has no Put: every request fails, and the chart is drawn anyway.
	if code := run(context.Background(), args, &stdout, io.Discard); code != 0 {
		t.Fatalf("exit %d", code)
	}
	f, err := os.Open(pngPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() != 960 || b.Dy() != 720 {
		t.Errorf("PNG is %v, want 960×720", b)
	}
	var rep struct{ Failed int64 }
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil || rep.Failed != 50 {
		t.Errorf("JSON report %q (%v), want 50 failed", stdout.String(), err)
	}
}

// svgTexts parses b as an SVG document and returns its text elements.
func svgTexts(t *testing.T, b []byte) []string {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(b))
	var (
		texts  []string
		root   string
		inText bool
		elems  int
	)
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not XML: %v", err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			if root == "" {
				root = tok.Name.Local
			}
			elems++
			inText = tok.Name.Local == "text"
		case xml.CharData:
			if inText {
				texts = append(texts, string(tok))
			}
		case xml.EndElement:
			inText = false
		}
	}
	if root != "svg" || elems < 20 {
		t.Fatalf("root element %q, %d elements: not a drawn SVG", root, elems)
	}
	return texts
}

const sampleResults = "1\tput, 1 conn / 1 client\tetcd\t1500.5\t0.00066\t0.0012\t0\t310.2\n" +
	"1\tput, 1 conn / 1 client\tkvmesh\t2100\t0.00047\t0.0009\t0\t250\n" +
	"1\tlease-keepalive once (etcd's benchmark), 100 / 1000\tetcd\t30000\t0.033\t0.08\t0\t40\n" +
	"1\tlease-keepalive once (etcd's benchmark), 100 / 1000\tkvmesh\t45000\t0.022\t0.05\t2\t35\n" +
	"1\tmixed: get 50%, put 25%, CAS 15%, delete 10%, 8 conns / 8 clients\tetcd\t9000\t0.0009\t0.002\t0\t100\n" +
	"1\tmixed: get 50%, put 25%, CAS 15%, delete 10%, 8 conns / 8 clients\tkvmesh\t8000\t0.001\t0.003\t0\t120\n" +
	"\n" +
	"2\tput, 1 conn / 1 client\tetcd\t1600\t0.00062\t0.0011\t0\t300\n" +
	"2\tput, 1 conn / 1 client\tkvmesh\t2000\t0.00049\t0.001\t0\t260\n" +
	"2\tlease-keepalive once (etcd's benchmark), 100 / 1000\tetcd\t31000\t0.032\t0.07\t0\t41\n" +
	"2\tlease-keepalive once (etcd's benchmark), 100 / 1000\tkvmesh\t47000\t0.021\t0.04\t0\t34\n" +
	"2\tmixed: get 50%, put 25%, CAS 15%, delete 10%, 8 conns / 8 clients\tetcd\t9100\t0.00088\t0.002\t0\t99\n" +
	"2\tmixed: get 50%, put 25%, CAS 15%, delete 10%, 8 conns / 8 clients\tkvmesh\t8100\t0.00099\t0.003\t0\t118\n"

func TestChart(t *testing.T) {
	dir := t.TempDir()
	results := filepath.Join(dir, "results.tsv")
	if err := os.WriteFile(results, []byte(sampleResults), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "charts")
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"chart", results, "--out", out, "--prefix=allinone-", "--title=all-in-one"}, io.Discard, &stderr); code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, stderr.String())
	}
	first := map[string][]byte{}
	for file, want := range map[string][]string{
		// Medians of the two rounds, formatted; the labels; the kvmesh/etcd ratios.
		"throughput.svg": {"all-in-one: throughput (requests/s)", "median of 2 rounds", "1.55k", "2.05k", "30.5k", "46.0k", "1.32×", "0.89×"},
		"latency.svg":    {"all-in-one: average latency (ms)", "0.64", "0.48", "32.5", "21.5"},
		"cpu.svg":        {"server CPU per request (µs)", "305", "255"},
	} {
		b, err := os.ReadFile(filepath.Join(out, "allinone-"+file))
		if err != nil {
			t.Fatal(err)
		}
		first[file] = b
		texts := svgTexts(t, b)
		want = append(want, "etcd", "kvmesh", "put", "1 / 1", "lease-keepalive", "once", "100 / 1000", "mixed", "8 / 8")
		for _, w := range want {
			if !slices.ContainsFunc(texts, func(s string) bool { return strings.Contains(s, w) }) {
				t.Errorf("%s has no text %q; it has %q", file, w, texts)
			}
		}
		for _, s := range texts {
			if strings.Contains(s, "benchmark") || strings.Contains(s, "CAS") {
				t.Errorf("%s: a label is not shortened: %q", file, s)
			}
		}
	}
	if !strings.Contains(stderr.String(), filepath.Join(out, "allinone-cpu.svg")) {
		t.Errorf("stderr does not name the files written:\n%s", stderr.String())
	}

	// The same input, the same files.
	if code := run(context.Background(), []string{"chart", "--out=" + out, "--prefix=allinone-", "--title=all-in-one", results}, io.Discard, io.Discard); code != 0 {
		t.Fatalf("second run: exit %d", code)
	}
	for file, b := range first {
		again, _ := os.ReadFile(filepath.Join(out, "allinone-"+file))
		if !bytes.Equal(b, again) {
			t.Errorf("%s differs between two runs on the same input", file)
		}
	}
}

func TestChartMalformed(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, content, want string
	}{
		{"short.tsv", "1\tput\tetcd\t100\t0.1\t0.2\t0\t5\n1\tput\tkvmesh\t100\t0.1\t0\t5\n", "short.tsv:2: 7 tab-separated fields, want 8"},
		{"spaces.tsv", "1 put etcd 100 0.1 0.2 0 5\n", "spaces.tsv:1: 1 tab-separated fields, want 8"},
		{"rate.tsv", "1\tput\tetcd\tfast\t0.1\t0.2\t0\t5\n", `rate.tsv:1: field 4 (requests_per_sec) "fast": not a finite number`},
		{"round.tsv", "one\tput\tetcd\t1\t0.1\t0.2\t0\t5\n", `round.tsv:1: field 1 (round) "one": not an integer`},
		{"failed.tsv", "1\tput\tetcd\t1\t0.1\t0.2\t1.5\t5\n", `field 7 (failed) "1.5"`},
		{"nan.tsv", "1\tput\tetcd\t1\t0.1\tNaN\t0\t5\n", `field 6 (latency p99 (s)) "NaN"`},
		{"target.tsv", "1\tput\t\t1\t0.1\t0.2\t0\t5\n", `field 3 (target) "": empty`},
		{"empty.tsv", "\n\n", "empty.tsv: no measurements"},
	} {
		path := filepath.Join(dir, tc.name)
		if err := os.WriteFile(path, []byte(tc.content), 0o644); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(dir, "out-"+tc.name)
		var stderr bytes.Buffer
		if code := run(context.Background(), []string{"chart", "--out", out, path}, io.Discard, &stderr); code != 1 {
			t.Errorf("%s: exit %d, want 1", tc.name, code)
		}
		if !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%s: stderr lacks %q:\n%s", tc.name, tc.want, stderr.String())
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%s: charts written for malformed input", tc.name)
		}
	}
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"chart", "--out", dir, filepath.Join(dir, "missing.tsv")}, io.Discard, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "missing.tsv") {
		t.Errorf("missing file: exit %d, stderr %q", code, stderr.String())
	}
}
