package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestMeshAuth drives auth through a mesh of real processes (3 replicas, 2 gateways)
// with clientv3 and etcdctl: users and roles made through one gateway hold on the
// other at once; a revoked permission is refused on the other gateway on the very
// next request (clientv3 re-authenticates by itself when its token is old); tokens
// that expire are replaced by clientv3 without the application noticing; watches are
// checked at creation; the auth store survives kill -9 of every replica.
func TestMeshAuth(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	m := startMesh(t, 3, "KVMESH_REPLICA_AUTH_TOKEN_TTL=4s", "KVMESH_REPLICA_AUTH_BCRYPT_COST=4")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Set up through gateway 0 with etcdctl, as an operator would.
	g0, g1 := m.endpoints[0], m.endpoints[1]
	run := func(endpoint string, args ...string) string {
		t.Helper()
		r := etcdclient.Etcdctl(t, endpoint, "", args...)
		if r.Err != nil {
			t.Fatalf("%s", r)
		}
		return r.Stdout
	}
	run(g0, "user", "add", "root:rootpw")
	run(g0, "user", "grant-role", "root", "root")
	run(g0, "user", "add", "alice:alicepw")
	run(g0, "role", "add", "app")
	run(g0, "role", "grant-permission", "app", "readwrite", "/app/", "--prefix=true")
	run(g0, "user", "grant-role", "alice", "app")
	if out := run(g0, "auth", "enable"); !strings.Contains(out, "Authentication Enabled") {
		t.Fatalf("auth enable: %q", out)
	}
	if out := run(g1, "--user", "root:rootpw", "role", "get", "app"); !strings.Contains(out, "[/app/, /app0) (prefix /app/)") {
		t.Fatalf("role get through the other gateway: %q", out)
	}
	if out := run(g1, "--user", "root:rootpw", "user", "list"); out != "alice\nroot\n" {
		t.Fatalf("user list: %q", out)
	}
	if r := etcdclient.Etcdctl(t, g1, "", "get", "/app/x"); r.Err == nil || !strings.Contains(r.Stderr, "user name is empty") {
		t.Fatalf("get without a user: %s", r)
	}
	if r := etcdclient.Etcdctl(t, g1, "", "--user", "alice:wrong", "get", "/app/x"); r.Err == nil || !strings.Contains(r.Stderr, "authentication failed") {
		t.Fatalf("get with a wrong password: %s", r)
	}
	run(g1, "--user", "alice:alicepw", "put", "/app/x", "1")
	if r := etcdclient.Etcdctl(t, g1, "", "--user", "alice:alicepw", "put", "/other", "1"); r.Err == nil || !strings.Contains(r.Stderr, "permission denied") {
		t.Fatalf("put outside alice's range: %s", r)
	}

	// clientv3 as alice on each gateway, as root on gateway 0.
	user := func(endpoint, name, pw string) *clientv3.Client {
		cfg := etcdclient.ClientConfig(endpoint)
		cfg.Username, cfg.Password = name, pw
		c, err := clientv3.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	alice0, alice1, root := user(g0, "alice", "alicepw"), user(g1, "alice", "alicepw"), user(g0, "root", "rootpw")
	if _, err := alice0.Put(ctx, "/app/y", "2"); err != nil {
		t.Fatal(err)
	}
	if r, err := alice1.Get(ctx, "/app/", clientv3.WithPrefix()); err != nil || r.Count != 2 {
		t.Fatalf("alice's prefix through gateway 1: %v %v", r, err)
	}

	// Watches are checked when created.
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	denied := alice1.Watch(wctx, "/other/", clientv3.WithPrefix())
	select {
	case wr := <-denied:
		if !wr.Canceled || !strings.Contains(wr.Err().Error(), "permission denied") {
			t.Fatalf("watch outside alice's range: %+v %v", wr, wr.Err())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch outside alice's range: no answer")
	}
	allowed := alice1.Watch(wctx, "/app/", clientv3.WithPrefix())
	if _, err := alice0.Put(ctx, "/app/w", "3"); err != nil {
		t.Fatal(err)
	}
	select {
	case wr := <-allowed:
		if wr.Err() != nil || len(wr.Events) != 1 || string(wr.Events[0].Kv.Key) != "/app/w" {
			t.Fatalf("alice's watch: %+v %v", wr, wr.Err())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("alice's watch: no event")
	}

	// A revoked permission holds on the other gateway from the next request on.
	for i := range 5 {
		if _, err := root.RoleRevokePermission(ctx, "app", "/app/", "/app0"); err != nil {
			t.Fatal(err)
		}
		if _, err := alice1.Get(ctx, "/app/x"); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Fatalf("round %d: get through gateway 1 right after the revoke through gateway 0: %v", i, err)
		}
		if _, err := root.RoleGrantPermission(ctx, "app", "/app/", "/app0", clientv3.PermissionType(clientv3.PermRead)); err != nil {
			t.Fatal(err)
		}
		if _, err := alice1.Get(ctx, "/app/x"); err != nil {
			t.Fatalf("round %d: get right after read was granted back: %v", i, err)
		}
		if _, err := alice1.Put(ctx, "/app/x", "v"); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Fatalf("round %d: put with read only: %v", i, err)
		}
		if _, err := root.RoleGrantPermission(ctx, "app", "/app/", "/app0", clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
			t.Fatal(err)
		}
		if _, err := alice1.Put(ctx, "/app/x", "v"); err != nil {
			t.Fatalf("round %d: put right after readwrite was granted back: %v", i, err)
		}
	}

	// Watch creations are decided on the gateway's copy, which the revision stream's
	// state brings forward within moments of a change through the other gateway (as
	// an etcd member's auth store follows its leader's). alice's token, issued before
	// the change, is old from then on; a new client of hers gets a new one.
	watchAnswer := func() (canceled bool, reason string) {
		c := user(g1, "alice", "alicepw")
		defer c.Close()
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		defer wcancel()
		wr, ok := <-c.Watch(wctx, "/app/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
		switch {
		case !ok:
			return false, "no answer"
		case wr.Err() != nil:
			return wr.Canceled, wr.Err().Error()
		}
		return wr.Canceled, ""
	}
	if _, err := root.RoleRevokePermission(ctx, "app", "/app/", "/app0"); err != nil {
		t.Fatal(err)
	}
	if _, reason := watchAnswer(); !strings.Contains(reason, "permission denied") && !strings.Contains(reason, "revision of auth store is old") {
		t.Fatalf("a watch through gateway 1 right after the revoke through gateway 0: %q", reason)
	}
	waitFor(t, "a watch through gateway 1 refused after the revoke through gateway 0", 5*time.Second, func() bool {
		canceled, reason := watchAnswer()
		return canceled && strings.Contains(reason, "permission denied")
	})
	if _, err := root.RoleGrantPermission(ctx, "app", "/app/", "/app0", clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
		t.Fatal(err)
	}
	if canceled, reason := watchAnswer(); canceled || reason != "" {
		t.Fatalf("a watch through gateway 1 right after the grant through gateway 0, with a new token: canceled %v, %q", canceled, reason)
	}

	// Tokens live 4 s here: clientv3 replaces an expired one by itself.
	time.Sleep(5 * time.Second)
	if _, err := alice0.Get(ctx, "/app/x"); err != nil {
		t.Fatalf("get after the token expired: %v", err)
	}
	// The token as the authorization header, as etcd accepts it; an expired or
	// made-up one is refused.
	tok, err := alice0.Auth.Authenticate(ctx, "alice", "alicepw")
	if err != nil {
		t.Fatal(err)
	}
	raw := pb.NewKVClient(etcdclient.NewClientFor(t, g1).ActiveConnection())
	if _, err := raw.Range(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok.Token), &pb.RangeRequest{Key: []byte("/app/x")}); err != nil {
		t.Fatalf("range with an authorization header: %v", err)
	}
	for _, bad := range []string{tok.Token + "x", strings.Replace(tok.Token, ".", ".e30", 1)} {
		_, err := raw.Range(metadata.AppendToOutgoingContext(ctx, "token", bad), &pb.RangeRequest{Key: []byte("/app/x")})
		if errDesc(err) != errDesc(rpctypes.ErrGRPCInvalidAuthToken) {
			t.Fatalf("range with a forged token: %v", err)
		}
	}

	// kill -9 every replica and start them again: the auth store is intact.
	for _, r := range m.replicas {
		r.kill()
	}
	for _, r := range m.replicas {
		r.start()
	}
	for _, e := range m.endpoints {
		m.waitHealthy(e)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := alice1.Get(ctx, "/app/x")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("alice after every replica restarted: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := alice1.Put(ctx, "/other", "x"); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("put outside alice's range after the restart: %v", err)
	}
	if r := etcdclient.Etcdctl(t, g0, "", "get", "/app/x"); r.Err == nil || !strings.Contains(r.Stderr, "user name is empty") {
		t.Fatalf("get without a user after the restart: %s", r)
	}
	if out := run(g0, "--user", "root:rootpw", "auth", "disable"); !strings.Contains(out, "Authentication Disabled") {
		t.Fatalf("auth disable: %q", out)
	}
	if out := run(g1, "get", "/app/x", "--print-value-only"); out != "v\n" {
		t.Fatalf("get without a user once auth is disabled, through the other gateway: %q", out)
	}
}
