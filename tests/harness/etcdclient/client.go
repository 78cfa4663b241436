// Package etcdclient gives the black-box suites etcd's own clients (clientv3 and
// etcdctl) for servers started by package harness. It is separate from harness so that
// suites using kvmesh's generated clients never link etcd's protobuf types.
package etcdclient

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/kvmesh/kvmesh/tests/harness"
)

// ClientConfig returns the clientv3 configuration the suites use for
// endpoint. Send/receive limits are raised far above the servers' own limits
// so that request-size errors come from the server, not from the client.
func ClientConfig(endpoints ...string) clientv3.Config {
	return clientv3.Config{
		Endpoints:          endpoints,
		DialTimeout:        5 * time.Second,
		MaxCallSendMsgSize: 64 << 20,
		MaxCallRecvMsgSize: 64 << 20,
		Logger:             zap.NewNop(),
	}
}

// NewClient connects a clientv3 client to the server; it is closed when the
// test ends.
func NewClient(t testing.TB, s *harness.Server) *clientv3.Client {
	t.Helper()
	return NewClientFor(t, s.Endpoint())
}

// NewClientFor connects a clientv3 client to the endpoints; it is closed when
// the test ends.
func NewClientFor(t testing.TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(ClientConfig(endpoints...))
	if err != nil {
		t.Fatalf("clientv3.New(%v): %v", endpoints, err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// EtcdctlResult is the outcome of one etcdctl run.
type EtcdctlResult struct {
	Args   []string
	Stdout string
	Stderr string
	Err    error // non-nil when etcdctl exited non-zero or could not run
}

func (r EtcdctlResult) String() string {
	return fmt.Sprintf("etcdctl %s\nerr: %v\nstdout: %s\nstderr: %s",
		strings.Join(r.Args, " "), r.Err, r.Stdout, r.Stderr)
}

// Etcdctl runs etcdctl (API v3) against endpoint with the given arguments
// and standard input. A missing etcdctl binary skips or fails the test like
// a missing etcd does.
func Etcdctl(t testing.TB, endpoint string, stdin string, args ...string) EtcdctlResult {
	t.Helper()
	bin, err := harness.EtcdctlBinary()
	if err != nil {
		harness.SkipOrFail(t, err)
	}
	full := append([]string{"--endpoints=" + endpoint, "--dial-timeout=5s", "--command-timeout=15s"}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, full...)
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "ETCDCTL_API=3")
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	return EtcdctlResult{Args: full, Stdout: stdout.String(), Stderr: stderr.String(), Err: err}
}
