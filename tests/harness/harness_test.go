package harness_test

import (
	"context"
	"net/http"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestEtcdLifecycle validates the harness itself against real etcd: start,
// write, SIGKILL, restart on the same data dir and ports, graceful stop,
// restart again.
func TestEtcdLifecycle(t *testing.T) {
	s := harness.StartEtcd(t, harness.Options{Name: "lifecycle"})
	if s.Kind() != harness.KindEtcd || s.Name() != "lifecycle" || s.Pid() == 0 || !s.Running() {
		t.Fatalf("unexpected server state: kind %s name %s pid %d running %v", s.Kind(), s.Name(), s.Pid(), s.Running())
	}
	if fi, err := os.Stat(s.DataDir()); err != nil || !fi.IsDir() {
		t.Fatalf("data dir %s: %v", s.DataDir(), err)
	}
	endpoint, dataDir := s.Endpoint(), s.DataDir()

	put := func(k, v string) {
		t.Helper()
		cli := etcdclient.NewClient(t, s)
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := cli.Put(ctx, k, v); err != nil {
			t.Fatalf("put %s: %v", k, err)
		}
	}
	get := func(k string) string {
		t.Helper()
		cli := etcdclient.NewClient(t, s)
		defer cli.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r, err := cli.Get(ctx, k)
		if err != nil {
			t.Fatalf("get %s: %v", k, err)
		}
		if len(r.Kvs) == 0 {
			return ""
		}
		return string(r.Kvs[0].Value)
	}

	put("k", "v1")
	s.Kill()
	if s.Running() || s.Pid() != 0 {
		t.Fatalf("still running after Kill")
	}
	resp, err := (&http.Client{Timeout: time.Second}).Get(s.ClientURL() + "/health")
	if err == nil {
		resp.Body.Close()
		t.Fatalf("health endpoint answers after Kill")
	}
	s.Restart()
	if s.Endpoint() != endpoint || s.DataDir() != dataDir {
		t.Fatalf("restart moved the server: %s %s -> %s %s", endpoint, dataDir, s.Endpoint(), s.DataDir())
	}
	if got := get("k"); got != "v1" {
		t.Fatalf("after kill+restart: k=%q, want v1", got)
	}
	put("k", "v2")
	s.Stop()
	if s.Running() {
		t.Fatalf("still running after Stop")
	}
	s.Restart()
	if got := get("k"); got != "v2" {
		t.Fatalf("after stop+restart: k=%q, want v2", got)
	}
	// Restart of a running server stops it first.
	s.Restart()
	if got := get("k"); got != "v2" {
		t.Fatalf("after restart of a running server: k=%q, want v2", got)
	}
}

// TestTwoEtcds checks that two servers get distinct ports and clusters.
func TestTwoEtcds(t *testing.T) {
	a := harness.StartEtcd(t)
	b := harness.StartEtcd(t)
	if a.Endpoint() == b.Endpoint() || a.DataDir() == b.DataDir() {
		t.Fatalf("servers share an endpoint or data dir: %s %s / %s %s", a.Endpoint(), a.DataDir(), b.Endpoint(), b.DataDir())
	}
	ids := map[uint64]bool{}
	for _, s := range []*harness.Server{a, b} {
		cli, err := clientv3.New(etcdclient.ClientConfig(s.Endpoint()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		r, err := cli.Get(ctx, "x")
		cancel()
		cli.Close()
		if err != nil {
			t.Fatalf("get from %s: %v", s.Endpoint(), err)
		}
		ids[r.Header.ClusterId] = true
	}
	if len(ids) != 2 {
		t.Fatalf("both etcds report the same cluster id")
	}
}

func TestTarget(t *testing.T) {
	t.Setenv("KVMESH_E2E_TARGET", "")
	if k, err := harness.Target(); err != nil || k != harness.KindKvmesh {
		t.Fatalf("default target %q %v, want kvmesh", k, err)
	}
	t.Setenv("KVMESH_E2E_TARGET", "etcd")
	if k, err := harness.Target(); err != nil || k != harness.KindEtcd {
		t.Fatalf("target %q %v, want etcd", k, err)
	}
	t.Setenv("KVMESH_E2E_TARGET", "bogus")
	if _, err := harness.Target(); err == nil {
		t.Fatalf("bogus target accepted")
	}
}

func TestRepoRoot(t *testing.T) {
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(root + "/go.work"); err != nil {
		t.Fatalf("harness.RepoRoot %s has no go.work: %v", root, err)
	}
}
