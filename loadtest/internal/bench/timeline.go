package bench

import (
	"slices"
	"time"
)

// TimelinePoint is one interval of a run's timeline: the requests that completed
// in [T, T+Seconds) after the run started, and the latencies of the successful ones.
type TimelinePoint struct {
	// T is the start of the interval, seconds since the run started.
	T float64 `json:"t_seconds"`
	// Seconds is the interval's length: the timeline interval, except for the last
	// point, which ends with the run (see TimelineInterval).
	Seconds   float64 `json:"seconds"`
	Succeeded int64   `json:"succeeded"`
	Failed    int64   `json:"failed"`
	// RequestsPerSec is Succeeded / Seconds, like the report's requests_per_sec.
	RequestsPerSec float64 `json:"requests_per_sec"`
	// Latency is nil for an interval in which no request succeeded.
	Latency *IntervalLatency `json:"latency_seconds,omitempty"`
}

// IntervalLatency holds the latency statistics (seconds) of the successful
// requests that completed in one interval. Percentiles are nearest-rank, as in
// the report.
type IntervalLatency struct {
	Average float64 `json:"average"`
	P50     float64 `json:"p50"`
	P99     float64 `json:"p99"`
	Slowest float64 `json:"slowest"`
}

// TimelineInterval is the length of the intervals a run of the given length is
// cut into. It is a pure function of the run's length, from the 1-2-5 series:
//
//   - runs of 10 s or more: 1 s, or for runs longer than 1000 s the smallest
//     step of 2 s, 5 s, 10 s, 20 s, … that keeps the timeline at 1000 points at most;
//   - shorter runs: the largest step of 1 ms, 2 ms, 5 ms, 10 ms, … 500 ms that is at
//     most a tenth of the run, so the timeline has between 10 and 25 points
//     (runs shorter than 10 ms get 1 ms intervals and so fewer points).
func TimelineInterval(run time.Duration) time.Duration {
	if run >= 10*time.Second {
		iv := time.Second
		for i := 0; run > 1000*iv; i++ {
			iv = step125(time.Second, i+1)
		}
		return iv
	}
	iv := time.Millisecond
	for i := 1; ; i++ {
		next := step125(time.Millisecond, i)
		if next > run/10 {
			return iv
		}
		iv = next
	}
}

// step125 is the i-th value of the series base×{1, 2, 5, 10, 20, 50, …}.
func step125(base time.Duration, i int) time.Duration {
	d := base
	for range i / 3 {
		d *= 10
	}
	return d * [...]time.Duration{1, 2, 5}[i%3]
}

// newTimeline cuts a run of length elapsed into intervals of TimelineInterval and
// counts the requests completed in each. ends[i] is when the successful request
// with latency lats[i] completed, failEnds when each failed one did, both measured
// from the start of the run. A remainder at the end shorter than half an interval
// is added to the last full interval, so no point's rate rests on a sliver of time.
func newTimeline(lats, ends, failEnds []time.Duration, elapsed time.Duration) (time.Duration, []TimelinePoint) {
	if elapsed <= 0 {
		return 0, []TimelinePoint{}
	}
	iv := TimelineInterval(elapsed)
	n := int(elapsed / iv)
	if rem := elapsed - time.Duration(n)*iv; n == 0 || rem >= iv/2 {
		n++
	}
	bucket := func(end time.Duration) int {
		return min(max(int(end/iv), 0), n-1)
	}

	pts := make([]TimelinePoint, n)
	for i := range pts {
		from := time.Duration(i) * iv
		to := from + iv
		if i == n-1 {
			to = elapsed
		}
		pts[i].T = from.Seconds()
		pts[i].Seconds = (to - from).Seconds()
	}
	for _, e := range failEnds {
		pts[bucket(e)].Failed++
	}

	// Group the latencies by interval (a counting sort), then sort each group.
	start := make([]int, n+1)
	for _, e := range ends {
		start[bucket(e)+1]++
	}
	for i := range n {
		start[i+1] += start[i]
	}
	grouped := make([]time.Duration, len(lats))
	next := slices.Clone(start[:n])
	for i, e := range ends {
		b := bucket(e)
		grouped[next[b]] = lats[i]
		next[b]++
	}
	for i := range pts {
		g := grouped[start[i]:start[i+1]]
		p := &pts[i]
		p.Succeeded = int64(len(g))
		p.RequestsPerSec = float64(p.Succeeded) / p.Seconds
		if len(g) == 0 {
			continue
		}
		slices.Sort(g)
		var sum time.Duration
		for _, d := range g {
			sum += d
		}
		p.Latency = &IntervalLatency{
			Average: sum.Seconds() / float64(len(g)),
			P50:     percentile(g, 50).Seconds(),
			P99:     percentile(g, 99).Seconds(),
			Slowest: g[len(g)-1].Seconds(),
		}
	}
	return iv, pts
}
