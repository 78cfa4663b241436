package replica

import "sync/atomic"

// workers runs the calls of Batch streams on reused goroutines. A call's stack grows
// deep (the stream, MVCC, Pebble), and a fresh goroutine per call grew it again every
// time: stack growth was several per cent of a replica's CPU under reads. Up to max
// goroutines are kept; when all are busy, a call gets a goroutine of its own.
type workers struct {
	jobs chan func()
	stop <-chan struct{}
	n    atomic.Int32
	max  int32
}

func newWorkers(max int32, stop <-chan struct{}) *workers {
	return &workers{jobs: make(chan func()), stop: stop, max: max}
}

// run runs f on an idle worker, a new one, or a goroutine of its own.
func (w *workers) run(f func()) {
	select {
	case w.jobs <- f:
		return
	default:
	}
	if w.n.Add(1) <= w.max {
		go w.loop(f)
		return
	}
	w.n.Add(-1)
	go f()
}

func (w *workers) loop(f func()) {
	defer w.n.Add(-1)
	for {
		f()
		select {
		case f = <-w.jobs:
		case <-w.stop:
			return
		}
	}
}
