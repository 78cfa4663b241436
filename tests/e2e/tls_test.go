package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// makeCerts runs kvmesh-devca: a CA in dir and a certificate per name.
func makeCerts(t *testing.T, dir string, names ...string) {
	t.Helper()
	bin, err := harness.BuildPackage("github.com/kvmesh/kvmesh/libs/cmd/kvmesh-devca")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, append([]string{"-dir", dir}, names...)...).CombinedOutput(); err != nil {
		t.Fatalf("kvmesh-devca: %v\n%s", err, out)
	}
}

// TestMeshTLS runs the mesh (3 replicas, 2 gateways, the fanout, NATS) with mutual TLS
// on every internal link and client TLS with client-certificate auth on the gateways,
// and drives it with clientv3 and etcdctl: writes, reads and watches work end to end;
// clients without a certificate from the trusted CA, or that do not trust the
// gateway's, are refused; the internal ports (replicas', fanout's, NATS) refuse
// callers without a certificate from the cluster CA and plaintext callers; with auth
// enabled, the certificate's common name is the user, a token takes precedence, and
// users without a password log in by certificate only.
func TestMeshTLS(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	certs := t.TempDir()
	makeCerts(t, certs, "r0", "r1", "r2", "g0", "g1", "f0", "nats", "root", "alice")
	foreign := filepath.Join(certs, "foreign")
	makeCerts(t, foreign, "stranger", "r0")
	m := startMeshIn(t, certs, 3, "KVMESH_REPLICA_AUTH_BCRYPT_COST=4")
	g0, g1 := m.endpoints[0], m.endpoints[1]

	newClient := func(cfg *tls.Config, endpoints ...string) (*clientv3.Client, error) {
		c := etcdclient.ClientConfig(endpoints...)
		c.TLS = cfg
		c.DialTimeout = 2 * time.Second
		return clientv3.New(c)
	}
	root, err := newClient(m.tlsConfig("root"), g0, g1)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Writes through one gateway, reads and watches through the other: the gateways
	// reach the replicas, the fanout tails them and publishes to NATS, all over TLS.
	rootOn := func(ep string) *clientv3.Client {
		c, err := newClient(m.tlsConfig("root"), ep)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	r0, r1 := rootOn(g0), rootOn(g1)
	wch := r1.Watch(ctx, "/tls/", clientv3.WithPrefix())
	put, err := r0.Put(ctx, "/tls/a", "1")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := r1.Get(ctx, "/tls/a"); err != nil || len(got.Kvs) != 1 || string(got.Kvs[0].Value) != "1" {
		t.Fatalf("get through the other gateway: %v %v", got, err)
	}
	select {
	case wr := <-wch:
		if len(wr.Events) != 1 || string(wr.Events[0].Kv.Key) != "/tls/a" || wr.Events[0].Kv.ModRevision != put.Header.Revision {
			t.Fatalf("watch: %+v %v", wr.Events, wr.Err())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no watch event through the TLS mesh within 20s")
	}

	// The client port refuses: no certificate, a certificate from another CA, a
	// client that does not trust the gateway's certificate, and plaintext.
	foreignCfg := func(user string) *tls.Config {
		pool := x509.NewCertPool()
		b, _ := os.ReadFile(filepath.Join(certs, "ca.pem"))
		pool.AppendCertsFromPEM(b)
		c, err := tls.LoadX509KeyPair(filepath.Join(foreign, user+".pem"), filepath.Join(foreign, user+"-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{c}}
	}
	noTrust := m.tlsConfig("root")
	noTrust.RootCAs = x509.NewCertPool()
	for _, c := range []struct {
		name string
		cfg  *tls.Config
	}{
		{"no client certificate", m.tlsConfig("")},
		{"a client certificate from another CA", foreignCfg("stranger")},
		{"a client that does not trust the gateway", noTrust},
		{"plaintext", nil},
	} {
		cli, err := newClient(c.cfg, g0)
		if err == nil {
			cctx, ccancel := context.WithTimeout(ctx, 3*time.Second)
			_, err = cli.Get(cctx, "/tls/a")
			ccancel()
			cli.Close()
		}
		if err == nil {
			t.Errorf("%s: the gateway answered", c.name)
		}
	}
	if r := etcdclient.Etcdctl(t, "https://"+g0, "", "--cacert", filepath.Join(certs, "ca.pem"), "get", "/tls/a"); r.Err == nil {
		t.Errorf("etcdctl without a client certificate: %s", r)
	}

	// The internal ports: a replica's (internal API and peer API), the fanout's, NATS.
	// A caller with a certificate from the cluster CA gets in (the control); without a
	// certificate, with one from another CA, or in plaintext it does not.
	internalGet := func(cfg *tls.Config, url string) error {
		c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	}
	var fanoutAddr string
	for _, kv := range m.fanouts[0].env {
		if a, ok := strings.CutPrefix(kv, "KVMESH_FANOUT_LISTEN="); ok {
			fanoutAddr = a
		}
	}
	for _, base := range []string{m.urls[0], m.urls[2], "https://" + fanoutAddr} {
		if err := internalGet(m.tlsConfig("g0"), base+"/readyz"); err != nil {
			t.Errorf("%s with a cluster certificate: %v", base, err)
		}
		for _, c := range []struct {
			name string
			cfg  *tls.Config
		}{
			{"no certificate", m.tlsConfig("")},
			{"another CA's certificate", foreignCfg("stranger")},
			{"another CA's certificate named like a member", foreignCfg("r0")},
		} {
			if err := internalGet(c.cfg, base+"/readyz"); err == nil {
				t.Errorf("%s with %s: answered", base, c.name)
			}
		}
		if err := internalGet(nil, strings.Replace(base, "https://", "http://", 1)+"/readyz"); err == nil {
			t.Errorf("%s in plaintext: answered", base)
		}
	}
	if b, _ := os.ReadFile(m.replicas[0].log); !strings.Contains(string(b), "TLS handshake failed") {
		t.Errorf("replica r0 did not log the refused connections")
	}
	natsConnect := func(opts ...nats.Option) error {
		nc, err := nats.Connect(m.natsURL, append(opts, nats.Timeout(3*time.Second))...)
		if err == nil {
			// A handshake refused by the server can surface at the first round trip.
			err = nc.FlushTimeout(3 * time.Second)
			nc.Close()
		}
		return err
	}
	if err := natsConnect(nats.Secure(m.tlsConfig("f0"))); err != nil {
		t.Errorf("NATS with a cluster certificate: %v", err)
	}
	if err := natsConnect(nats.Secure(foreignCfg("stranger"))); err == nil {
		t.Errorf("NATS with another CA's certificate: connected")
	}
	if err := natsConnect(nats.Secure(m.tlsConfig(""))); err == nil {
		t.Errorf("NATS without a certificate: connected")
	}
	if err := natsConnect(); err == nil {
		t.Errorf("NATS in plaintext: connected")
	}

	// Client-certificate auth, set up with etcdctl as an operator would: root and
	// alice have no password, so only their certificates log them in.
	ctl := func(user string, args ...string) etcdclient.EtcdctlResult {
		t.Helper()
		full := []string{"--cacert", filepath.Join(certs, "ca.pem")}
		if user != "" {
			full = append(full, "--cert", filepath.Join(certs, user+".pem"), "--key", filepath.Join(certs, user+"-key.pem"))
		}
		return etcdclient.Etcdctl(t, "https://"+g1, "", append(full, args...)...)
	}
	for _, args := range [][]string{
		{"user", "add", "root", "--no-password"},
		{"user", "grant-role", "root", "root"},
		{"user", "add", "alice", "--no-password"},
		{"role", "add", "app"},
		{"role", "grant-permission", "app", "readwrite", "/app/", "--prefix=true"},
		{"user", "grant-role", "alice", "app"},
		{"user", "add", "bob:bobpw"},
		{"auth", "enable"},
	} {
		if r := ctl("root", args...); r.Err != nil {
			t.Fatalf("%s", r)
		}
	}
	alice, err := newClient(m.tlsConfig("alice"), g0)
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	if _, err := alice.Put(ctx, "/app/x", "1"); err != nil {
		t.Fatalf("alice (by certificate) puts in her range: %v", err)
	}
	if _, err := alice.Put(ctx, "/other", "1"); err != rpctypes.ErrPermissionDenied {
		t.Fatalf("alice (by certificate) puts outside her range: %v, want permission denied", err)
	}
	if _, err := alice.Get(ctx, "/tls/a"); err != rpctypes.ErrPermissionDenied {
		t.Fatalf("alice (by certificate) reads outside her range: %v, want permission denied", err)
	}
	if r := ctl("root", "get", "/app/x", "--print-value-only"); r.Err != nil || r.Stdout != "1\n" {
		t.Fatalf("root (by certificate) reads: %s", r)
	}
	if r := ctl("root", "user", "list"); r.Err != nil || r.Stdout != "alice\nbob\nroot\n" {
		t.Fatalf("root (by certificate) administers: %s", r)
	}
	// A user without a password cannot log in by password.
	if r := ctl("alice", "--user", "alice:anything", "get", "/app/x"); r.Err == nil || !strings.Contains(r.Stderr, "authentication failed") {
		t.Fatalf("alice by password: %s", r)
	}
	// A token takes precedence over the certificate (as etcd): bob has no role.
	bobCfg := etcdclient.ClientConfig(g0)
	bobCfg.TLS, bobCfg.Username, bobCfg.Password = m.tlsConfig("alice"), "bob", "bobpw"
	bob, err := clientv3.New(bobCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer bob.Close()
	if _, err := bob.Get(ctx, "/app/x"); err != rpctypes.ErrPermissionDenied {
		t.Fatalf("bob's token over alice's certificate: %v, want permission denied", err)
	}
	// Over Connect (net/http's side of the port) the certificate logs in as well.
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+g0+"/etcdserverpb.KV/Range", strings.NewReader(`{"key":"L2FwcC94"}`))
	req.Header.Set("Content-Type", "application/json")
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: m.tlsConfig("alice")}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body := new(strings.Builder)
	_, _ = io.Copy(body, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(body.String(), `"value":"MQ=="`) {
		t.Fatalf("Connect JSON range as alice by certificate: %s %s", resp.Status, body)
	}
}
