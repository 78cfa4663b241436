package bench

import (
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"
)

// progress draws a one-line progress bar, redrawn in place with '\r'. It is
// only meant for a terminal; the caller decides whether to enable it.
type progress struct {
	w        io.Writer
	total    int64         // 0 if unbounded
	duration time.Duration // 0 if unbounded
	start    time.Time
	done     *atomic.Int64
	stop     chan struct{}
	stopped  chan struct{}
}

func startProgress(w io.Writer, total int64, duration time.Duration, done *atomic.Int64) *progress {
	p := &progress{
		w: w, total: total, duration: duration, start: time.Now(), done: done,
		stop: make(chan struct{}), stopped: make(chan struct{}),
	}
	go p.loop()
	return p
}

func (p *progress) loop() {
	defer close(p.stopped)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			p.draw()
		case <-p.stop:
			p.draw()
			fmt.Fprintln(p.w)
			return
		}
	}
}

func (p *progress) finish() {
	close(p.stop)
	<-p.stopped
}

const barWidth = 40

func (p *progress) draw() {
	n := p.done.Load()
	elapsed := time.Since(p.start)
	frac := -1.0
	if p.total > 0 {
		frac = float64(n) / float64(p.total)
	}
	if p.duration > 0 {
		// With both limits, whichever is closer to completion wins.
		frac = max(frac, elapsed.Seconds()/p.duration.Seconds())
	}
	var count string
	if p.total > 0 {
		count = fmt.Sprintf("%d / %d", n, p.total)
	} else {
		count = fmt.Sprintf("%d", n)
	}
	rate := 0.0
	if s := elapsed.Seconds(); s > 0 {
		rate = float64(n) / s
	}
	var bar string
	if frac >= 0 {
		frac = min(frac, 1)
		filled := int(frac * barWidth)
		bar = "[" + strings.Repeat("=", filled) + strings.Repeat(" ", barWidth-filled) + "]" +
			fmt.Sprintf(" %6.2f%%", frac*100)
	}
	fmt.Fprintf(p.w, "\r%s %s %s %.0f req/s   ", count, bar, elapsed.Truncate(time.Second), rate)
}
