// Command kvmesh-mesh runs a whole kvmesh mesh — three replicas, a NATS server with
// JetStream, the fanout and a gateway, each a process of its own — behind the
// all-in-one's interface: the same variables (KVMESH_GATEWAY_LISTEN is the client
// address, KVMESH_REPLICA_DATA_DIR holds everything, KVMESH_REPLICA_LISTEN and
// KVMESH_REPLICA_NAME are the first replica's; every variable reaches every process,
// each process's own settings over it), healthy when the gateway is, stopped by SIGTERM. The end-to-end suites
// run against it as they run against the all-in-one (KVMESH_E2E_TOPOLOGY=mesh), so both
// topologies answer the same tests.
//
// The binaries are found beside this one (kvmesh-replica, kvmesh-gateway,
// kvmesh-fanout, and nats-server or v2, the name `go build` gives it). The ports of
// the other processes are chosen at the first start and kept in the data directory,
// so a restart on the same directory is the same mesh. Each process dies with this
// one (PR_SET_PDEATHSIG): a kill -9 of it is a kill -9 of the whole mesh.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

const replicas = 3

// ports are the mesh's addresses besides the client's and the first replica's.
type ports struct {
	Replicas []string // all replicas, the first from KVMESH_REPLICA_LISTEN
	NATS     string
	Fanout   string // its /metrics
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh-mesh:", err)
		os.Exit(1)
	}
}

func run() error {
	dataDir := os.Getenv("KVMESH_REPLICA_DATA_DIR")
	client := os.Getenv("KVMESH_GATEWAY_LISTEN")
	first := os.Getenv("KVMESH_REPLICA_LISTEN")
	name := os.Getenv("KVMESH_REPLICA_NAME")
	if dataDir == "" || client == "" || first == "" || name == "" {
		return errors.New("KVMESH_REPLICA_DATA_DIR, KVMESH_GATEWAY_LISTEN, KVMESH_REPLICA_LISTEN and KVMESH_REPLICA_NAME must be set")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	bin := func(names ...string) (string, error) {
		for _, n := range names {
			p := filepath.Join(filepath.Dir(self), n)
			if _, err := os.Stat(p); err == nil {
				return p, nil
			}
		}
		return "", fmt.Errorf("%s not beside %s", names[0], self)
	}
	p, err := loadPorts(dataDir, first)
	if err != nil {
		return err
	}

	// Every process gets the caller's environment, with its own settings after it
	// (exec keeps the last value of a variable set twice).
	common := os.Environ()
	var urls, initial []string
	for i, addr := range p.Replicas {
		urls = append(urls, "http://"+addr)
		initial = append(initial, memberName(name, i)+"=http://"+addr)
	}

	var procs []*exec.Cmd
	start := func(binNames []string, args []string, env ...string) error {
		path, err := bin(binNames...)
		if err != nil {
			return err
		}
		cmd := exec.Command(path, args...)
		cmd.Env = append(append([]string(nil), common...), env...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return err
		}
		procs = append(procs, cmd)
		return nil
	}
	stopAll := func() {
		// The gateway and the fanout first, then the replicas, NATS last.
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { procs[i].Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				procs[i].Process.Kill()
			}
		}
	}

	host, port, _ := strings.Cut(p.NATS, ":")
	conf := filepath.Join(dataDir, "nats.conf")
	natsConf := fmt.Sprintf("host: %s\nport: %s\nmax_payload: 8MB\njetstream { store_dir: %q }\n", host, port, filepath.Join(dataDir, "nats"))
	if err := os.WriteFile(conf, []byte(natsConf), 0o644); err != nil {
		return err
	}
	if err := start([]string{"nats-server", "v2"}, []string{"-c", conf}); err != nil {
		return err
	}
	// The fanout and the gateway connect to NATS at start: wait until it listens.
	if err := waitListening(p.NATS, 10*time.Second); err != nil {
		stopAll()
		return err
	}
	for i, addr := range p.Replicas {
		err := start([]string{"kvmesh-replica"}, nil,
			"KVMESH_REPLICA_NAME="+memberName(name, i),
			"KVMESH_REPLICA_LISTEN="+addr,
			"KVMESH_REPLICA_PEER_URLS=http://"+addr,
			"KVMESH_REPLICA_CLIENT_URLS=http://"+client,
			"KVMESH_REPLICA_DATA_DIR="+filepath.Join(dataDir, memberName(name, i)),
			"KVMESH_REPLICA_INITIAL_CLUSTER="+strings.Join(initial, ","))
		if err != nil {
			stopAll()
			return err
		}
	}
	nats := "nats://" + p.NATS
	if err := start([]string{"kvmesh-fanout"}, nil, "KVMESH_FANOUT_LISTEN="+p.Fanout, "KVMESH_FANOUT_REPLICAS="+strings.Join(urls, ","), "KVMESH_NATS_URL="+nats); err != nil {
		stopAll()
		return err
	}
	if err := start([]string{"kvmesh-gateway"}, nil, "KVMESH_GATEWAY_LISTEN="+client, "KVMESH_GATEWAY_REPLICAS="+strings.Join(urls, ","), "KVMESH_NATS_URL="+nats); err != nil {
		stopAll()
		return err
	}

	// Until a signal, or until a process ends by itself (the mesh is then broken: all
	// of it stops, and this exits with the failure).
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	exited := make(chan error, len(procs))
	for _, c := range procs {
		go func() { exited <- fmt.Errorf("%s exited: %v", filepath.Base(c.Path), c.Wait()) }()
	}
	select {
	case <-sig:
		stopAll()
		return nil
	case err := <-exited:
		stopAll()
		return err
	}
}

// memberName is the i-th replica's name: the first is the name asked for.
func memberName(name string, i int) string {
	if i == 0 {
		return name
	}
	return fmt.Sprintf("%s-%d", name, i)
}

// loadPorts reads the mesh's ports from the data directory, or picks them (the first
// replica's is given) and keeps them there.
func loadPorts(dataDir, first string) (*ports, error) {
	path := filepath.Join(dataDir, "mesh-ports.json")
	var p ports
	if b, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(b, &p); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		p.Replicas[0] = first
		return &p, nil
	}
	p.Replicas = []string{first}
	for len(p.Replicas) < replicas {
		addr, err := freePort()
		if err != nil {
			return nil, err
		}
		p.Replicas = append(p.Replicas, addr)
	}
	var err error
	if p.NATS, err = freePort(); err != nil {
		return nil, err
	}
	if p.Fanout, err = freePort(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, err
	}
	b, _ := json.Marshal(&p)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return nil, err
	}
	return &p, os.Rename(tmp, path)
}

func waitListening(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			return c.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %s after %v: %w", addr, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
