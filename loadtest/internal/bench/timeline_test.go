package bench

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
)

func TestTimelineInterval(t *testing.T) {
	ms, s := time.Millisecond, time.Second
	for _, tc := range []struct{ run, want time.Duration }{
		{0, ms},
		{3 * ms, ms},
		{19 * ms, ms},
		{20 * ms, 2 * ms},
		{49 * ms, 2 * ms},
		{50 * ms, 5 * ms},
		{300 * ms, 20 * ms},
		{2500 * ms, 200 * ms},
		{5 * s, 500 * ms},
		{9999 * ms, 500 * ms},
		{10 * s, s},
		{1000 * s, s},
		{1001 * s, 2 * s},
		{2000 * s, 2 * s},
		{2001 * s, 5 * s},
		{3 * time.Hour, 20 * s},
	} {
		if got := TimelineInterval(tc.run); got != tc.want {
			t.Errorf("TimelineInterval(%v) = %v, want %v", tc.run, got, tc.want)
		}
	}
	// Runs of 10 ms or more get at least 10 points, at most 25 below 10 s and at
	// most 1000 beyond.
	for run := 10 * ms; run < 5*time.Hour; run = run*11/10 + 7*ms {
		iv := TimelineInterval(run)
		n := float64(run) / float64(iv)
		if n < 10 || (run < 10*s && n > 25) || n > 1000 {
			t.Errorf("run %v: interval %v gives %.1f points", run, iv, n)
		}
	}
}

func TestNewTimeline(t *testing.T) {
	ms := time.Millisecond
	// A 50 ms run: 10 intervals of 5 ms.
	// Successes at 1, 2, 3 ms (latencies 1, 2, 3 ms), one at 12 ms, one at exactly
	// the run's end; failures at 0 and 104 ms.
	lats := []time.Duration{3 * ms, 1 * ms, 2 * ms, 7 * ms, 4 * ms}
	ends := []time.Duration{3 * ms, 1 * ms, 2 * ms, 12 * ms, 50 * ms}
	iv, pts := newTimeline(lats, ends, []time.Duration{0, 49 * ms}, 50*ms)
	if iv != 5*ms || len(pts) != 10 {
		t.Fatalf("interval %v, %d points; want 5ms, 10", iv, len(pts))
	}
	p := pts[0]
	if p.T != 0 || p.Seconds != 0.005 || p.Succeeded != 3 || p.Failed != 1 || p.RequestsPerSec != 600 {
		t.Errorf("point 0 = %+v", p)
	}
	if l := p.Latency; l == nil || l.Average != 0.002 || l.P50 != 0.002 || l.P99 != 0.003 || l.Slowest != 0.003 {
		t.Errorf("point 0 latency = %+v", p.Latency)
	}
	if pts[1].Succeeded != 0 || pts[1].Latency != nil {
		t.Errorf("point 1 = %+v, want empty", pts[1])
	}
	if pts[2].Succeeded != 1 || pts[2].Latency.P99 != 0.007 {
		t.Errorf("point 2 = %+v", pts[2])
	}
	last := pts[9]
	if last.Succeeded != 1 || last.Failed != 1 || last.Latency.Average != 0.004 {
		t.Errorf("last point = %+v", last)
	}

	// A 52 ms run: the 2 ms remainder goes to the last interval, 7 ms long.
	_, pts = newTimeline(lats, ends, nil, 52*ms)
	if len(pts) != 10 || math.Abs(pts[9].Seconds-0.007) > 1e-12 || pts[9].T != 0.045 || pts[9].Succeeded != 1 {
		t.Errorf("%d points, last %+v; want 10, the last 7 ms from 45 ms", len(pts), pts[len(pts)-1])
	}
	// A 53 ms run: the 3 ms remainder is an interval of its own.
	_, pts = newTimeline(lats, ends, nil, 53*ms)
	if len(pts) != 11 || math.Abs(pts[10].Seconds-0.003) > 1e-12 || pts[10].Succeeded != 1 || pts[9].Succeeded != 0 {
		t.Errorf("%d points, last %+v; want 11, the last 3 ms", len(pts), pts[len(pts)-1])
	}
	// A run shorter than an interval has one point.
	_, pts = newTimeline([]time.Duration{ms}, []time.Duration{ms / 2}, nil, 700*time.Microsecond)
	if len(pts) != 1 || pts[0].Succeeded != 1 || pts[0].Seconds != 0.0007 {
		t.Errorf("points = %+v", pts)
	}
	_, pts = newTimeline([]time.Duration{ms}, []time.Duration{ms}, nil, 1200*time.Microsecond)
	if len(pts) != 1 || pts[0].Succeeded != 1 || pts[0].Seconds != 0.0012 {
		t.Errorf("points = %+v", pts)
	}
}

// checkTimeline checks that a report's timeline covers the run without gaps and
// that its counts add up to the report's.
func checkTimeline(t *testing.T, r *Report) {
	t.Helper()
	if len(r.Timeline) == 0 {
		t.Fatal("no timeline")
	}
	var ok, failed int64
	at := 0.0
	for i, p := range r.Timeline {
		if math.Abs(p.T-at) > 1e-9 || p.Seconds <= 0 {
			t.Errorf("point %d = %+v: starts at %v, want %v", i, p, p.T, at)
		}
		at = p.T + p.Seconds
		ok += p.Succeeded
		failed += p.Failed
		if want := float64(p.Succeeded) / p.Seconds; math.Abs(p.RequestsPerSec-want) > 1e-9*want {
			t.Errorf("point %d: %v req/s, want %v", i, p.RequestsPerSec, want)
		}
		if (p.Latency != nil) != (p.Succeeded > 0) {
			t.Errorf("point %d: %d succeeded, latency %+v", i, p.Succeeded, p.Latency)
		}
		if l := p.Latency; l != nil && !(r.Latency.Fastest <= l.P50 && l.P50 <= l.P99 && l.P99 <= l.Slowest &&
			l.Slowest <= r.Latency.Slowest && l.Average <= l.Slowest) {
			t.Errorf("point %d: latency %+v outside the run's %+v", i, l, r.Latency)
		}
	}
	if math.Abs(at-r.TotalSeconds) > 1e-9 {
		t.Errorf("timeline ends at %v, the run at %v", at, r.TotalSeconds)
	}
	if ok != r.Succeeded || failed != r.Failed {
		t.Errorf("timeline counts %d succeeded, %d failed; the report %d, %d", ok, failed, r.Succeeded, r.Failed)
	}
	if iv := TimelineInterval(time.Duration(r.TotalSeconds * 1e9)).Seconds(); r.TimelineInterval != iv {
		t.Errorf("interval %v, want %v", r.TimelineInterval, iv)
	}
}

func TestTimelineOfRuns(t *testing.T) {
	t.Run("put", func(t *testing.T) {
		m := &memKV{delay: time.Millisecond}
		addr, _ := startServer(t, m)
		rep, err := Put(context.Background(), testConfig(addr), PutOptions{KeySize: 8, ValSize: 8, KeySpaceSize: 10})
		if err != nil {
			t.Fatal(err)
		}
		if rep.Succeeded != 200 {
			t.Fatalf("succeeded %d", rep.Succeeded)
		}
		checkTimeline(t, rep)
	})
	t.Run("duration with failures", func(t *testing.T) {
		m := &memKV{delay: time.Millisecond, fail: func(n int64) error {
			if n%3 == 0 {
				return connect.NewError(connect.CodeUnavailable, errors.New("no"))
			}
			return nil
		}}
		addr, _ := startServer(t, m)
		cfg := testConfig(addr)
		cfg.Total = 0
		cfg.Duration = 400 * time.Millisecond
		rep, err := Range(context.Background(), cfg, RangeOptions{Key: "a"})
		if err != nil {
			t.Fatal(err)
		}
		if rep.Failed == 0 || rep.Succeeded == 0 {
			t.Fatalf("succeeded %d failed %d", rep.Succeeded, rep.Failed)
		}
		checkTimeline(t, rep)
		// 400 ms and a little: 20 ms intervals, about 20 of them, each busy.
		if rep.TimelineInterval != 0.02 || len(rep.Timeline) < 19 || len(rep.Timeline) > 21 {
			t.Errorf("interval %v, %d points", rep.TimelineInterval, len(rep.Timeline))
		}
		// A steady run: requests complete throughout (the first interval may be
		// spent on the connections' first requests on a slow machine).
		busy := 0
		for _, p := range rep.Timeline {
			if p.Succeeded > 0 {
				busy++
			}
		}
		if busy < len(rep.Timeline)/2 {
			t.Errorf("only %d of %d intervals saw requests complete: %+v", busy, len(rep.Timeline), rep.Timeline)
		}
		var js strings.Builder
		if err := rep.WriteJSON(&js); err != nil {
			t.Fatal(err)
		}
		var back struct {
			Interval float64 `json:"timeline_interval_seconds"`
			Timeline []struct {
				T       *float64 `json:"t_seconds"`
				RPS     *float64 `json:"requests_per_sec"`
				Latency *struct {
					Average, P50, P99 *float64
				} `json:"latency_seconds"`
			} `json:"timeline"`
		}
		if err := json.Unmarshal([]byte(js.String()), &back); err != nil {
			t.Fatal(err)
		}
		if back.Interval != 0.02 || len(back.Timeline) != len(rep.Timeline) {
			t.Fatalf("JSON timeline: %s", js.String())
		}
		i := slices.IndexFunc(rep.Timeline, func(p TimelinePoint) bool { return p.Latency != nil })
		if i < 0 {
			t.Fatal("no interval with a latency")
		}
		p := back.Timeline[i]
		if p.T == nil || p.RPS == nil || p.Latency == nil || p.Latency.Average == nil || p.Latency.P50 == nil || p.Latency.P99 == nil {
			t.Errorf("JSON timeline point lacks fields: %s", js.String())
		}
	})
	t.Run("lease-keepalive and mixed", func(t *testing.T) {
		m := &memKV{lease: &memLease{leases: map[int64]int64{}}}
		addr, _ := startServer(t, m)
		rep, err := LeaseKeepAlive(context.Background(), testConfig(addr), LeaseOptions{TTL: 10, LeasesPerClient: 2})
		if err != nil {
			t.Fatal(err)
		}
		if rep.Succeeded != 200 {
			t.Fatalf("lease-keepalive: succeeded %d, errors %v", rep.Succeeded, rep.Errors)
		}
		checkTimeline(t, rep)
		// memKV has no Txn nor DeleteRange: those fail, and count in the timeline.
		rep, err = Mixed(context.Background(), testConfig(addr), MixedOptions{KeySize: 8, ValSize: 8, KeySpaceSize: 10, Get: 1, Put: 1, CAS: 1, Delete: 1})
		if err != nil {
			t.Fatal(err)
		}
		if rep.Succeeded == 0 || rep.Failed == 0 || rep.Requests != 200 {
			t.Fatalf("mixed: succeeded %d failed %d", rep.Succeeded, rep.Failed)
		}
		checkTimeline(t, rep)
	})
}
