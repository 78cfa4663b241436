package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// An all-in-one started with KVMESH_NATS_EMBEDDED_LISTEN shares its revision stream:
// it runs the fanout and an embedded NATS server, and a second gateway (its own
// process, consuming that stream) serves watches of the all-in-one's writes, with
// prev_kv, as the all-in-one's own gateway does.
func TestAllInOneSharesItsRevisionStream(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh || harness.Topology() == harness.TopologyMesh {
		t.Skip("the all-in-one only")
	}
	gatewayBin, err := harness.BuildPackage("github.com/kvmesh/kvmesh/services/gateway/cmd/kvmesh-gateway")
	if err != nil {
		t.Fatal(err)
	}
	natsAddr, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	aio := harness.StartKvmesh(t, harness.Options{Env: []string{"KVMESH_NATS_EMBEDDED_LISTEN=" + natsAddr}})
	cli := etcdclient.NewClient(t, aio)
	ml, err := cli.MemberList(ctxT(t))
	if err != nil || len(ml.Members) != 1 || len(ml.Members[0].PeerURLs) == 0 {
		t.Fatalf("MemberList: %v, %v", ml, err)
	}
	addr, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	g := &proc{t: t, name: "g1", bin: gatewayBin, log: filepath.Join(dir, "g1.log"),
		env: []string{"KVMESH_GATEWAY_LISTEN=" + addr, "KVMESH_GATEWAY_REPLICAS=" + ml.Members[0].PeerURLs[0],
			"KVMESH_NATS_URL=nats://" + natsAddr, "KVMESH_LOG_FORMAT=text"}}
	g.start()
	t.Cleanup(g.kill)
	waitHealthy(t, "http://"+addr, []*proc{g})
	other, err := clientv3.New(etcdclient.ClientConfig(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	prefix := prefixFor(t)
	// The watches start after v0's revision, so when each is created does not matter.
	from := mustPut(t, cli, prefix+"k", "v0").Header.Revision + 1
	ctx := ctxT(t)
	watches := map[string]clientv3.WatchChan{
		"the all-in-one":     cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithRev(from)),
		"the second gateway": other.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithRev(from)),
	}
	var revs []int64
	for i := 1; i <= 3; i++ {
		revs = append(revs, mustPut(t, cli, prefix+"k", fmt.Sprint("v", i)).Header.Revision)
	}
	for name, wch := range watches {
		var got []string
		for len(got) < 3 {
			select {
			case resp := <-wch:
				if err := resp.Err(); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				for _, ev := range resp.Events {
					if ev.PrevKv == nil {
						t.Fatalf("%s: an event without prev_kv: %v", name, ev)
					}
					got = append(got, fmt.Sprintf("%d:%s<-%s", ev.Kv.ModRevision, ev.Kv.Value, ev.PrevKv.Value))
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: events %v after 10 s, want 3", name, got)
			}
		}
		want := fmt.Sprintf("%d:v1<-v0 %d:v2<-v1 %d:v3<-v2", revs[0], revs[1], revs[2])
		if strings.Join(got, " ") != want {
			t.Fatalf("%s: events %v, want %s", name, got, want)
		}
	}
}
