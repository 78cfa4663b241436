package bench

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Percentiles reported, in the order printed (same set as etcd's benchmark
// plus p99.9).
var percentiles = []float64{10, 25, 50, 75, 90, 95, 99, 99.9}

// Latency holds latency statistics in seconds, over successful requests only
// (as etcd's benchmark does).
type Latency struct {
	Fastest float64 `json:"fastest"`
	Slowest float64 `json:"slowest"`
	Average float64 `json:"average"`
	Stddev  float64 `json:"stddev"`
	P10     float64 `json:"p10"`
	P25     float64 `json:"p25"`
	P50     float64 `json:"p50"`
	P75     float64 `json:"p75"`
	P90     float64 `json:"p90"`
	P95     float64 `json:"p95"`
	P99     float64 `json:"p99"`
	P999    float64 `json:"p99_9"`
}

func (l *Latency) pctl(i int) *float64 {
	return [...]*float64{&l.P10, &l.P25, &l.P50, &l.P75, &l.P90, &l.P95, &l.P99, &l.P999}[i]
}

// Bucket is one histogram bucket: Count requests took <= UpperBound seconds
// (and more than the previous bucket's bound).
type Bucket struct {
	UpperBound float64 `json:"le"`
	Count      int64   `json:"count"`
}

// ErrorCount counts failed requests that returned the same gRPC code and
// message.
type ErrorCount struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Count   int64  `json:"count"`
}

// Report is the outcome of one benchmark run.
type Report struct {
	Target    string         `json:"target,omitempty"`
	Op        string         `json:"op"`
	Params    map[string]any `json:"params,omitempty"`
	Endpoints []string       `json:"endpoints"`
	Conns     int            `json:"conns"`
	Clients   int            `json:"clients"`

	Requests  int64 `json:"requests"` // attempted = succeeded + failed
	Succeeded int64 `json:"succeeded"`
	Failed    int64 `json:"failed"`
	// Interrupted is set when the run was stopped (e.g. Ctrl-C) before
	// reaching its total/duration.
	Interrupted bool `json:"interrupted,omitempty"`

	TotalSeconds   float64      `json:"total_seconds"`
	RequestsPerSec float64      `json:"requests_per_sec"` // successful requests / total time
	Latency        Latency      `json:"latency_seconds"`
	Histogram      []Bucket     `json:"histogram"`
	Errors         []ErrorCount `json:"errors"`

	// TimelineInterval is the length of the timeline's intervals, seconds (see
	// TimelineInterval); Timeline has one point per interval, in order.
	TimelineInterval float64         `json:"timeline_interval_seconds"`
	Timeline         []TimelinePoint `json:"timeline"`

	// Sorted latencies of successful requests.
	lats []time.Duration
}

type errKey struct{ code, msg string }

// newReport computes statistics. lats is sorted in place.
func newReport(lats []time.Duration, errs map[errKey]int64, total time.Duration) *Report {
	slices.Sort(lats)
	r := &Report{
		Succeeded:    int64(len(lats)),
		TotalSeconds: total.Seconds(),
		Histogram:    []Bucket{},
		Errors:       []ErrorCount{},
		Timeline:     []TimelinePoint{},
		lats:         lats,
	}
	for k, n := range errs {
		r.Failed += n
		r.Errors = append(r.Errors, ErrorCount{Code: k.code, Message: k.msg, Count: n})
	}
	slices.SortFunc(r.Errors, func(a, b ErrorCount) int {
		if a.Count != b.Count {
			return cmp.Compare(b.Count, a.Count)
		}
		if a.Code != b.Code {
			return strings.Compare(a.Code, b.Code)
		}
		return strings.Compare(a.Message, b.Message)
	})
	r.Requests = r.Succeeded + r.Failed
	if total > 0 {
		r.RequestsPerSec = float64(r.Succeeded) / total.Seconds()
	}
	if len(lats) == 0 {
		return r
	}

	var sum float64
	for _, d := range lats {
		sum += d.Seconds()
	}
	mean := sum / float64(len(lats))
	var sq float64
	for _, d := range lats {
		x := d.Seconds() - mean
		sq += x * x
	}
	r.Latency.Fastest = lats[0].Seconds()
	r.Latency.Slowest = lats[len(lats)-1].Seconds()
	r.Latency.Average = mean
	r.Latency.Stddev = math.Sqrt(sq / float64(len(lats)))
	for i, p := range percentiles {
		*r.Latency.pctl(i) = percentile(lats, p).Seconds()
	}
	r.Histogram = histogram(lats, 10)
	return r
}

// percentile returns the nearest-rank percentile p (0 < p <= 100) of sorted.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// histogram splits [fastest, slowest] into n equal-width buckets plus one
// bucket at exactly the fastest value, like etcd's benchmark report.
func histogram(sorted []time.Duration, n int) []Bucket {
	fastest, slowest := sorted[0].Seconds(), sorted[len(sorted)-1].Seconds()
	width := (slowest - fastest) / float64(n)
	b := make([]Bucket, n+1)
	for i := 0; i < n; i++ {
		b[i].UpperBound = fastest + width*float64(i)
	}
	b[n].UpperBound = slowest
	bi := 0
	for _, d := range sorted {
		s := d.Seconds()
		for bi < n && s > b[bi].UpperBound {
			bi++
		}
		b[bi].Count++
	}
	return b
}

// Latencies returns the sorted latencies of successful requests.
func (r *Report) Latencies() []time.Duration { return r.lats }

// WriteJSON writes the report as a single-line JSON object.
func (r *Report) WriteJSON(w io.Writer) error {
	return json.NewEncoder(w).Encode(r)
}

// WriteText writes a human-readable report modelled on etcd's benchmark
// tool. precise selects full floating point precision.
func (r *Report) WriteText(w io.Writer, precise bool) error {
	f := "%4.4f"
	if precise {
		f = "%g"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Target: %s  op: %s  endpoints: %s  conns: %d  clients: %d\n",
		orDash(r.Target), r.Op, strings.Join(r.Endpoints, ","), r.Conns, r.Clients)
	if len(r.Params) > 0 {
		keys := make([]string, 0, len(r.Params))
		for k := range r.Params {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			if v, ok := r.Params[k].(string); ok {
				parts[i] = fmt.Sprintf("%s=%q", k, v)
			} else {
				parts[i] = fmt.Sprintf("%s=%v", k, r.Params[k])
			}
		}
		fmt.Fprintf(&b, "Params: %s\n", strings.Join(parts, " "))
	}
	if r.Interrupted {
		b.WriteString("Run was interrupted before completion.\n")
	}
	b.WriteString("\nSummary:\n")
	fmt.Fprintf(&b, "  Total:\t"+f+" secs.\n", r.TotalSeconds)
	if r.Succeeded > 0 {
		fmt.Fprintf(&b, "  Slowest:\t"+f+" secs.\n", r.Latency.Slowest)
		fmt.Fprintf(&b, "  Fastest:\t"+f+" secs.\n", r.Latency.Fastest)
		fmt.Fprintf(&b, "  Average:\t"+f+" secs.\n", r.Latency.Average)
		fmt.Fprintf(&b, "  Stddev:\t"+f+" secs.\n", r.Latency.Stddev)
	}
	fmt.Fprintf(&b, "  Requests/sec:\t"+f+"\n", r.RequestsPerSec)
	fmt.Fprintf(&b, "  Requests:\t%d (succeeded %d, failed %d)\n", r.Requests, r.Succeeded, r.Failed)

	if r.Succeeded > 0 {
		b.WriteString("\nResponse time histogram:\n")
		var most int64
		for _, bk := range r.Histogram {
			most = max(most, bk.Count)
		}
		for _, bk := range r.Histogram {
			bar := 0
			if most > 0 {
				bar = int(bk.Count * 40 / most)
			}
			fmt.Fprintf(&b, "  "+f+" [%d]\t|%s\n", bk.UpperBound, bk.Count, strings.Repeat("∎", bar))
		}
		b.WriteString("\nLatency distribution:\n")
		for i, p := range percentiles {
			fmt.Fprintf(&b, "  %v%% in "+f+" secs.\n", p, *r.Latency.pctl(i))
		}
	} else {
		b.WriteString("\nNo successful requests.\n")
	}

	if len(r.Errors) > 0 {
		b.WriteString("\nError distribution:\n")
		for _, e := range r.Errors {
			fmt.Fprintf(&b, "  [%d]\t%s: %s\n", e.Count, e.Code, e.Message)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
