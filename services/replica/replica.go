// Package replica is kvmesh's consensus and storage role: a Raft member
// (go.etcd.io/raft/v3) whose log and MVCC state machine live in two Pebble databases,
// serving kvmesh's internal Connect API to gateways.
//
// Keys in the raft database: 'R' the Raft log (package raftlog), "Aid" the member's
// identity. Keys in the state database, by first byte: 'A' the replicated membership
// and applied index, and 'c', 'i', 'm', 'r' the MVCC store (package mvcc). See
// state.go for the directory layout.
package replica

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.etcd.io/raft/v3"
	raftpb "go.etcd.io/raft/v3/raftpb"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/kvmesh/peer/v1/peerv1connect"
	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/grpcsplit"
	"github.com/kvmesh/kvmesh/libs/h2c"
	"github.com/kvmesh/kvmesh/libs/lifecycle"
	"github.com/kvmesh/kvmesh/libs/meshtls"
	"github.com/kvmesh/kvmesh/libs/notify"
	"github.com/kvmesh/kvmesh/libs/rpcmux"
	"github.com/kvmesh/kvmesh/libs/telemetry"
	"github.com/kvmesh/kvmesh/services/replica/mvcc"
	"github.com/kvmesh/kvmesh/services/replica/raftlog"
)

// Config is the replica's configuration, from KVMESH_REPLICA_… variables.
type Config struct {
	// Name is this member's human-readable name.
	Name string `env:"NAME, default=default"`
	// DataDir holds the Pebble database.
	DataDir string `env:"DATA_DIR, default=kvmesh-data"`
	// Listen is the address of the internal API (gateways, fanout).
	Listen string `env:"LISTEN, default=127.0.0.1:2390"`
	// PeerURLs are the URLs peers reach this member at: its internal API, which also
	// serves the peer API (kvmesh.peer.v1).
	PeerURLs []string `env:"PEER_URLS, default=http://127.0.0.1:2390"`
	// InitialCluster lists the members a new cluster starts with, as name=peerURL
	// (etcd's --initial-cluster). Empty means this member alone. Ignored when the data
	// directory already holds a member.
	InitialCluster []string `env:"INITIAL_CLUSTER"`
	// ClientURLs are the URLs clients reach the cluster at (the gateways), as reported
	// by MemberList.
	ClientURLs []string `env:"CLIENT_URLS, default=http://127.0.0.1:2379"`
	// ClusterToken makes the IDs of two clusters with the same members differ.
	ClusterToken string `env:"CLUSTER_TOKEN, default=kvmesh-cluster"`
	// InitialClusterState is "new" to bootstrap a cluster from InitialCluster, or
	// "existing" to join a running one that already added this member (etcd's
	// --initial-cluster-state). Ignored when the data directory already holds a member.
	InitialClusterState string `env:"INITIAL_CLUSTER_STATE, default=new"`
	// TickInterval is the Raft tick (etcd's heartbeat interval).
	TickInterval time.Duration `env:"TICK_INTERVAL, default=100ms"`
	// ElectionTicks is the election timeout in ticks.
	ElectionTicks int `env:"ELECTION_TICKS, default=10"`
	// SnapshotCount is how many applied entries the log keeps before it is truncated.
	SnapshotCount uint64 `env:"SNAPSHOT_COUNT, default=10000"`
	// MaxRequestBytes is the largest request accepted (etcd's --max-request-bytes).
	MaxRequestBytes int `env:"MAX_REQUEST_BYTES, default=1572864"`
	// MaxTxnOps is the most operations one txn may hold (etcd's --max-txn-ops).
	MaxTxnOps int `env:"MAX_TXN_OPS, default=128"`
	// RequestTimeout bounds how long a proposal waits to be applied.
	RequestTimeout time.Duration `env:"REQUEST_TIMEOUT, default=7s"`
	// LeaseCheckpointInterval is how often the leader records, through Raft, the
	// remaining TTL of leases that have gone half their TTL without a keep-alive, so
	// that a new leader does not give them their whole TTL again.
	LeaseCheckpointInterval time.Duration `env:"LEASE_CHECKPOINT_INTERVAL, default=1s"`
	// LeaseRevokeRate is the most expired leases the leader revokes per second, so that
	// an expiry storm cannot crowd out writes (etcd's leaseRevokeRate).
	LeaseRevokeRate int `env:"LEASE_REVOKE_RATE, default=1000"`
	// AuthBcryptCost is the bcrypt cost passwords are hashed with (etcd's
	// --bcrypt-cost).
	AuthBcryptCost int `env:"AUTH_BCRYPT_COST, default=10"`
	// AuthTokenTTL is how long a token from Authenticate is valid (etcd's JWT ttl).
	AuthTokenTTL time.Duration `env:"AUTH_TOKEN_TTL, default=5m"`
	// QuotaBackendBytes is the state database size at which the member raises the
	// NOSPACE alarm and refuses writes that add data (etcd's --quota-backend-bytes):
	// 0 means etcd's default, 2 GiB; a negative value, no quota.
	QuotaBackendBytes int64 `env:"QUOTA_BACKEND_BYTES, default=0"`

	// BackupDir, set, is where the replica writes a snapshot file every
	// BackupInterval, keeping the newest BackupKeep (backup.go).
	BackupDir      string        `env:"BACKUP_DIR"`
	BackupInterval time.Duration `env:"BACKUP_INTERVAL, default=1h"`
	BackupKeep     int           `env:"BACKUP_KEEP, default=24"`
	// CorruptCheckInterval is how often the member compares its key history's hash
	// with the other members' (corrupt.go; it also checks once at start); 0 checks
	// only at start.
	CorruptCheckInterval time.Duration `env:"CORRUPT_CHECK_INTERVAL, default=5m"`

	// EnableFaultInjection serves POST /debug/faults/isolate and /debug/faults/heal on
	// the internal API, which cut this member's peer traffic both ways and restore it:
	// for partition tests of real processes. Never enable it in production.
	EnableFaultInjection bool `env:"ENABLE_FAULT_INJECTION, default=false"`
	// EnablePprof serves Go's profiler on /debug/pprof/ of the internal API (etcd's
	// --enable-pprof).
	EnablePprof bool `env:"ENABLE_PPROF, default=false"`

	// MTLS is this member's identity in the mesh (KVMESH_REPLICA_MTLS_CERT_FILE,
	// _KEY_FILE, _CA_FILE): set, the internal port serves only callers with a
	// certificate from the cluster CA, and peers are called over TLS (https:// peer
	// URLs). KVMESH_REPLICA_ALLOW_PLAINTEXT=true lets the port be plaintext off loopback.
	MTLS meshtls.Config

	// fs replaces the file system under Pebble, for tests that inject disk faults.
	fs vfs.FS
}

// Validate checks the configuration; errors name the variable.
func (c *Config) Validate() error {
	switch {
	case c.Name == "":
		return errors.New("KVMESH_REPLICA_NAME: must not be empty")
	case c.DataDir == "":
		return errors.New("KVMESH_REPLICA_DATA_DIR: must not be empty")
	case c.TickInterval <= 0:
		return errors.New("KVMESH_REPLICA_TICK_INTERVAL: must be positive")
	case c.ElectionTicks < 2:
		return errors.New("KVMESH_REPLICA_ELECTION_TICKS: must be at least 2")
	case c.MaxRequestBytes <= 0:
		return errors.New("KVMESH_REPLICA_MAX_REQUEST_BYTES: must be positive")
	case c.MaxTxnOps <= 0:
		return errors.New("KVMESH_REPLICA_MAX_TXN_OPS: must be positive")
	case c.BackupDir != "" && c.BackupInterval <= 0:
		return errors.New("KVMESH_REPLICA_BACKUP_INTERVAL: must be positive")
	case c.BackupDir != "" && c.BackupKeep < 1:
		return errors.New("KVMESH_REPLICA_BACKUP_KEEP: must be at least 1")
	case c.LeaseCheckpointInterval <= 0:
		return errors.New("KVMESH_REPLICA_LEASE_CHECKPOINT_INTERVAL: must be positive")
	case c.LeaseRevokeRate <= 0:
		return errors.New("KVMESH_REPLICA_LEASE_REVOKE_RATE: must be positive")
	case c.SnapshotCount == 0:
		return errors.New("KVMESH_REPLICA_SNAPSHOT_COUNT: must be positive")
	case c.InitialClusterState != "new" && c.InitialClusterState != "existing":
		return fmt.Errorf("KVMESH_REPLICA_INITIAL_CLUSTER_STATE: %q is neither new nor existing", c.InitialClusterState)
	case c.InitialClusterState == "existing" && len(c.InitialCluster) == 0:
		return errors.New("KVMESH_REPLICA_INITIAL_CLUSTER: joining an existing cluster needs the members' peer URLs")
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("KVMESH_REPLICA_LISTEN: %w", err)
	}
	if err := c.MTLS.Validate("KVMESH_REPLICA_"); err != nil {
		return err
	}
	return config.CheckReplicaURLs("KVMESH_REPLICA_PEER_URLS", c.PeerURLs, c.MTLS.Enabled())
}

// Replica is one member of the cluster.
type Replica struct {
	cfg    Config
	log    *slog.Logger
	tel    *telemetry.Telemetry
	tracer trace.Tracer
	m      *metrics

	raftDB  *pebble.DB
	raftLog *raftlog.Store
	node    raft.Node

	// st is the state machine. The apply loop, its only writer, swaps it when it
	// installs a snapshot; everyone else reads it through acquire.
	stateMu sync.RWMutex
	st      *state
	snaps   snapshots

	id, clusterID uint64
	members       *memberTable
	auth          authState
	alarms        alarmTable
	// loops are the background loops Run starts (backups, corruption checks).
	loops sync.WaitGroup
	// identity is the member's IDs as New found them in the data directory (nil for a
	// member not bootstrapped yet: Run bootstraps or joins).
	identity *identity
	ready    chan struct{} // closed once Run has started the member
	// dbSizeLast is the state database's size as measured at dbSizeAt (UnixNano), and
	// dbSizeSince the cost of the writes admitted since, for the quota check
	// (dbSizeRecent).
	dbSizeLast, dbSizeAt, dbSizeSince atomic.Int64

	term        atomic.Uint64
	leader      atomic.Uint64
	applied     atomic.Uint64
	appliedTerm atomic.Uint64 // term of the last applied entry

	applyDone notify.Notifier // after every apply

	nextID  atomic.Uint64
	waitMu  sync.Mutex
	waiters map[uint64]*waiter

	read   readLoop
	peers  *transport
	lessor lessor

	removeOnce sync.Once
	removedc   chan struct{} // closed once this member is removed from the cluster

	applyc   chan applyWork
	calls    *workers // run the calls of Batch streams
	stopc    chan struct{}
	quitc    chan struct{} // closed when Stop begins: long streams end
	doneRaft chan struct{}
	doneApp  chan struct{}
	server   *http.Server
	grpc     *grpc.Server
	lis      net.Listener
	// mesh is the mutual TLS of the internal port and of calls to peers (nil: plaintext).
	mesh *meshtls.Mesh
}

// New opens (or creates) the replica's data; it starts nothing. Listen binds the
// internal API's address, Run starts the member and serves until its context ends.
func New(cfg Config, tel *telemetry.Telemetry) (*Replica, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	mesh, err := cfg.MTLS.Load("KVMESH_REPLICA_")
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("KVMESH_REPLICA_DATA_DIR: %w", err)
	}
	opts := raftPebbleOptions(tel.Log)
	if cfg.fs != nil {
		opts.FS = cfg.fs
	}
	db, err := pebble.Open(filepath.Join(cfg.DataDir, raftDirName), opts)
	if err != nil {
		return nil, fmt.Errorf("open pebble in %s: %w", cfg.DataDir, err)
	}
	r := &Replica{
		cfg: cfg, log: tel.Log.With("role", "replica", "name", cfg.Name), tel: tel, mesh: mesh,
		tracer:   tel.Tracer.Tracer("kvmesh/replica"),
		raftDB:   db,
		waiters:  make(map[uint64]*waiter),
		applyc:   make(chan applyWork, 64),
		removedc: make(chan struct{}),
		stopc:    make(chan struct{}),
		quitc:    make(chan struct{}),
		doneRaft: make(chan struct{}),
		doneApp:  make(chan struct{}),
		ready:    make(chan struct{}),
	}
	r.calls = newWorkers(batchWorkers, r.stopc)
	if err := r.open(); err != nil {
		if r.st != nil {
			r.st.kv.Close()
			r.st.db.Close()
		}
		if r.raftLog != nil {
			r.raftLog.Close()
		}
		db.Close()
		return nil, err
	}
	return r, nil
}

// openState opens the state machine database in dir.
func (r *Replica) openState(dir string) (*state, error) {
	opts := statePebbleOptions(r.log)
	if r.cfg.fs != nil {
		opts.FS = r.cfg.fs
	}
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, fmt.Errorf("open state database %s: %w", dir, err)
	}
	kv, err := mvcc.Open(db, r.log)
	if err != nil {
		db.Close()
		return nil, err
	}
	return &state{dir: dir, db: db, kv: kv}, nil
}

func (r *Replica) open() error {
	var err error
	logDir := filepath.Join(r.cfg.DataDir, walDirName)
	opts := raftlog.Options{FS: r.cfg.fs}
	if err := raftlog.ImportPebble(r.raftDB, logDir, opts); err != nil {
		return err
	}
	if r.raftLog, err = raftlog.Open(logDir, opts); err != nil {
		return err
	}
	dir, err := currentStateDir(r.cfg.DataDir)
	if err != nil {
		return fmt.Errorf("KVMESH_REPLICA_DATA_DIR: %w", err)
	}
	if r.st, err = r.openState(dir); err != nil {
		return err
	}
	if r.members, err = loadMembers(r.st.db); err != nil {
		return err
	}
	a, err := loadAuth(r.st.db)
	if err != nil {
		return err
	}
	r.auth.install(a)
	al, err := loadAlarms(r.st.db)
	if err != nil {
		return err
	}
	r.alarms.install(al)
	id, err := loadIdentity(r.raftDB)
	if err != nil {
		return err
	}
	pos, err := loadApplied(r.st.db)
	if err != nil {
		return err
	}
	applied := pos.index
	r.applied.Store(applied)
	r.appliedTerm.Store(pos.term)
	if err := r.reconcileLog(pos); err != nil {
		return err
	}
	r.m = newMetrics(r)
	r.identity = id
	return nil
}

// startRaft starts the Raft node (bootstrapping, joining or restarting the member)
// and the loops that drive it: the first thing Run does.
func (r *Replica) startRaft() error {
	id, applied := r.identity, r.applied.Load()
	rc := &raft.Config{
		ElectionTick:    r.cfg.ElectionTicks,
		HeartbeatTick:   1,
		Storage:         r.raftLog,
		Applied:         applied,
		MaxSizePerMsg:   1 << 20,
		MaxInflightMsgs: 512,
		CheckQuorum:     true,
		PreVote:         true,
		Logger:          &raftLogger{r.log.With("component", "raft")},
	}
	r.peers = newTransport(r)
	if id != nil {
		r.id, r.clusterID = id.member, id.cluster
		rc.ID = r.id
		r.raftLog.SetConfState(r.members.confState())
		r.log.Info("restarting member", "member_id", fmt.Sprintf("%x", r.id), "cluster_id", fmt.Sprintf("%x", r.clusterID), "applied", applied)
		r.node = raft.RestartNode(rc)
		if len(r.members.list()) == 0 && r.cfg.InitialClusterState == "existing" {
			// Joined, but nothing applied yet: the peers' addresses come from them.
			if _, err := r.joinInfo(); err != nil {
				r.log.Warn("cannot reach the cluster's members yet", "err", err)
			}
		}
	} else if r.cfg.InitialClusterState == "existing" {
		// Joining a running cluster that already added this member (MemberAdd): learn
		// its ID and the cluster's from the members, then wait for the leader to send
		// the log or a snapshot.
		self, err := r.joinInfo()
		if err != nil {
			return err
		}
		r.id, r.clusterID = self.member, self.cluster
		if err := saveIdentity(r.raftDB, *self); err != nil {
			return err
		}
		rc.ID = r.id
		r.log.Info("joining existing cluster", "member_id", fmt.Sprintf("%x", r.id), "cluster_id", fmt.Sprintf("%x", r.clusterID))
		r.node = raft.RestartNode(rc)
	} else {
		members, self, err := r.cfg.initialMembers()
		if err != nil {
			return err
		}
		r.id = self.GetID()
		ids := make([]uint64, len(members))
		peers := make([]raft.Peer, len(members))
		for i, m := range members {
			ids[i] = m.GetID()
			ctx, err := proto.Marshal(&replicav1.ConfChangeContext{Member: m})
			if err != nil {
				return err
			}
			peers[i] = raft.Peer{ID: m.GetID(), Context: ctx}
		}
		r.clusterID = clusterID(ids, r.cfg.ClusterToken)
		if err := saveIdentity(r.raftDB, identity{member: r.id, cluster: r.clusterID}); err != nil {
			return err
		}
		rc.ID = r.id
		r.log.Info("starting new cluster", "member_id", fmt.Sprintf("%x", r.id), "cluster_id", fmt.Sprintf("%x", r.clusterID), "members", len(members))
		r.node = raft.StartNode(rc, peers)
	}
	// Request ids: this member's low 16 bits, then milliseconds, then a counter, so
	// ids never repeat across restarts.
	r.nextID.Store(r.id<<48 | uint64(time.Now().UnixMilli())<<8&(1<<48-1))
	r.read.init(r)
	r.lessor.init(r)
	if id != nil {
		r.campaignIfAlone(r.members.confState())
	}
	go r.raftLoop()
	go r.applyLoop()
	go r.read.run()
	go r.lessor.run()
	go r.publish()
	return nil
}

// campaignIfAlone starts an election at once when this member is the only voter: no
// one else can win, so waiting an election timeout would only delay the first write.
// (A bootstrapping member can campaign only once its first configuration is applied.)
func (r *Replica) campaignIfAlone(cs *raftpb.ConfState) {
	if v := cs.GetVoters(); len(v) == 1 && v[0] == r.id && r.leader.Load() == raft.None {
		go r.node.Campaign(context.Background())
	}
}

// initialMembers is the membership a new cluster starts with, and this member in it.
func (c *Config) initialMembers() ([]*pb.Member, *pb.Member, error) {
	self := &pb.Member{Name: c.Name, PeerURLs: c.PeerURLs, ClientURLs: c.ClientURLs}
	self.ID = memberID(self, c.ClusterToken)
	if len(c.InitialCluster) == 0 {
		return []*pb.Member{self}, self, nil
	}
	var members []*pb.Member
	var found *pb.Member
	for _, entry := range c.InitialCluster {
		name, url, ok := strings.Cut(entry, "=")
		if !ok || name == "" || url == "" {
			return nil, nil, fmt.Errorf("KVMESH_REPLICA_INITIAL_CLUSTER: %q is not name=peerURL", entry)
		}
		m := &pb.Member{Name: name, PeerURLs: []string{url}}
		if name == c.Name {
			if len(c.PeerURLs) == 0 || c.PeerURLs[0] != url {
				return nil, nil, fmt.Errorf("KVMESH_REPLICA_INITIAL_CLUSTER: %s's peer URL %s differs from KVMESH_REPLICA_PEER_URLS %v", name, url, c.PeerURLs)
			}
			m = self
			found = self
		}
		m.ID = memberID(m, c.ClusterToken)
		members = append(members, m)
	}
	if found == nil {
		return nil, nil, fmt.Errorf("KVMESH_REPLICA_INITIAL_CLUSTER: no member named %q (KVMESH_REPLICA_NAME)", c.Name)
	}
	return members, found, nil
}

// memberID derives a member's ID from what identifies it, as etcd does.
func memberID(m *pb.Member, token string) uint64 {
	urls := append([]string(nil), m.GetPeerURLs()...)
	sort.Strings(urls)
	sum := sha256.Sum256([]byte(strings.Join(urls, ",") + "\x00" + m.GetName() + "\x00" + token))
	return binary.BigEndian.Uint64(sum[:8])
}

func clusterID(members []uint64, token string) uint64 {
	ids := append([]uint64(nil), members...)
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	h := sha256.New()
	for _, id := range ids {
		h.Write(binary.BigEndian.AppendUint64(nil, id))
	}
	h.Write([]byte(token))
	return binary.BigEndian.Uint64(h.Sum(nil)[:8])
}

// Handler is the replica's HTTP surface: the peers' snapshot stream (Connect), /metrics,
// the health endpoints. The internal API is grpc-go's (grpc.go), on the same port.
func (r *Replica) Handler() http.Handler {
	mux := rpcmux.New()
	mux.Handle(peerv1connect.NewPeerServiceHandler(&peerService{r}, r.tel.InternalHandler()...))
	mux.Handle("/metrics", r.tel.MetricsHandler())
	r.healthEndpoints().Install(mux)
	if r.cfg.EnableFaultInjection {
		fault := func(isolate bool) http.HandlerFunc {
			return func(w http.ResponseWriter, req *http.Request) {
				if req.Method != http.MethodPost {
					http.Error(w, "POST only", http.StatusMethodNotAllowed)
					return
				}
				r.peers.isolated.Store(isolate)
				r.log.Warn("fault injection", "isolated", isolate)
				fmt.Fprintln(w, "ok")
			}
		}
		mux.HandleFunc("/debug/faults/isolate", fault(true))
		mux.HandleFunc("/debug/faults/heal", fault(false))
	}
	if r.cfg.EnablePprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// grpcOverheadBytes is the slack etcd allows above --max-request-bytes for a gRPC
// message's framing, so that a too-large request gets etcd's own error.
const grpcOverheadBytes = 512 * 1024

// Listen binds the internal API's address (cfg.Listen).
func (r *Replica) Listen() error {
	lis, err := meshtls.Listen("KVMESH_REPLICA_LISTEN", "KVMESH_REPLICA_ALLOW_PLAINTEXT", r.cfg.Listen, r.mesh.ServerConfig(), r.cfg.MTLS.AllowPlaintext)
	if err != nil {
		return err
	}
	r.lis = lis
	r.server = h2c.NewServer(r.Handler())
	r.grpc = r.newGRPCServer()
	return nil
}

// Run starts the member (its Raft node and the loops around it), answers the internal
// API when Listen was called, and stops when ctx ends or serving fails: the API, the
// Raft node and the storage, within lifecycle's StopTimeout.
func (r *Replica) Run(ctx context.Context) error {
	if err := r.startRaft(); err != nil {
		return errors.Join(err, r.Close())
	}
	var errc <-chan error
	if r.lis != nil {
		r.log.Info("serving internal API", "addr", r.lis.Addr().String())
		errc = grpcsplit.Serve(r.lis, r.log, r.grpc, r.server)
	}
	if r.cfg.BackupDir != "" {
		r.loops.Add(1)
		go r.backupLoop()
	}
	r.loops.Add(1)
	go r.corruptionLoop()
	close(r.ready)
	return lifecycle.Serving(ctx, errc, r.stop)
}

// Ready is closed once Run has started the member.
func (r *Replica) Ready() <-chan struct{} { return r.ready }

// Close releases what New opened, for a replica never run (Run releases it itself).
func (r *Replica) Close() error {
	if r.lis != nil {
		r.lis.Close()
	}
	return r.closeStorage()
}

func (r *Replica) closeStorage() error {
	r.stateMu.Lock()
	st := r.st
	r.stateMu.Unlock()
	return errors.Join(st.close(), r.raftLog.Close(), r.raftDB.Close())
}

// Addr is the internal API's listening address, once Serve has started.
func (r *Replica) Addr() string {
	if r.lis == nil {
		return r.cfg.Listen
	}
	return r.lis.Addr().String()
}

// stopGrace is how long stop lets requests under way finish.
const stopGrace = 2 * time.Second

// stop shuts down the API, the Raft node and the storage.
func (r *Replica) stop(ctx context.Context) error {
	close(r.quitc)
	if r.server != nil {
		r.lis.Close()
		stopped := make(chan struct{})
		go func() {
			r.grpc.GracefulStop()
			close(stopped)
		}()
		// Long-lived streams (peers', the fanout's feed, the gateways' keepers) never go
		// idle: after a grace period their connections are closed.
		sctx, cancel := context.WithTimeout(ctx, stopGrace)
		if err := r.server.Shutdown(sctx); err != nil {
			r.server.Close()
		}
		select {
		case <-stopped:
		case <-sctx.Done():
			r.grpc.Stop()
		}
		cancel()
	}
	close(r.stopc)
	r.node.Stop()
	<-r.doneRaft
	r.peers.stop()
	<-r.doneApp
	r.read.wait()
	r.lessor.wait()
	r.snaps.wait()
	r.loops.Wait()
	err := r.closeStorage()
	r.log.Info("stopped")
	return err
}

// ID is this member's ID.
func (r *Replica) ID() uint64 { return r.id }

func (r *Replica) header(h *pb.ResponseHeader) *pb.ResponseHeader {
	if h == nil {
		h = &pb.ResponseHeader{}
	}
	h.ClusterId = r.clusterID
	h.MemberId = r.id
	h.RaftTerm = r.term.Load()
	return h
}

// statePebbleOptions tunes Pebble for the state machine's access pattern: point
// lookups of a key's current version on every write (bloom filters let them skip most
// tables) and reads of recent data (a block cache of useful size).
func statePebbleOptions(log *slog.Logger) *pebble.Options {
	o := &pebble.Options{
		Logger:       pebbleLogger{log.With("component", "pebble", "db", "state")},
		CacheSize:    128 << 20,
		MemTableSize: 64 << 20,
	}
	for i := range o.Levels {
		o.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	return o
}

// raftPebbleOptions is Pebble for the small database of the member's identity (the
// Raft log has files of its own, package raftlog).
func raftPebbleOptions(log *slog.Logger) *pebble.Options {
	return &pebble.Options{
		Logger:       pebbleLogger{log.With("component", "pebble", "db", "raft")},
		CacheSize:    1 << 20,
		MemTableSize: 1 << 20,
	}
}

// reconcileLog brings the Raft log in line with the state machine after a restart.
// The state machine can be ahead of the log in two ways: a snapshot was installed and
// the crash came before the log was reset to it (the state is beyond the log's last
// index), or the commit index, written without sync, was lost while applied state
// survived. In both cases what was applied was committed, so the log is told so.
func (r *Replica) reconcileLog(pos appliedPos) error {
	if pos.index == 0 {
		return nil
	}
	last, _ := r.raftLog.LastIndex()
	first, _ := r.raftLog.FirstIndex()
	if pos.index < first-1 {
		return fmt.Errorf("KVMESH_REPLICA_DATA_DIR: the state machine (applied index %d) is behind the raft log's start (%d); the data directory is inconsistent", pos.index, first)
	}
	if pos.index > last {
		r.log.Warn("state machine is ahead of the raft log; resetting the log to it", "applied", pos.index, "last_index", last)
		return r.raftLog.ApplySnapshot(&raftpb.SnapshotMetadata{
			Index: proto.Uint64(pos.index), Term: proto.Uint64(pos.term), ConfState: r.members.confState()})
	}
	return r.raftLog.EnsureCommitted(pos.index)
}

// pebbleLogger sends Pebble's own messages to the structured log.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any)  { p.l.Debug(fmt.Sprintf(format, args...)) }
func (p pebbleLogger) Errorf(format string, args ...any) { p.l.Error(fmt.Sprintf(format, args...)) }
func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...))
	panic(fmt.Sprintf(format, args...))
}
