// Package harness starts kvmesh and etcd server processes for kvmesh's
// black-box end-to-end tests.
//
// The harness never links any kvmesh code: it builds (or is given) the kvmesh
// binary, runs it as a child process on free loopback ports and talks to it
// over the network only. Real etcd (/usr/bin/etcd) is started the same way and
// serves as the oracle.
//
// Environment variables understood by the harness:
//
//	KVMESH_E2E_TARGET    which server the suites run against: "kvmesh" (default) or "etcd"
//	KVMESH_BIN           use this prebuilt kvmesh binary instead of building one
//	KVMESH_E2E_ETCD_BIN  path of the etcd binary (default /usr/bin/etcd, then $PATH)
//	KVMESH_E2E_ETCDCTL_BIN path of the etcdctl binary (default /usr/bin/etcdctl, then $PATH)
//	CI                   when set, a missing etcd binary fails tests instead of skipping them
package harness

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Kind names a server implementation.
type Kind string

const (
	// KindKvmesh is kvmesh's all-in-one binary.
	KindKvmesh Kind = "kvmesh"
	// KindEtcd is the real etcd used as the oracle.
	KindEtcd Kind = "etcd"
)

// DefaultReadyTimeout is how long a server gets to answer /health with true.
const DefaultReadyTimeout = 20 * time.Second

// stopTimeout is how long Stop waits after SIGTERM before it sends SIGKILL.
const stopTimeout = 15 * time.Second

// Options configure a server started by the harness. The zero value is valid.
type Options struct {
	// Name is the member name (kvmesh: KVMESH_REPLICA_NAME, etcd: --name).
	// Default "e2e".
	Name string
	// DataDir reuses an existing data directory. Default: a fresh temp dir.
	DataDir string
	// Env holds extra environment variables (KEY=VALUE) for the process.
	Env []string
	// Args holds extra command-line arguments for the process.
	Args []string
	// ReadyTimeout bounds the wait for /health. Default DefaultReadyTimeout.
	ReadyTimeout time.Duration
}

// ErrBinaryMissing is returned (wrapped) when a server binary is not installed.
var ErrBinaryMissing = errors.New("server binary not installed")

// Server is a server process started by the harness. Its client address stays
// the same across Restart, and so does its data directory.
type Server struct {
	kind    Kind
	name    string
	bin     string
	dataDir string
	logPath string
	opts    Options

	clientAddr string // host:port of the etcd-compatible client API
	innerAddr  string // kvmesh replica address or etcd peer address

	tb testing.TB // nil for servers not bound to a test

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the current process has exited
	waitErr error
	starts  int
	ownDirs []string // temp dirs to remove on Close (servers without tb)
}

// Kind tells which implementation this server is.
func (s *Server) Kind() Kind { return s.kind }

// Name is the member name the server was started with.
func (s *Server) Name() string { return s.name }

// Endpoint is the client address, host:port, of the etcd v3 API.
func (s *Server) Endpoint() string { return s.clientAddr }

// ClientURL is the client address as an http URL.
func (s *Server) ClientURL() string { return "http://" + s.clientAddr }

// DataDir is the server's data directory.
func (s *Server) DataDir() string { return s.dataDir }

// LogPath is the file that receives the server's stdout and stderr.
func (s *Server) LogPath() string { return s.logPath }

// Pid is the process id of the running server, or 0 when it is not running.
func (s *Server) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil || s.isExitedLocked() {
		return 0
	}
	return s.cmd.Process.Pid
}

func (s *Server) isExitedLocked() bool {
	if s.exited == nil {
		return true
	}
	select {
	case <-s.exited:
		return true
	default:
		return false
	}
}

// Running reports whether the server process is alive.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.isExitedLocked()
}

func (s *Server) fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if s.tb != nil {
		s.tb.Helper()
		s.tb.Fatalf("%s\n%s", msg, s.tailForReport())
		return
	}
	panic(msg + "\n" + s.tailForReport())
}

// Stop shuts the server down gracefully with SIGTERM and waits for it to
// exit; if it does not exit within 15 s it is killed and the test fails.
func (s *Server) Stop() {
	if s.tb != nil {
		s.tb.Helper()
	}
	if err := s.stop(); err != nil {
		s.fatalf("stopping %s: %v", s.kind, err)
	}
}

func (s *Server) stop() error {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil || exited == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return nil
	case <-time.After(stopTimeout):
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-exited
		return fmt.Errorf("did not exit within %v of SIGTERM; killed it", stopTimeout)
	}
}

// Kill sends SIGKILL to the server and waits for the process to be gone.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil || exited == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-exited
}

// Restart stops the server if it is running (gracefully) and starts it again
// with the same data directory, ports and options, then waits until healthy.
func (s *Server) Restart() {
	if s.tb != nil {
		s.tb.Helper()
	}
	if err := s.stop(); err != nil {
		s.fatalf("restart: stopping %s: %v", s.kind, err)
	}
	if err := s.startAndWait(); err != nil {
		s.fatalf("restart: %v", err)
	}
}

// Close stops the server and removes the temporary directories the harness
// created for it. Tests normally don't need it: servers started with
// StartKvmesh, StartEtcd or StartTarget are closed by t.Cleanup.
func (s *Server) Close() error {
	err := s.stop()
	for _, d := range s.ownDirs {
		_ = os.RemoveAll(d)
	}
	s.ownDirs = nil
	return err
}

// LogTail returns the last n lines of the server's log.
func (s *Server) LogTail(n int) string {
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read log %s: %v)", s.logPath, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (s *Server) tailForReport() string {
	return fmt.Sprintf("---- last lines of %s log (%s) ----\n%s\n---- end of %s log ----",
		s.kind, s.logPath, s.LogTail(80), s.kind)
}

// args builds the command line for the current ports.
func (s *Server) args() []string {
	switch s.kind {
	case KindEtcd:
		peerURL := "http://" + s.innerAddr
		a := []string{
			"--name", s.name,
			"--data-dir", s.dataDir,
			"--listen-client-urls", s.ClientURL(),
			"--advertise-client-urls", s.ClientURL(),
			"--listen-peer-urls", peerURL,
			"--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", s.name + "=" + peerURL,
			"--initial-cluster-state", "new",
			"--initial-cluster-token", "kvmesh-e2e-" + filepath.Base(filepath.Dir(s.dataDir)),
			"--logger", "zap",
			"--log-outputs", "stderr",
		}
		return append(a, s.opts.Args...)
	default:
		return append([]string(nil), s.opts.Args...)
	}
}

func (s *Server) env() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "KVMESH_REPLICA_DATA_DIR", "KVMESH_GATEWAY_LISTEN", "KVMESH_REPLICA_LISTEN", "KVMESH_REPLICA_PEER_URLS", "KVMESH_REPLICA_NAME":
			continue
		}
		if strings.HasPrefix(k, "ETCD_") || strings.HasPrefix(k, "ETCDCTL_") {
			continue // etcd reads flags from ETCD_* variables; keep it deterministic
		}
		env = append(env, kv)
	}
	if s.kind == KindKvmesh {
		env = append(env,
			"KVMESH_REPLICA_DATA_DIR="+s.dataDir,
			"KVMESH_GATEWAY_LISTEN="+s.clientAddr,
			"KVMESH_REPLICA_LISTEN="+s.innerAddr,
			"KVMESH_REPLICA_PEER_URLS=http://"+s.innerAddr, // what MemberList shows
			"KVMESH_REPLICA_NAME="+s.name,
		)
	}
	return append(env, s.opts.Env...)
}

// startAndWait starts the process and waits for it to report healthy.
func (s *Server) startAndWait() error {
	if err := s.startProcess(); err != nil {
		return err
	}
	timeout := s.opts.ReadyTimeout
	if timeout <= 0 {
		timeout = DefaultReadyTimeout
	}
	if err := s.waitHealthy(timeout); err != nil {
		s.Kill()
		return fmt.Errorf("%s (client %s, data dir %s) did not become healthy: %w\n%s",
			s.kind, s.clientAddr, s.dataDir, err, s.tailForReport())
	}
	return nil
}

func (s *Server) startProcess() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.isExitedLocked() {
		return fmt.Errorf("%s is already running (pid %d)", s.kind, s.cmd.Process.Pid)
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	s.starts++
	fmt.Fprintf(logf, "==== harness: start #%d of %s at %s: %s %s (client %s, inner %s) ====\n",
		s.starts, s.kind, time.Now().Format(time.RFC3339Nano), s.bin,
		strings.Join(s.args(), " "), s.clientAddr, s.innerAddr)
	cmd := exec.Command(s.bin, s.args()...)
	cmd.Env = s.env()
	cmd.Dir = filepath.Dir(s.logPath)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Own process group, so a Ctrl-C of `go test` does not race our shutdown.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("starting %s: %w", s.bin, err)
	}
	exited := make(chan struct{})
	s.cmd, s.exited, s.waitErr = cmd, exited, nil
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(logf, "==== harness: %s (pid %d) exited: %v ====\n", s.kind, cmd.Process.Pid, errOrOK(err))
		logf.Close()
		s.mu.Lock()
		s.waitErr = err
		s.mu.Unlock()
		close(exited)
	}()
	return nil
}

func errOrOK(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// healthResponse is etcd's /health JSON body. etcd 3.5+ (and kvmesh) answer
// {"health":"true","reason":""}; etcd 3.4 omits "reason". Only "health" is
// checked.
type healthResponse struct {
	Health string `json:"health"`
	Reason string `json:"reason"`
}

func (s *Server) waitHealthy(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: 2 * time.Second}
	url := s.ClientURL() + "/health"
	var last string
	for {
		s.mu.Lock()
		exited, werr := s.isExitedLocked(), s.waitErr
		s.mu.Unlock()
		if exited {
			return fmt.Errorf("process exited before becoming healthy: %v", errOrOK(werr))
		}
		resp, err := client.Get(url)
		if err != nil {
			last = err.Error()
		} else {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
			resp.Body.Close()
			var h healthResponse
			if resp.StatusCode == http.StatusOK && json.Unmarshal(body, &h) == nil && h.Health == "true" {
				return nil
			}
			last = fmt.Sprintf("GET %s: %s %s", url, resp.Status, bytes.TrimSpace(body))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v; last result: %s", timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// logMentionsAddrInUse tells whether the current start failed because a port
// was taken between our probe and the server's bind.
func (s *Server) logMentionsAddrInUse() bool {
	f, err := os.Open(s.logPath)
	if err != nil {
		return false
	}
	defer f.Close()
	// Only look at the lines of the latest start.
	marker := fmt.Sprintf("==== harness: start #%d ", s.starts)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	seen := false
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, marker) {
			seen = true
			continue
		}
		if seen && strings.Contains(line, "address already in use") {
			return true
		}
	}
	return false
}

var (
	portsMu sync.Mutex
	// portsTaken holds every address handed out by FreePort in this
	// process, so that a port released by a killed server is not given to
	// another server before the first one restarts on it.
	portsTaken = map[string]bool{}
)

// FreePort returns a loopback address host:port that was free a moment ago
// and that this process has not handed out before.
func FreePort() (string, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		addr := l.Addr().String()
		l.Close()
		if !portsTaken[addr] {
			portsTaken[addr] = true
			return addr, nil
		}
	}
	return "", errors.New("FreePort: no unused loopback port found in 100 tries")
}

func (s *Server) pickPorts() error {
	var err error
	if s.clientAddr, err = FreePort(); err != nil {
		return err
	}
	for {
		if s.innerAddr, err = FreePort(); err != nil {
			return err
		}
		if s.innerAddr != s.clientAddr {
			return nil
		}
	}
}

// launch creates and starts a server of the given kind. dirs gives the temp
// directory maker (t.TempDir for test-bound servers).
func launch(kind Kind, bin string, opts Options, tempDir func() (string, error)) (*Server, error) {
	s := &Server{kind: kind, bin: bin, opts: opts, name: opts.Name}
	if s.name == "" {
		s.name = "e2e"
	}
	logDir, err := tempDir()
	if err != nil {
		return nil, err
	}
	s.logPath = filepath.Join(logDir, string(kind)+".log")
	if opts.DataDir != "" {
		s.dataDir = opts.DataDir
	} else {
		d, err := tempDir()
		if err != nil {
			return nil, err
		}
		// etcd wants to create its data dir itself with mode 0700.
		s.dataDir = filepath.Join(d, "data")
		if err := os.MkdirAll(s.dataDir, 0o700); err != nil {
			return nil, err
		}
	}
	const attempts = 3
	var lastErr error
	for i := 0; i < attempts; i++ {
		if err := s.pickPorts(); err != nil {
			return s, err
		}
		lastErr = s.startAndWait()
		if lastErr == nil {
			return s, nil
		}
		if !s.logMentionsAddrInUse() {
			break
		}
		// A port got taken in the meantime; try fresh ports, on a fresh data directory
		// when it is the harness's own: what the failed start wrote names the old ports
		// (a mesh keeps its other ports and its members' IDs there, which would then
		// disagree with the new first replica's).
		if opts.DataDir == "" {
			if err := os.RemoveAll(s.dataDir); err != nil {
				return s, err
			}
			if err := os.MkdirAll(s.dataDir, 0o700); err != nil {
				return s, err
			}
		}
	}
	return s, lastErr
}

// mkTemp returns a tempDir function that creates directories with
// os.MkdirTemp and remembers them in *dirs.
func mkTemp(dirs *[]string) func() (string, error) {
	return func() (string, error) {
		d, err := os.MkdirTemp("", "kvmesh-e2e-")
		if err == nil {
			*dirs = append(*dirs, d)
		}
		return d, err
	}
}

// Launch starts a server of the given kind that is not bound to a test (for
// example one shared by a whole package, started from TestMain or lazily).
// The caller must Close it. A missing etcd binary yields an error wrapping
// ErrBinaryMissing.
func Launch(kind Kind, opts Options) (*Server, error) {
	bin, err := binaryFor(kind)
	if err != nil {
		return nil, err
	}
	var dirs []string
	s, err := launch(kind, bin, opts, mkTemp(&dirs))
	if s != nil {
		s.ownDirs = dirs
	}
	if err != nil {
		if s != nil {
			_ = s.Close()
		} else {
			for _, d := range dirs {
				_ = os.RemoveAll(d)
			}
		}
		return nil, err
	}
	return s, nil
}

func binaryFor(kind Kind) (string, error) {
	switch kind {
	case KindKvmesh:
		return KvmeshBinary()
	case KindEtcd:
		return EtcdBinary()
	default:
		return "", fmt.Errorf("unknown server kind %q", kind)
	}
}

// start is the test-bound variant of Launch.
func start(t testing.TB, kind Kind, opts Options) *Server {
	t.Helper()
	bin, err := binaryFor(kind)
	if err != nil {
		SkipOrFail(t, err)
	}
	s, err := launch(kind, bin, opts, func() (string, error) { return t.TempDir(), nil })
	if s != nil {
		s.tb = t
		started := err == nil // a failed start already printed the log tail
		// Registered after the TempDirs, so it runs before they are removed.
		t.Cleanup(func() {
			if err := s.stop(); err != nil {
				t.Errorf("stopping %s at cleanup: %v", kind, err)
			}
			if started && t.Failed() {
				t.Logf("%s", s.tailForReport())
			}
		})
	}
	if err != nil {
		t.Fatalf("starting %s: %v", kind, err)
	}
	return s
}

// StartKvmesh builds kvmesh (once per test process) and starts it on free
// loopback ports with a fresh data directory (or opts.DataDir), waiting until
// GET /health reports true. The server is stopped when the test ends, and
// its log tail is printed if the test failed. opts is optional.
func StartKvmesh(t testing.TB, opts ...Options) *Server {
	t.Helper()
	return start(t, KindKvmesh, oneOpts(t, opts))
}

// StartEtcd starts a single-node real etcd on free loopback ports with a fresh
// data directory. If the etcd binary is missing the test is skipped, or
// failed when the CI environment variable is set.
func StartEtcd(t testing.TB, opts ...Options) *Server {
	t.Helper()
	return start(t, KindEtcd, oneOpts(t, opts))
}

// Start starts a server of the given kind.
func Start(t testing.TB, kind Kind, opts ...Options) *Server {
	t.Helper()
	return start(t, kind, oneOpts(t, opts))
}

// StartTarget starts the server selected by KVMESH_E2E_TARGET.
func StartTarget(t testing.TB, opts ...Options) *Server {
	t.Helper()
	return start(t, MustTarget(t), oneOpts(t, opts))
}

// oneOpts returns the optional Options argument.
func oneOpts(t testing.TB, opts []Options) Options {
	t.Helper()
	switch len(opts) {
	case 0:
		return Options{}
	case 1:
		return opts[0]
	default:
		t.Fatalf("harness: at most one Options value, got %d", len(opts))
		return Options{}
	}
}

// SkipOrFail skips the test when err says a binary is missing and CI is not
// set; it fails the test otherwise.
func SkipOrFail(t testing.TB, err error) {
	t.Helper()
	if errors.Is(err, ErrBinaryMissing) && os.Getenv("CI") == "" {
		t.Skipf("skipping: %v (install it, e.g. `apt-get install -y etcd-server etcd-client`; with CI set this is a failure)", err)
	}
	t.Fatalf("%v", err)
}

// Target is the server kind selected by KVMESH_E2E_TARGET (default kvmesh).
func Target() (Kind, error) {
	switch v := strings.TrimSpace(os.Getenv("KVMESH_E2E_TARGET")); v {
	case "", string(KindKvmesh):
		return KindKvmesh, nil
	case string(KindEtcd):
		return KindEtcd, nil
	default:
		return "", fmt.Errorf("KVMESH_E2E_TARGET=%q: want %q or %q", v, KindKvmesh, KindEtcd)
	}
}

// MustTarget is Target that fails the test on a bad value.
func MustTarget(t testing.TB) Kind {
	t.Helper()
	k, err := Target()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// WaitCtx is a convenience: a context with the given timeout bound to t.
func WaitCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
