package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// proc is one kvmesh role process of the mesh tests.
type proc struct {
	t    *testing.T
	name string
	bin  string
	args []string
	env  []string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *proc) start() {
	p.t.Helper()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	p.cmd = exec.Command(p.bin, p.args...)
	p.cmd.Env = append(os.Environ(), p.env...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	p.done = make(chan struct{})
	go func() { p.cmd.Wait(); f.Close(); close(p.done) }()
}

func (p *proc) kill() {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}

func waitHealthy(t *testing.T, url string, procs []*proc) {
	t.Helper()
	waitHealthyWith(t, http.DefaultClient, url, procs)
}

func waitHealthyWith(t *testing.T, client *http.Client, url string, procs []*proc) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := client.Get(url + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range procs {
		t.Logf("---- %s log ----\n%s", p.name, p.tail())
	}
	t.Fatalf("%s did not become healthy within 30s", url)
}

// TestMeshSurvivesLeaderKill runs the mesh as separate processes (three replicas, two
// gateways), drives it with clientv3 through both gateways, kills the Raft leader with
// SIGKILL under concurrent writes, and checks that writes continue and that every
// acknowledged write is readable afterwards.
func TestMeshSurvivesLeaderKill(t *testing.T) {
	if kind, _ := harness.Target(); kind != harness.KindKvmesh {
		t.Skip("the mesh is kvmesh's own")
	}
	t.Parallel()
	m := startMesh(t, 3)
	replicas, urls, endpoints, all := m.replicas, m.urls, m.endpoints, m.all

	cli, err := clientv3.New(etcdclient.ClientConfig(endpoints...))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()

	leader := leaderProc(t, m, cli)

	var (
		mu      sync.Mutex
		acked   = map[string]string{}
		stop    atomic.Bool
		wg      sync.WaitGroup
		written atomic.Int64
	)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				k, v := fmt.Sprintf("mesh/w%d/%06d", w, i), fmt.Sprint(i)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, err := cli.Put(ctx, k, v)
				cancel()
				if err == nil {
					mu.Lock()
					acked[k] = v
					mu.Unlock()
					written.Add(1)
				}
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	before := written.Load()
	leader.kill()
	killedAt := time.Now()
	// Writes must resume within a few election timeouts.
	for written.Load() < before+200 {
		if time.Since(killedAt) > 20*time.Second {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("writes did not resume within 20s of killing the leader (%d acknowledged before, %d after)", before, written.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("writes resumed %v after SIGKILL of the leader %s", time.Since(killedAt).Round(time.Millisecond), leader.name)
	time.Sleep(500 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	resp, err := cli.Get(ctxT(t), "mesh/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	present := map[string]string{}
	for _, kv := range resp.Kvs {
		present[string(kv.Key)] = string(kv.Value)
	}
	lost := 0
	for k, v := range acked {
		if present[k] != v {
			lost++
			if lost <= 5 {
				t.Errorf("acknowledged put %s=%s reads back as %q", k, v, present[k])
			}
		}
	}
	if lost > 0 {
		t.Fatalf("%d of %d acknowledged writes lost after the leader's SIGKILL", lost, len(acked))
	}
	t.Logf("%d acknowledged writes, all present", len(acked))

	// Each gateway's metrics tell what it went through: a leader again, a leader change.
	for _, e := range endpoints {
		if v := metricOf("http://"+e, "etcd_server_has_leader"); v != 1 {
			t.Errorf("gateway %s: etcd_server_has_leader = %v, want 1", e, v)
		}
		if v := metricOf("http://"+e, "kvmesh_gateway_leader_changes_seen_total"); v < 1 {
			t.Errorf("gateway %s: kvmesh_gateway_leader_changes_seen_total = %v, want ≥ 1 after the leader's kill", e, v)
		}
	}

	// The killed replica restarts and catches up from the others: its own current
	// revision (from its metrics) reaches the cluster's.
	want := resp.Header.Revision
	leader.start()
	replicaURL := urls[indexOf(replicas, leader)]
	deadline := time.Now().Add(20 * time.Second)
	for {
		rev := currentRevisionOf(replicaURL)
		if rev >= want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarted replica %s is at revision %d, the cluster at %d", leader.name, rev, want)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Stop every replica (SIGTERM) and start them again: the state is intact.
	for _, r := range replicas {
		r.cmd.Process.Signal(syscall.SIGTERM)
		<-r.done
		r.cmd = nil
	}
	for _, r := range replicas {
		r.start()
	}
	for _, e := range endpoints {
		waitHealthy(t, "http://"+e, all)
	}
	after, err := cli.Get(ctxT(t), "mesh/", clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("read after restarting every replica: %v", err)
	}
	if after.Header.Revision != want || len(after.Kvs) != len(resp.Kvs) {
		t.Fatalf("after restarting every replica: revision %d with %d keys, want %d with %d", after.Header.Revision, len(after.Kvs), want, len(resp.Kvs))
	}
}

// mesh is a cluster of real processes: replicas and two gateways.
type mesh struct {
	t          *testing.T
	dir        string
	replicaBin string
	replicas   []*proc
	urls       []string // replicas' internal API (and peer) URLs
	initial    []string // name=peerURL
	gateways   []*proc
	endpoints  []string // gateways' client addresses
	all        []*proc
	gatewayBin string
	fanoutBin  string
	nats       *proc
	natsURL    string
	fanouts    []*proc
	// certs, when set, is a directory of kvmesh-devca certificates: every link is
	// mutual TLS (each process's certificate is named after it), and the gateways serve
	// TLS with client-certificate auth.
	certs string
}

// startMesh starts n replicas (with env added to theirs), a NATS server with
// JetStream, the fanout and two gateways, each gateway configured with the replicas in
// a different order, and waits until both gateways are healthy.
func startMesh(t *testing.T, n int, env ...string) *mesh {
	t.Helper()
	return startMeshIn(t, "", n, env...)
}

// scheme is the URL scheme of the mesh's links.
func (m *mesh) scheme() string {
	if m.certs != "" {
		return "https://"
	}
	return "http://"
}

// mtlsEnv is the mutual-TLS identity of the process name, for the variables with prefix.
func (m *mesh) mtlsEnv(prefix, name string) []string {
	if m.certs == "" {
		return nil
	}
	return []string{
		prefix + "MTLS_CERT_FILE=" + filepath.Join(m.certs, name+".pem"),
		prefix + "MTLS_KEY_FILE=" + filepath.Join(m.certs, name+"-key.pem"),
		prefix + "MTLS_CA_FILE=" + filepath.Join(m.certs, "ca.pem"),
	}
}

// httpClient reaches the gateways' plain HTTP endpoints (health).
func (m *mesh) httpClient() *http.Client {
	if m.certs == "" {
		return http.DefaultClient
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: m.tlsConfig("root")}, Timeout: 5 * time.Second}
}

// tlsConfig is a client's TLS with the certificate of user (none for "") and the CA.
func (m *mesh) tlsConfig(user string) *tls.Config {
	m.t.Helper()
	pool := x509.NewCertPool()
	b, err := os.ReadFile(filepath.Join(m.certs, "ca.pem"))
	if err != nil || !pool.AppendCertsFromPEM(b) {
		m.t.Fatalf("CA: %v", err)
	}
	cfg := &tls.Config{RootCAs: pool}
	if user != "" {
		c, err := tls.LoadX509KeyPair(filepath.Join(m.certs, user+".pem"), filepath.Join(m.certs, user+"-key.pem"))
		if err != nil {
			m.t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg
}

// startMeshIn is startMesh, with every link over TLS when certs is set (see mesh.certs).
func startMeshIn(t *testing.T, certs string, n int, env ...string) *mesh {
	t.Helper()
	return startMeshWith(t, meshOptions{certs: certs}, n, env...)
}

// meshOptions are how a mesh starts beyond its size and the replicas' environment.
type meshOptions struct {
	certs string // see mesh.certs
	// restore, set, is a snapshot file every replica's data directory is restored
	// from (kvmesh-replica snapshot restore) before it first starts.
	restore string
}

// startMeshWith is startMesh with options.
func startMeshWith(t *testing.T, o meshOptions, n int, env ...string) *mesh {
	t.Helper()
	certs := o.certs
	bins := map[string]string{}
	for _, pkg := range []string{
		"github.com/kvmesh/kvmesh/services/replica/cmd/kvmesh-replica",
		"github.com/kvmesh/kvmesh/services/gateway/cmd/kvmesh-gateway",
		"github.com/kvmesh/kvmesh/services/fanout/cmd/kvmesh-fanout",
		"github.com/nats-io/nats-server/v2",
	} {
		bin, err := harness.BuildPackage(pkg)
		if err != nil {
			t.Fatal(err)
		}
		bins[filepath.Base(pkg)] = bin
	}
	m := &mesh{t: t, dir: t.TempDir(), replicaBin: bins["kvmesh-replica"], gatewayBin: bins["kvmesh-gateway"], fanoutBin: bins["kvmesh-fanout"], certs: certs}
	for i := range n {
		addr, err := harness.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("r%d", i)
		m.urls = append(m.urls, m.scheme()+addr)
		m.initial = append(m.initial, name+"="+m.scheme()+addr)
		m.replicas = append(m.replicas, m.replicaProc(name, addr, env...))
	}
	for _, r := range m.replicas {
		if o.restore != "" {
			out, err := exec.Command(m.replicaBin, "snapshot", "restore", o.restore, "--data-dir", filepath.Join(m.dir, r.name)).CombinedOutput()
			if err != nil {
				t.Fatalf("restore %s's data directory: %v\n%s", r.name, err, out)
			}
		}
		r.env = append(r.env, "KVMESH_REPLICA_INITIAL_CLUSTER="+strings.Join(m.initial, ","))
		r.start()
	}

	// NATS, as a process of its own with its store on disk (a restart keeps it).
	natsAddr, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(natsAddr, ":")
	conf := filepath.Join(m.dir, "nats.conf")
	natsConf := fmt.Sprintf("host: %s\nport: %s\nmax_payload: 8MB\njetstream { store_dir: %q }\n", host, port, filepath.Join(m.dir, "nats"))
	m.natsURL = "nats://" + natsAddr
	if certs != "" {
		// Clients must present a certificate from the cluster CA (verify).
		natsConf += fmt.Sprintf("tls { cert_file: %q\nkey_file: %q\nca_file: %q\nverify: true }\n",
			filepath.Join(certs, "nats.pem"), filepath.Join(certs, "nats-key.pem"), filepath.Join(certs, "ca.pem"))
		m.natsURL = "tls://" + natsAddr
	}
	if err := os.WriteFile(conf, []byte(natsConf), 0o644); err != nil {
		t.Fatal(err)
	}
	m.nats = &proc{t: t, name: "nats", bin: bins["v2"], args: []string{"-c", conf}, log: filepath.Join(m.dir, "nats.log")}
	m.nats.start()
	m.fanouts = append(m.fanouts, m.fanoutProc("f0"))

	for i := range 2 {
		m.gateways = append(m.gateways, m.gatewayProc(fmt.Sprintf("g%d", i), i))
	}
	m.all = append(append(append([]*proc{}, m.replicas...), m.gateways...), m.nats)
	m.all = append(m.all, m.fanouts...)
	t.Cleanup(func() {
		for _, p := range m.all {
			p.kill()
		}
		if t.Failed() {
			for _, p := range m.all {
				t.Logf("---- %s log ----\n%s", p.name, p.tail())
			}
		}
	})
	for _, p := range append(m.gateways, m.fanouts...) {
		p.start()
	}
	for _, e := range m.endpoints {
		m.waitHealthy(e)
	}
	return m
}

// waitHealthy waits for the gateway at endpoint.
func (m *mesh) waitHealthy(endpoint string) {
	m.t.Helper()
	waitHealthyWith(m.t, m.httpClient(), m.scheme()+endpoint, m.all)
}

// leaderProc finds the process of the Raft leader: Status names the leader's member
// ID, MemberList maps it to a peer URL.
func leaderProc(t *testing.T, m *mesh, cli *clientv3.Client) *proc {
	t.Helper()
	st, err := cli.Status(ctxT(t), m.endpoints[0])
	if err != nil {
		t.Fatal(err)
	}
	ml, err := cli.MemberList(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(ml.Members) != len(m.replicas) {
		t.Fatalf("MemberList: %d members, want %d", len(ml.Members), len(m.replicas))
	}
	for _, mem := range ml.Members {
		if mem.ID == st.Leader {
			for i, u := range m.urls {
				if len(mem.PeerURLs) > 0 && mem.PeerURLs[0] == u {
					return m.replicas[i]
				}
			}
		}
	}
	t.Fatalf("leader %x is none of the replicas %v", st.Leader, m.urls)
	return nil
}

// gatewayProc describes (without starting) a gateway that lists the replicas from the
// i-th on.
func (m *mesh) gatewayProc(name string, i int) *proc {
	m.t.Helper()
	addr, err := harness.FreePort()
	if err != nil {
		m.t.Fatal(err)
	}
	n := len(m.urls)
	order := append(append([]string{}, m.urls[i%n:]...), m.urls[:i%n]...)
	m.endpoints = append(m.endpoints, addr)
	return &proc{t: m.t, name: name, bin: m.gatewayBin, log: filepath.Join(m.dir, name+".log"),
		env: append([]string{"KVMESH_GATEWAY_LISTEN=" + addr, "KVMESH_GATEWAY_REPLICAS=" + strings.Join(order, ","), "KVMESH_LOG_FORMAT=text",
			"KVMESH_NATS_URL=" + m.natsURL}, m.gatewayTLSEnv(name)...)}
}

// gatewayTLSEnv is a TLS mesh's gateway configuration: mutual TLS to the replicas and
// NATS, and client TLS with client-certificate auth (its own certificate serves).
func (m *mesh) gatewayTLSEnv(name string) []string {
	if m.certs == "" {
		return nil
	}
	return append(m.mtlsEnv("KVMESH_GATEWAY_", name),
		"KVMESH_GATEWAY_TLS_CERT_FILE="+filepath.Join(m.certs, name+".pem"),
		"KVMESH_GATEWAY_TLS_KEY_FILE="+filepath.Join(m.certs, name+"-key.pem"),
		"KVMESH_GATEWAY_TLS_TRUSTED_CA_FILE="+filepath.Join(m.certs, "ca.pem"),
		"KVMESH_GATEWAY_CLIENT_CERT_AUTH=true")
}

// fanoutProc describes (without starting) a fanout tailing every replica.
func (m *mesh) fanoutProc(name string) *proc {
	m.t.Helper()
	addr, err := harness.FreePort()
	if err != nil {
		m.t.Fatal(err)
	}
	return &proc{t: m.t, name: name, bin: m.fanoutBin, log: filepath.Join(m.dir, name+".log"),
		env: append([]string{"KVMESH_FANOUT_LISTEN=" + addr, "KVMESH_FANOUT_REPLICAS=" + strings.Join(m.urls, ","), "KVMESH_LOG_FORMAT=text",
			"KVMESH_NATS_URL=" + m.natsURL}, m.mtlsEnv("KVMESH_FANOUT_", name)...)}
}

// replicaProc describes (without starting) a replica process listening on addr.
func (m *mesh) replicaProc(name, addr string, env ...string) *proc {
	return &proc{t: m.t, name: name, bin: m.replicaBin, log: filepath.Join(m.dir, name+".log"),
		env: append(append([]string{"KVMESH_REPLICA_NAME=" + name, "KVMESH_REPLICA_LISTEN=" + addr, "KVMESH_REPLICA_PEER_URLS=" + m.scheme() + addr,
			"KVMESH_REPLICA_DATA_DIR=" + filepath.Join(m.dir, name), "KVMESH_LOG_FORMAT=text"}, m.mtlsEnv("KVMESH_REPLICA_", name)...), env...)}
}

func indexOf(ps []*proc, p *proc) int {
	for i, q := range ps {
		if q == p {
			return i
		}
	}
	return -1
}

// currentRevisionOf reads a replica's etcd_debugging_mvcc_current_revision gauge.
func currentRevisionOf(url string) int64 {
	return int64(metricOf(url, "etcd_debugging_mvcc_current_revision"))
}
