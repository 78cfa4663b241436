// Package e2e holds kvmesh's black-box end-to-end tests. They start server
// processes through package harness and talk to them over the network with
// go.etcd.io/etcd/client/v3 or the etcdctl binary.
//
// KVMESH_E2E_TARGET=kvmesh (default) runs the suites against kvmesh;
// KVMESH_E2E_TARGET=etcd runs them against real etcd, which validates that the
// tests encode etcd's real behaviour.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvmesh/kvmesh/tests/harness"
	"github.com/kvmesh/kvmesh/tests/harness/etcdclient"
)

// sharedName is the member name of the package's shared server.
const sharedName = "e2e-shared"

var (
	sharedOnce sync.Once
	sharedSrv  *harness.Server
	sharedErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedSrv != nil {
		if code != 0 {
			fmt.Fprintf(os.Stderr, "---- shared %s server log tail (%s) ----\n%s\n---- end ----\n",
				sharedSrv.Kind(), sharedSrv.LogPath(), sharedSrv.LogTail(60))
		}
		if err := sharedSrv.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "closing the shared server: %v\n", err)
			if code == 0 {
				code = 1
			}
		}
	}
	harness.Cleanup()
	os.Exit(code)
}

// shared returns the server of the selected target that the KV, maintenance
// and etcdctl suites share. Tests using it must not assume anything about
// the existing data: each uses its own key prefix and compares revisions with
// one read at its start. They don't run in parallel (compaction is global).
func shared(t *testing.T) *harness.Server {
	t.Helper()
	kind := harness.MustTarget(t)
	sharedOnce.Do(func() {
		sharedSrv, sharedErr = harness.Launch(kind, harness.Options{Name: sharedName})
	})
	if sharedErr != nil {
		harness.SkipOrFail(t, fmt.Errorf("starting the shared %s server: %w", kind, sharedErr))
	}
	if !sharedSrv.Running() {
		t.Fatalf("the shared %s server is not running any more; log tail:\n%s", kind, sharedSrv.LogTail(60))
	}
	return sharedSrv
}

// sharedClient returns a clientv3 client of the shared server.
func sharedClient(t *testing.T) *clientv3.Client {
	t.Helper()
	return etcdclient.NewClient(t, shared(t))
}

// ctxT returns a context that times out after 15 s and ends with the test.
func ctxT(t *testing.T) context.Context {
	t.Helper()
	return harness.WaitCtx(t, 15*time.Second)
}

// prefixFor gives each test its own key prefix on the shared server.
func prefixFor(t *testing.T) string {
	return fmt.Sprintf("/e2e/%s/%d/", strings.ReplaceAll(t.Name(), "/", "_"), time.Now().UnixNano())
}

// currentRev reads the store's current revision.
func currentRev(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	resp, err := cli.Get(ctxT(t), "/e2e/__revision_probe__")
	if err != nil {
		t.Fatalf("reading the current revision: %v", err)
	}
	return resp.Header.Revision
}

// errDesc describes an error as "<grpc code>: <message>", the way both
// clientv3's typed errors (rpctypes.EtcdError) and raw gRPC status errors
// carry them, so errors can be compared across servers.
func errDesc(err error) string {
	if err == nil {
		return "<nil>"
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return fmt.Sprintf("%s: %s", ee.Code(), ee.Error())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "client deadline exceeded: " + err.Error()
	}
	if st, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", st.Code(), st.Message())
	}
	return "non-grpc error: " + err.Error()
}

// errCode is the gRPC status code of err (clientv3 typed errors included).
func errCode(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code()
	}
	return status.Code(err)
}

// requireEtcdErr asserts err is the etcd error want: same message and gRPC
// code (what clientv3 maps through rpctypes).
func requireEtcdErr(t *testing.T, what string, err error, want error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: got success, want error %q", what, errDesc(want))
	}
	if errDesc(err) != errDesc(want) {
		t.Fatalf("%s: got error %q, want %q", what, errDesc(err), errDesc(want))
	}
	if !errors.Is(err, want) && rpctypes.ErrorDesc(err) != rpctypes.ErrorDesc(want) {
		t.Fatalf("%s: error %v is not %v", what, err, want)
	}
}

// requireOK fails the test on a non-nil error.
func requireOK(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: unexpected error %s", what, errDesc(err))
	}
}
