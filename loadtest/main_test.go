package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"connectrpc.com/connect"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
)

func TestParseInterleaved(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		wantPos []string
		total   int64
	}{
		{[]string{"foo", "--total=5"}, []string{"foo"}, 5},
		{[]string{"--total", "5", "foo", "bar"}, []string{"foo", "bar"}, 5},
		{[]string{"foo", "--total=5", "bar"}, []string{"foo", "bar"}, 5},
		{[]string{"--", "-foo", "--total=5"}, []string{"-foo", "--total=5"}, 1},
		{[]string{"a", "--", "-b"}, []string{"a", "-b"}, 1},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		total := fs.Int64("total", 1, "")
		pos, err := parseInterleaved(fs, tc.args)
		if err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if !slices.Equal(pos, tc.wantPos) || *total != tc.total {
			t.Errorf("%q: pos=%q total=%d, want %q %d", tc.args, pos, *total, tc.wantPos, tc.total)
		}
	}
}

type rangeRecorder struct {
	etcdserverpbconnect.UnimplementedKVHandler
	mu   sync.Mutex
	reqs []*etcdserverpb.RangeRequest
}

func (r *rangeRecorder) Range(_ context.Context, req *connect.Request[etcdserverpb.RangeRequest]) (*connect.Response[etcdserverpb.RangeResponse], error) {
	r.mu.Lock()
	r.reqs = append(r.reqs, req.Msg)
	r.mu.Unlock()
	return connect.NewResponse(&etcdserverpb.RangeResponse{}), nil
}

func TestRunRangeJSON(t *testing.T) {
	rec := &rangeRecorder{}
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
	defer srv.Close()

	var stdout, stderr bytes.Buffer
	args := []string{"--endpoints=" + ln.Addr().String(), "--conns=2", "--json",
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
	}
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("stdout is not one JSON object: %v\n%s", err, stdout.String())
	}
	if rep.Target != "mem" || rep.Op != "range" || rep.Conns != 2 || rep.Clients != 3 || rep.Succeeded != 30 {
		t.Errorf("report: %+v", rep)
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
