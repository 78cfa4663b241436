package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
)

// startEtcd runs Debian's etcd (the test script installs it) on free ports.
func startEtcd(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if _, statErr := os.Stat("/usr/bin/etcd"); statErr != nil {
			if os.Getenv("CI") != "" {
				t.Fatal("no etcd binary: scripts/test.sh installs Debian's etcd-server")
			}
			t.Skip("no etcd binary (scripts/test.sh installs Debian's etcd-server)")
		}
		bin = "/usr/bin/etcd"
	}
	port := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port
	}
	client, peer := fmt.Sprintf("127.0.0.1:%d", port()), fmt.Sprintf("http://127.0.0.1:%d", port())
	cmd := exec.Command(bin, "--data-dir", t.TempDir(), "--log-level", "error",
		"--listen-client-urls", "http://"+client, "--advertise-client-urls", "http://"+client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default="+peer)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for range 100 {
		if c, err := net.Dial("tcp", client); err == nil {
			c.Close()
			return client
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("etcd did not start")
	return ""
}

// The mixed workload against a real etcd: every request succeeds, and each kind of
// operation has the effect on the store's revision that it should.
func TestMixedAgainstEtcd(t *testing.T) {
	addr := startEtcd(t)
	cfg := testConfig(addr)
	cfg.TargetName = "etcd"
	revision := func() int64 {
		t.Helper()
		conns, err := dialConns(context.Background(), []string{addr}, 1, 5*time.Second, "", "")
		if err != nil {
			t.Fatal(err)
		}
		defer conns[0].close()
		resp, err := conns[0].kv.Range(context.Background(), connect.NewRequest(&etcdserverpb.RangeRequest{Key: []byte("x")}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg.GetHeader().GetRevision()
	}
	run := func(opts MixedOptions) *Report {
		t.Helper()
		opts.KeySize, opts.ValSize, opts.KeySpaceSize = 8, 32, 20
		rep, err := Mixed(context.Background(), cfg, opts)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Succeeded != cfg.Total || rep.Failed != 0 || rep.Op != "mixed" {
			t.Fatalf("mixed %+v: %d succeeded, %d failed (%v), op %q; want %d, 0", opts, rep.Succeeded, rep.Failed, rep.Errors, rep.Op, cfg.Total)
		}
		checkSane(t, rep)
		return rep
	}
	start := revision()
	run(MixedOptions{Delete: 1}) // of keys that do not exist: no revision
	run(MixedOptions{Get: 1})
	if got := revision(); got != start {
		t.Fatalf("deletes of missing keys and gets moved the revision from %d to %d", start, got)
	}
	run(MixedOptions{Put: 1})
	if got := revision(); got != start+cfg.Total {
		t.Fatalf("%d puts moved the revision from %d to %d", cfg.Total, start, got)
	}
	// Every key of the space now holds the value: every CAS succeeds and writes.
	run(MixedOptions{CAS: 1})
	if got := revision(); got != start+2*cfg.Total {
		t.Fatalf("%d CAS txns on keys holding the value moved the revision to %d, want %d", cfg.Total, got, start+2*cfg.Total)
	}
	run(MixedOptions{Get: 50, Put: 25, CAS: 15, Delete: 10})
	if got := revision(); got <= start+2*cfg.Total || got > start+3*cfg.Total {
		t.Fatalf("the mix moved the revision to %d, want within (%d, %d]", got, start+2*cfg.Total, start+3*cfg.Total)
	}
	if _, err := Mixed(context.Background(), cfg, MixedOptions{KeySize: 8, KeySpaceSize: 10}); err == nil {
		t.Error("all weights 0: no error")
	}
}
