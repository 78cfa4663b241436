package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// TopologyMesh, in KVMESH_E2E_TOPOLOGY, runs "kvmesh" servers as a mesh of processes
// (tests/harness/cmd/kvmesh-mesh: three replicas, NATS, the fanout, a gateway) behind
// the all-in-one's interface; unset (or "all-in-one"), they are the all-in-one.
const TopologyMesh = "mesh"

// Topology is KVMESH_E2E_TOPOLOGY.
func Topology() string { return strings.TrimSpace(os.Getenv("KVMESH_E2E_TOPOLOGY")) }

// meshPackages are the binaries of the mesh topology.
var meshPackages = []string{
	"github.com/kvmesh/kvmesh/tests/harness/cmd/kvmesh-mesh",
	"github.com/kvmesh/kvmesh/services/replica/cmd/kvmesh-replica",
	"github.com/kvmesh/kvmesh/services/gateway/cmd/kvmesh-gateway",
	"github.com/kvmesh/kvmesh/services/fanout/cmd/kvmesh-fanout",
	"github.com/nats-io/nats-server/v2",
}

// KvmeshPackage is the Go package of kvmesh's all-in-one binary.
const KvmeshPackage = "github.com/kvmesh/kvmesh/services/kvmesh"

var (
	buildOnce sync.Once
	buildBin  string
	buildDir  string
	buildErr  error
)

// KvmeshBinary returns the path of the kvmesh binary: $KVMESH_BIN if set,
// otherwise a binary built once per test process with
// `go build -o <tmp>/kvmesh github.com/kvmesh/kvmesh/services/kvmesh`, run from
// the repository root with the repository's go.work (workspace mode even when
// the tests themselves run with GOWORK=off).
func KvmeshBinary() (string, error) {
	buildOnce.Do(func() {
		if p := os.Getenv("KVMESH_BIN"); p != "" {
			if _, err := os.Stat(p); err != nil {
				buildErr = fmt.Errorf("KVMESH_BIN=%s: %w", p, err)
				return
			}
			buildBin = p
			return
		}
		root, err := RepoRoot()
		if err != nil {
			buildErr = err
			return
		}
		dir, err := os.MkdirTemp("", "kvmesh-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildDir = dir
		// The mesh topology: the launcher and the binaries it runs, side by side.
		pkgs, out := []string{KvmeshPackage}, filepath.Join(dir, "kvmesh")
		if Topology() == TopologyMesh {
			pkgs, out = meshPackages, filepath.Join(dir, "kvmesh-mesh")
		}
		cmd := exec.Command("go", append([]string{"build", "-o", dir + "/"}, pkgs...)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "GOWORK="+filepath.Join(root, "go.work"))
		if output, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("building kvmesh: `go build -o %s/ %s` in %s: %v\n%s",
				dir, strings.Join(pkgs, " "), root, err, output)
			return
		}
		buildBin = out
	})
	return buildBin, buildErr
}

// Cleanup removes the kvmesh binary built by KvmeshBinary. Call it from
// TestMain after m.Run.
func Cleanup() {
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
}

// RepoRoot finds the repository root: the nearest ancestor of the working
// directory that holds go.work.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.work")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("cannot find the repository root: no go.work in any parent of the working directory")
		}
		dir = parent
	}
}

func findBinary(envVar, def, name string) (string, error) {
	if p := os.Getenv(envVar); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w: %v", envVar, p, ErrBinaryMissing, err)
		}
		return p, nil
	}
	if _, err := os.Stat(def); err == nil {
		return def, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s: %w (looked at %s and $PATH; set %s to override)", name, ErrBinaryMissing, def, envVar)
}

// EtcdBinary is the path of the real etcd server binary.
func EtcdBinary() (string, error) {
	return findBinary("KVMESH_E2E_ETCD_BIN", "/usr/bin/etcd", "etcd")
}

// EtcdctlBinary is the path of etcdctl.
func EtcdctlBinary() (string, error) {
	return findBinary("KVMESH_E2E_ETCDCTL_BIN", "/usr/bin/etcdctl", "etcdctl")
}

// EtcdVersion returns the output of `etcd --version` (first line), for logs.
func EtcdVersion() string {
	bin, err := EtcdBinary()
	if err != nil {
		return err.Error()
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return err.Error()
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return line
}

var (
	pkgMu   sync.Mutex
	pkgBins = map[string]string{}
)

// BuildPackage builds the main package pkg of this repository once per test process
// (with the repository's go.work) and returns the binary's path.
func BuildPackage(pkg string) (string, error) {
	pkgMu.Lock()
	defer pkgMu.Unlock()
	if p, ok := pkgBins[pkg]; ok {
		return p, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "kvmesh-e2e-bin-")
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOWORK="+filepath.Join(root, "go.work"))
	if output, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building %s: %v\n%s", pkg, err, output)
	}
	pkgBins[pkg] = out
	return out, nil
}
