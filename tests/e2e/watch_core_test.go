package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// rpcCounts reads the calls a process's /metrics counts by procedure
// (grpc_server_started_total, service/method).
func rpcCounts(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		rest, ok := strings.CutPrefix(line, "grpc_server_started_total{")
		if !ok {
			continue
		}
		labels, value, _ := strings.Cut(rest, "} ")
		var service, method string
		for _, kv := range strings.Split(labels, ",") {
			k, v, _ := strings.Cut(kv, "=")
			v = strings.Trim(v, `"`)
			switch k {
			case "grpc_service":
				service = v
			case "grpc_method":
				method = v
			}
		}
		f, _ := strconv.ParseFloat(strings.TrimSpace(value), 64)
		out[service+"/"+method] += f
	}
	return out
}

// replicaCalls sums rpcCounts over the replicas.
func replicaCalls(t *testing.T, m *mesh) map[string]float64 {
	sum := map[string]float64{}
	for _, u := range m.urls {
		for k, v := range rpcCounts(t, u) {
			sum[k] += v
		}
	}
	return sum
}

// TestMeshWatchCreationsNeverReachTheReplicas creates thousands of watches that start
// in the past (as every Kubernetes reflector's do) through one gateway, and checks on
// the replicas' own RPC metrics that no internal RPC was called more often while they
// were created than while the mesh stood idle: the gateway decides creations from the
// revision stream and its state alone. A compaction and a permission change, made
// meanwhile, are answered as etcd answers them.
func TestMeshWatchCreationsNeverReachTheReplicas(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	m := startMesh(t, 3)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cli := etcdclient.NewClientFor(t, m.endpoints[0])
	var first int64
	for i := range 50 {
		r, err := cli.Put(ctx, fmt.Sprintf("wc/%02d", i%10), fmt.Sprint(i))
		if err != nil {
			t.Fatal(err)
		}
		if first == 0 {
			first = r.Header.Revision
		}
	}
	// Let the gateway's hub take every revision.
	wch := cli.Watch(ctx, "wc/", clientv3.WithPrefix(), clientv3.WithRev(first))
	for n := 0; n < 50; {
		select {
		case wr := <-wch:
			n += len(wr.Events)
		case <-time.After(10 * time.Second):
			t.Fatal("the hub did not deliver the first writes")
		}
	}

	conn, err := grpc.NewClient(m.endpoints[0], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const streams, perStream = 20, 150
	create := func() time.Duration {
		start := time.Now()
		for range streams {
			s, err := pb.NewWatchClient(conn).Watch(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for i := range perStream {
				cr := &pb.WatchCreateRequest{Key: []byte(fmt.Sprintf("wc/%02d", i%10)), StartRevision: first + int64(i%40)}
				if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: cr}}); err != nil {
					t.Fatal(err)
				}
			}
			for created := 0; created < perStream; {
				r, err := s.Recv()
				if err != nil {
					t.Fatal(err)
				}
				if r.Canceled {
					t.Fatalf("a watch from revision %d was canceled: %+v", first, r)
				}
				if r.Created {
					created++
				}
			}
		}
		return time.Since(start)
	}

	// The replicas' calls in a window while nothing happens, then in a window as long
	// in which the watches are created.
	const window = 3 * time.Second
	before := replicaCalls(t, m)
	time.Sleep(window)
	idle := replicaCalls(t, m)
	start := time.Now()
	took := create()
	time.Sleep(window - time.Since(start))
	after := replicaCalls(t, m)
	var excess []string
	for k := range after {
		idleCalls, during := idle[k]-before[k], after[k]-idle[k]
		if during > idleCalls*1.5+5 {
			excess = append(excess, fmt.Sprintf("%s: %.0f calls in the %v in which the watches were created, %.0f in as long idle", k, during, window, idleCalls))
		}
	}
	if len(excess) > 0 {
		sort.Strings(excess)
		t.Fatalf("creating %d watches from the past called the replicas:\n%s", streams*perStream, strings.Join(excess, "\n"))
	}
	t.Logf("%d watches from the past created in %v; no replica RPC above its idle rate", streams*perStream, took)

	// A compaction through the other gateway: a watch below it on this one is canceled
	// with the compacted revision, once the stream's state has told it.
	cli1 := etcdclient.NewClientFor(t, m.endpoints[1])
	last, err := cli1.Put(ctx, "wc/last", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli1.Compact(ctx, last.Header.Revision); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a watch below the compaction through the other gateway canceled", 10*time.Second, func() bool {
		wctx, wcancel := context.WithTimeout(ctx, 2*time.Second)
		defer wcancel()
		wr, ok := <-cli.Watch(wctx, "wc/00", clientv3.WithRev(first))
		return ok && wr.Canceled && wr.CompactRevision == last.Header.Revision
	})
}
