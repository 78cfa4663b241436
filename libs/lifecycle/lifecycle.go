// Package lifecycle is how every kvmesh process runs: Main sets up what each binary
// shares (the GC target, SIGINT/SIGTERM, telemetry, the exit status), and Run runs the
// process's roles (replica, gateway, fanout: each New, which starts nothing, then
// Run(ctx)) in the order given, each once the one before it is ready, and stops them in
// the reverse order.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/kvmesh/kvmesh/libs/config"
	"github.com/kvmesh/kvmesh/libs/telemetry"
)

// StopTimeout bounds a role's graceful stop.
const StopTimeout = 10 * time.Second

// Role is one server of a process. Run serves until ctx ends (or it fails), then
// stops, within StopTimeout, and returns.
type Role interface {
	Run(ctx context.Context) error
}

// Readier is a Role that others depend on: Ready is closed once it serves.
type Readier interface {
	Ready() <-chan struct{}
}

// Run runs roles until ctx ends or one of them ends (fails, or stops by itself),
// starting each once the one before it is ready (when it is a Readier), then stops
// them in the reverse order and returns their errors joined.
func Run(ctx context.Context, log *slog.Logger, roles ...Role) error {
	type running struct {
		cancel context.CancelFunc
		done   chan error
	}
	var started []running
	ended := make(chan struct{}, len(roles))
	stopping := false
	for _, role := range roles {
		rctx, cancel := context.WithCancel(context.Background())
		r := running{cancel: cancel, done: make(chan error, 1)}
		started = append(started, r)
		go func() {
			r.done <- role.Run(rctx)
			ended <- struct{}{}
		}()
		if rd, ok := role.(Readier); ok {
			select {
			case <-rd.Ready():
			case <-ended:
				stopping = true
			case <-ctx.Done():
				stopping = true
			}
		}
		if stopping {
			break
		}
	}
	if !stopping {
		select {
		case <-ctx.Done():
			log.Info("shutting down")
		case <-ended:
		}
	}
	var errs []error
	for i := len(started) - 1; i >= 0; i-- {
		started[i].cancel()
		if err := <-started[i].done; err != nil {
			log.Error("server failed", "err", err)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Serving is the end of a role's Run: it waits until ctx ends or serving fails (errc;
// nil: nothing to wait for but ctx), then stops the role with stop, given StopTimeout,
// and returns both errors.
func Serving(ctx context.Context, errc <-chan error, stop func(context.Context) error) error {
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), StopTimeout)
	defer cancel()
	return errors.Join(err, stop(sctx))
}

// Main runs a kvmesh binary: the GC target, a context canceled by SIGINT or SIGTERM,
// the telemetry configured by KVMESH_… (service name name), then run; an error is
// printed as "name: error" and exits with status 1.
func Main(name string, run func(ctx context.Context, tel *telemetry.Telemetry) error) {
	Exit(name, mainErr(name, run))
}

// Exit ends a binary's failure: err, if any, printed as "name: error", and status 1.
func Exit(name string, err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		os.Exit(1)
	}
}

func mainErr(name string, run func(ctx context.Context, tel *telemetry.Telemetry) error) error {
	tuneGC()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var tcfg telemetry.Config
	if err := config.Load(ctx, "KVMESH_", &tcfg); err != nil {
		return err
	}
	tel, err := telemetry.New(ctx, name, tcfg, os.Stderr)
	if err != nil {
		return err
	}
	defer tel.Shutdown(context.Background())
	return run(ctx, tel)
}

// tuneGC sets every kvmesh binary's GC target, GOGC 400, unless GOGC is set: serving
// a request allocates briefly and keeps little, so collecting a quarter as often saves
// much of the CPU per request (BENCHMARKS.md). The live Go heap stays small (Pebble
// keeps its block cache outside it), so the cost in memory is bounded.
func tuneGC() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(400)
	}
}
