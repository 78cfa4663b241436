package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	elpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	lockpb "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// TestMeshNamespaces drives namespaces through real processes with clientv3: a
// gateway-wide namespace (KVMESH_GATEWAY_NAMESPACE, as etcd's proxy --namespace) and
// per-user tenant namespaces from the auth store. Two tenants run the same key, txn,
// watch, delete and lease workload on the same keys at once, through two gateways, and
// neither ever sees a key of the other; root sees both under their prefixes.
func TestMeshNamespaces(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("namespaces are kvmesh's own")
	}
	t.Parallel()
	m := startMesh(t, 1, "KVMESH_REPLICA_AUTH_BCRYPT_COST=4")
	g2 := m.gatewayProc("g2", 0)
	g2.env = append(g2.env, "KVMESH_GATEWAY_NAMESPACE=/gw2")
	m.gateways = append(m.gateways, g2)
	m.all = append(m.all, g2)
	g2.start()
	m.waitHealthy(m.endpoints[2])
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// --- The gateway-wide namespace -------------------------------------------------
	plain := etcdclient.NewClientFor(t, m.endpoints[0])
	spaced := etcdclient.NewClientFor(t, m.endpoints[2])
	mustPut(t, plain, "/config/x", "outside")
	wch := spaced.Watch(ctx, "/config/", clientv3.WithPrefix(), clientv3.WithPrevKV())
	if _, err := spaced.Put(ctx, "/config/x", "inside"); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, plain, "/gw2/config/x"); len(got.Kvs) != 1 || string(got.Kvs[0].Value) != "inside" {
		t.Fatalf("the namespaced put is not under the prefix: %v", got.Kvs)
	}
	all := mustGet(t, spaced, "", clientv3.WithPrefix())
	if keys := keysOf(all.Kvs, ""); !equalStrings(keys, []string{"/config/x"}) || string(all.Kvs[0].Value) != "inside" {
		t.Fatalf("everything through the namespaced gateway: %v", fmtKVs(all.Kvs))
	}
	mustPut(t, plain, "/gw2/config/y", "1") // inside, written from outside
	mustPut(t, plain, "/config/y", "2")     // outside: the namespaced watch never sees it
	txn, err := spaced.Txn(ctx).If(clientv3.Compare(clientv3.Value("/config/x"), "=", "inside")).
		Then(clientv3.OpPut("/config/z", "t", clientv3.WithPrevKV()), clientv3.OpGet("/config/", clientv3.WithPrefix())).Commit()
	if err != nil || !txn.Succeeded {
		t.Fatalf("txn: %v %v", txn, err)
	}
	if keys := keysOf(txn.Responses[1].GetResponseRange().Kvs, ""); !equalStrings(keys, []string{"/config/x", "/config/y", "/config/z"}) {
		t.Fatalf("txn range: %v", keys)
	}
	del, err := spaced.Delete(ctx, "", clientv3.WithPrefix(), clientv3.WithPrevKV())
	if err != nil || del.Deleted != 3 || keysOf(del.PrevKvs, "")[0] != "/config/x" {
		t.Fatalf("delete everything in the namespace: %v %v", del, err)
	}
	if got := mustGet(t, plain, "/config/", clientv3.WithPrefix()); !equalStrings(keysOf(got.Kvs, ""), []string{"/config/x", "/config/y"}) {
		t.Fatalf("keys outside the namespace after its delete-all: %v", fmtKVs(got.Kvs))
	}
	var seen []string
	for len(seen) < 6 {
		select {
		case wr := <-wch:
			for _, ev := range wr.Events {
				s := fmt.Sprintf("%s %s", ev.Type, ev.Kv.Key)
				if ev.PrevKv != nil {
					s += " prev " + string(ev.PrevKv.Key)
				}
				seen = append(seen, s)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("namespaced watch saw only %q", seen)
		}
	}
	want := []string{"PUT /config/x", "PUT /config/y", "PUT /config/z", "DELETE /config/x prev /config/x", "DELETE /config/y prev /config/y", "DELETE /config/z prev /config/z"}
	if strings.Join(seen, "|") != strings.Join(want, "|") {
		t.Fatalf("namespaced watch:\n got %q\nwant %q", seen, want)
	}

	// --- Tenants: per-user namespaces from the auth store ----------------------------
	root0 := etcdclient.NewClientFor(t, m.endpoints[0])
	for _, step := range []func() error{
		func() error { _, err := root0.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := root0.UserGrantRole(ctx, "root", "root"); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	tenants := []string{"acme", "globex"}
	for _, tn := range tenants {
		prefix := "/tenants/" + tn // its keys start with "/": /tenants/acme/config/…
		if _, err := root0.UserAdd(ctx, tn, tn+"pw"); err != nil {
			t.Fatal(err)
		}
		if _, err := root0.RoleAdd(ctx, tn); err != nil {
			t.Fatal(err)
		}
		if _, err := root0.RoleGrantPermission(ctx, tn, prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
			t.Fatal(err)
		}
		if _, err := root0.UserGrantRole(ctx, tn, tn); err != nil {
			t.Fatal(err)
		}
		if out, err := connectJSON(m.endpoints[0], "", "kvmesh.tenant.v1.TenantService/SetUserNamespace", map[string]string{"name": tn, "namespace": b64(prefix)}); err != nil {
			t.Fatalf("%v %s", err, out)
		}
	}
	if _, err := root0.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}
	login := func(endpoint, user string) *clientv3.Client {
		cfg := etcdclient.ClientConfig(endpoint)
		cfg.Username, cfg.Password = user, user+"pw"
		c, err := clientv3.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	root := login(m.endpoints[1], "root")

	// Each tenant: a watch on everything it can see, then the same workload through
	// both gateways at once.
	type result struct {
		keys    []string // every key the tenant's get-all saw
		watched []string // every key its watch saw
		leased  []string // its lease's keys
	}
	results := make([]result, len(tenants))
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(tenants))
	for i, tn := range tenants {
		a, b := login(m.endpoints[0], tn), login(m.endpoints[1], tn)
		wctx, wcancel := context.WithCancel(ctx)
		defer wcancel()
		wch := b.Watch(wctx, "", clientv3.WithPrefix(), clientv3.WithPrevKV())
		wg.Add(1)
		go func() {
			defer wg.Done()
			fail := func(err error) { errs <- fmt.Errorf("%s: %w", tn, err) }
			for j := range 20 {
				cli := []*clientv3.Client{a, b}[j%2]
				if _, err := cli.Put(ctx, fmt.Sprintf("/config/k%02d", j), tn); err != nil {
					fail(err)
					return
				}
			}
			// The same txn in both tenants: each compares its own /config/k00.
			txn, err := a.Txn(ctx).If(clientv3.Compare(clientv3.Value("/config/k00"), "=", tn)).
				Then(clientv3.OpPut("/config/txn", tn, clientv3.WithPrevKV()), clientv3.OpDelete("/config/k19", clientv3.WithPrevKV())).Commit()
			if err != nil || !txn.Succeeded {
				fail(fmt.Errorf("txn: %v %v", txn, err))
				return
			}
			if pk := txn.Responses[1].GetResponseDeleteRange().PrevKvs; len(pk) != 1 || string(pk[0].Key) != "/config/k19" || string(pk[0].Value) != tn {
				fail(fmt.Errorf("txn delete prev_kv: %v", pk))
				return
			}
			lease, err := b.Grant(ctx, 60)
			if err != nil {
				fail(err)
				return
			}
			if _, err := b.Put(ctx, "/config/leased", tn, clientv3.WithLease(lease.ID)); err != nil {
				fail(err)
				return
			}
			ttl, err := a.TimeToLive(ctx, lease.ID, clientv3.WithAttachedKeys())
			if err != nil {
				fail(err)
				return
			}
			for _, k := range ttl.Keys {
				results[i].leased = append(results[i].leased, string(k))
			}
			got, err := b.Get(ctx, "", clientv3.WithPrefix())
			if err != nil {
				fail(err)
				return
			}
			for _, kv := range got.Kvs {
				if string(kv.Value) != tn {
					fail(fmt.Errorf("%s holds %q, written by another tenant", kv.Key, kv.Value))
				}
				results[i].keys = append(results[i].keys, string(kv.Key))
			}
			// Its watch saw 20 puts, the txn's put and delete, the leased put; nothing else.
			for len(results[i].watched) < 23 {
				select {
				case wr := <-wch:
					for _, ev := range wr.Events {
						if string(ev.Kv.Key) == "/config/k19" && ev.Type == clientv3.EventTypeDelete && (ev.PrevKv == nil || string(ev.PrevKv.Value) != tn) {
							fail(fmt.Errorf("watched delete of k19 with prev_kv %v", ev.PrevKv))
						}
						results[i].watched = append(results[i].watched, string(ev.Kv.Key))
					}
				case <-time.After(20 * time.Second):
					fail(fmt.Errorf("watch saw only %d events: %q", len(results[i].watched), results[i].watched))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	var wantKeys, wantWatched []string
	for j := range 19 {
		wantKeys = append(wantKeys, fmt.Sprintf("/config/k%02d", j))
	}
	wantKeys = append(wantKeys, "/config/leased", "/config/txn")
	sort.Strings(wantKeys)
	for j := range 20 {
		wantWatched = append(wantWatched, fmt.Sprintf("/config/k%02d", j))
	}
	wantWatched = append(wantWatched, "/config/txn", "/config/k19", "/config/leased")
	for i, tn := range tenants {
		if !equalStrings(results[i].keys, wantKeys) {
			t.Errorf("%s's keys: %q, want %q", tn, results[i].keys, wantKeys)
		}
		if !equalStrings(results[i].watched, wantWatched) {
			t.Errorf("%s's watch: %q, want %q", tn, results[i].watched, wantWatched)
		}
		if !equalStrings(results[i].leased, []string{"/config/leased"}) {
			t.Errorf("%s's lease keys: %q", tn, results[i].leased)
		}
	}
	// Locks and elections live in the namespace too: both tenants take the lock
	// /locks/db at once through different gateways and each holds it at once (they
	// are two locks), each tenant's election has its own leader, and root finds the
	// keys under the tenants' prefixes.
	for i, tn := range tenants {
		c := login(m.endpoints[i], tn)
		api := recipeAPI{lockpb.NewLockClient(c.ActiveConnection()), elpb.NewElectionClient(c.ActiveConnection()), nil, nil}
		lease, err := c.Grant(ctx, 60)
		if err != nil {
			t.Fatal(err)
		}
		lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
		l, err := api.lock.Lock(lctx, &lockpb.LockRequest{Name: []byte("/locks/db"), Lease: int64(lease.ID)})
		lcancel()
		want := fmt.Sprintf("/locks/db/%x", int64(lease.ID))
		if err != nil || string(l.Key) != want {
			t.Fatalf("%s: Lock: %v %v, want key %s", tn, l, err, want)
		}
		camp, err := api.election.Campaign(ctx, &elpb.CampaignRequest{Name: []byte("/elect/app"), Lease: int64(lease.ID), Value: []byte(tn)})
		if err != nil {
			t.Fatalf("%s: Campaign: %v", tn, err)
		}
		ld, err := api.election.Leader(ctx, &elpb.LeaderRequest{Name: []byte("/elect/app")})
		if err != nil || string(ld.Kv.Value) != tn || string(ld.Kv.Key) != fmt.Sprintf("/elect/app/%x", int64(lease.ID)) {
			t.Fatalf("%s: Leader: %v %v", tn, ld, err)
		}
		if first, err := observeFirst(ctx, api, "/elect/app"); err != nil || string(first.(*elpb.LeaderResponse).Kv.Value) != tn {
			t.Fatalf("%s: Observe: %v %v", tn, first, err)
		}
		for _, k := range []string{want, fmt.Sprintf("/elect/app/%x", int64(lease.ID))} {
			if got := mustGet(t, root, "/tenants/"+tn+k); got.Count != 1 {
				t.Fatalf("root does not find %s's %s under its prefix", tn, k)
			}
		}
		if _, err := api.lock.Unlock(ctx, &lockpb.UnlockRequest{Key: l.Key}); err != nil {
			t.Fatal(err)
		}
		if _, err := api.election.Resign(ctx, &elpb.ResignRequest{Leader: camp.Leader}); err != nil {
			t.Fatal(err)
		}
		if got := mustGet(t, root, "/tenants/"+tn+"/", clientv3.WithPrefix(), clientv3.WithCountOnly()); got.Count != int64(len(wantKeys)) {
			t.Fatalf("%s's Unlock and Resign left keys: %d keys, want %d", tn, got.Count, len(wantKeys))
		}
	}
	// Root has no namespace: it sees both tenants' keys where they are stored.
	for _, tn := range tenants {
		got, err := root.Get(ctx, "/tenants/"+tn+"/config/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil || got.Count != int64(len(wantKeys)) {
			t.Errorf("root counts %s's keys: %v %v", tn, got, err)
		}
	}
	// A tenant cannot escape: its widest range is its namespace; its roles do not
	// reach outside it; it cannot set or read another's namespace.
	acme := login(m.endpoints[0], "acme")
	if got, err := acme.Get(ctx, "\x00", clientv3.WithFromKey()); err != nil || int(got.Count) != len(wantKeys) {
		t.Errorf("acme's from-key-zero range: %v %v", got, err)
	}
	// (Over Connect JSON: this package cannot link kvmesh's generated etcd types
	// beside clientv3's.)
	acmeTok := token(t, m.endpoints[1], "acme", "acmepw")
	if out, err := connectJSON(m.endpoints[1], acmeTok, "kvmesh.tenant.v1.TenantService/GetUserNamespace", map[string]string{"name": "acme"}); err != nil || !strings.Contains(out, b64("/tenants/acme")) {
		t.Errorf("acme reads its namespace: %v %s", err, out)
	}
	if out, err := connectJSON(m.endpoints[1], acmeTok, "kvmesh.tenant.v1.TenantService/GetUserNamespace", map[string]string{"name": "globex"}); err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("acme reads globex's namespace: %v %s", err, out)
	}
	if out, err := connectJSON(m.endpoints[1], acmeTok, "kvmesh.tenant.v1.TenantService/SetUserNamespace", map[string]string{"name": "acme", "namespace": b64("/")}); err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("acme sets its own namespace: %v %s", err, out)
	}
	// A namespace change holds from the next request on, on every gateway.
	rootTok := token(t, m.endpoints[1], "root", "rootpw")
	if out, err := connectJSON(m.endpoints[1], rootTok, "kvmesh.tenant.v1.TenantService/SetUserNamespace", map[string]string{"name": "acme", "namespace": b64("/tenants/globex")}); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if _, err := acme.Get(ctx, "/config/k00"); rpctypes.Error(err) != rpctypes.ErrPermissionDenied {
		t.Errorf("acme moved into globex's namespace without its permissions: %v, want permission denied", err)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// connectJSON calls a procedure of the gateway at endpoint over Connect with JSON, with
// token (if any) in the authorization header; an error for any status but 200.
func connectJSON(endpoint, token, procedure string, msg any) (string, error) {
	body, err := json.Marshal(msg)
	if err != nil {
		return "", err
	}
	req, err := http.NewRequest(http.MethodPost, "http://"+endpoint+"/"+procedure, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(out), fmt.Errorf("%s: %s", procedure, resp.Status)
	}
	return string(out), nil
}

// token authenticates over Connect JSON.
func token(t *testing.T, endpoint, user, pw string) string {
	t.Helper()
	out, err := connectJSON(endpoint, "", "etcdserverpb.Auth/Authenticate", map[string]string{"name": user, "password": pw})
	if err != nil {
		t.Fatalf("authenticate %s: %v %s", user, err, out)
	}
	var r struct{ Token string }
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.Token == "" {
		t.Fatalf("authenticate %s: %s", user, out)
	}
	return r.Token
}
