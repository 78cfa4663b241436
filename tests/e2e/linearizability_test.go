package e2e

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/libs/linearizable"
	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestMeshIsLinearizableUnderFaults runs concurrent clientv3 clients doing puts,
// linearizable gets and compare-and-swap txns, each client through one of the two
// gateways, against three replica processes while each replica in turn is cut off
// from its peers and healed, and the leader is killed with SIGKILL and restarted. The
// history must be linearizable (porcupine); when it is not, the visualization is kept
// (under KVMESH_ARTIFACTS when set).
func TestMeshIsLinearizableUnderFaults(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	m := startMesh(t, 3, "KVMESH_REPLICA_ENABLE_FAULT_INJECTION=true")
	var clients []*clientv3.Client
	for _, e := range m.endpoints {
		cli, err := clientv3.New(etcdclient.ClientConfig(e))
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		clients = append(clients, cli)
	}

	w := &linearizable.Workload{Keys: []string{"lin/a", "lin/b", "lin/c"}, Clients: 8, Seed: 7, Timeout: 3 * time.Second,
		Do: func(ctx context.Context, c int, in linearizable.Input) (linearizable.Output, error) {
			return clientOp(ctx, clients[c%len(clients)], in)
		}}
	w.Start()

	fault := func(url, what string) {
		resp, err := http.Post(url+"/debug/faults/"+what, "text/plain", nil)
		if err != nil {
			t.Errorf("fault %s on %s: %v", what, url, err)
			return
		}
		resp.Body.Close()
	}
	for _, u := range m.urls {
		time.Sleep(700 * time.Millisecond)
		fault(u, "isolate")
		time.Sleep(1500 * time.Millisecond)
		fault(u, "heal")
	}
	// Kill the leader (the member the others name), then bring it back.
	time.Sleep(700 * time.Millisecond)
	st, err := clients[0].Status(ctxT(t), m.endpoints[0])
	if err != nil {
		t.Fatal(err)
	}
	ml, err := clients[0].MemberList(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, mem := range ml.Members {
		for i, u := range m.urls {
			if mem.ID == st.Leader && len(mem.PeerURLs) > 0 && mem.PeerURLs[0] == u {
				m.replicas[i].kill()
				time.Sleep(2 * time.Second)
				m.replicas[i].start()
			}
		}
	}
	time.Sleep(2 * time.Second)
	path := filepath.Join(t.TempDir(), "history.html")
	if dir := os.Getenv("KVMESH_ARTIFACTS"); dir != "" {
		path = filepath.Join(dir, "mesh-linearizability-history.html")
	}
	res, ops, known, err := w.Stop(120*time.Second, path)
	t.Logf("%d operations (%d with known outcome) checked: %s", ops, known, res)
	if known < 200 {
		t.Fatalf("only %d operations completed: the history proves little", known)
	}
	if res != porcupine.Ok {
		t.Fatalf("history is %s; visualization in %s (%v)", res, path, err)
	}
}

// clientOp runs one register operation through clientv3.
func clientOp(ctx context.Context, cli *clientv3.Client, in linearizable.Input) (linearizable.Output, error) {
	switch in.Op {
	case "get":
		r, err := cli.Get(ctx, in.Key)
		if err != nil {
			return linearizable.Output{}, err
		}
		if len(r.Kvs) == 0 {
			return linearizable.Output{}, nil
		}
		return linearizable.Output{Value: string(r.Kvs[0].Value)}, nil
	case "put":
		_, err := cli.Put(ctx, in.Key, in.Value)
		return linearizable.Output{}, err
	default:
		cmp := clientv3.Compare(clientv3.Value(in.Key), "=", in.Expected)
		if in.Expected == "" {
			// The register's empty state is an absent key.
			cmp = clientv3.Compare(clientv3.Version(in.Key), "=", 0)
		}
		r, err := cli.Txn(ctx).If(cmp).Then(clientv3.OpPut(in.Key, in.Value)).Commit()
		if err != nil {
			return linearizable.Output{}, err
		}
		return linearizable.Output{OK: r.Succeeded}, nil
	}
}
