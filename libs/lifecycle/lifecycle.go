// Package lifecycle runs a kvmesh process's servers until SIGINT or SIGTERM (or until
// one fails), then stops them within a deadline: the one shutdown sequence every
// binary shares.
package lifecycle

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"
)

// StopTimeout bounds a graceful stop.
const StopTimeout = 10 * time.Second

// TuneGC sets every kvmesh binary's GC target, GOGC 400, unless GOGC is set: serving
// a request allocates briefly and keeps little, so collecting a quarter as often saves
// much of the CPU per request (BENCHMARKS.md). The live Go heap stays small (Pebble
// keeps its block cache outside it), so the cost in memory is bounded.
func TuneGC() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(400)
	}
}

// SignalContext is canceled by SIGINT or SIGTERM.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}

// Serve runs every serve function until ctx ends or one of them fails, then calls
// stop with a StopTimeout deadline. It returns the failure, if any, joined with
// stop's error.
func Serve(ctx context.Context, log *slog.Logger, stop func(context.Context) error, serve ...func() error) error {
	errc := make(chan error, len(serve))
	for _, s := range serve {
		go func() { errc <- s() }()
	}
	var err error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err = <-errc:
		log.Error("server failed", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), StopTimeout)
	defer cancel()
	return errors.Join(err, stop(sctx))
}
