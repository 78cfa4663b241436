package charts

import (
	"bytes"
	"image/png"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/kvmesh/kvmesh/loadtest/internal/bench"
)

func TestWorkloadLabels(t *testing.T) {
	names := []string{
		"put, 1 conn / 1 client",
		"put, 100 conns / 1000 clients",
		"range serializable, 100 / 1000",
		"lease-keepalive, 100 / 1000, one stream per client",
		"lease-keepalive once (etcd's benchmark), 100 / 1000",
		"mixed: get 50%, put 25%, CAS 15%, delete 10%, 8 conns / 8 clients",
		"watch",
		"same, 1 / 1, a",
		"same, 1 / 1, b",
	}
	want := []string{
		"put\n1 / 1",
		"put\n100 / 1000",
		"range\nserializable\n100 / 1000",
		"lease-keepalive\n100 / 1000",
		"lease-keepalive\nonce\n100 / 1000",
		"mixed\n8 / 8",
		"watch",
		"same, 1 / 1, a",
		"same, 1 / 1, b",
	}
	if got := workloadLabels(names); !slices.Equal(got, want) {
		t.Errorf("labels:\n got %q\nwant %q", got, want)
	}
}

func TestMedianAndFormats(t *testing.T) {
	for _, tc := range []struct {
		vs   []float64
		want float64
	}{{[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(tc.vs); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.vs, got, tc.want)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is a number")
	}
	for v, want := range map[float64]string{950: "950", 1234: "1.23k", 12345: "12.3k", 1.5e6: "1.50M"} {
		if got := formatCount(v); got != want {
			t.Errorf("formatCount(%v) = %q, want %q", v, got, want)
		}
	}
	for v, want := range map[float64]string{0.123: "0.12", 12.34: "12.3", 123.4: "123"} {
		if got := formatSig(v); got != want {
			t.Errorf("formatSig(%v) = %q, want %q", v, got, want)
		}
	}
	for s, want := range map[string]string{"250.0k": "250k", "2.50k": "2.5k", "40.0": "40", "0.50": "0.5", "950": "950", "1.25M": "1.25M"} {
		if got := trimZeros(s); got != want {
			t.Errorf("trimZeros(%q) = %q, want %q", s, got, want)
		}
	}
}

func TestPlotFormat(t *testing.T) {
	for path, want := range map[string]string{"a.svg": "svg", "dir.x/A.PNG": "png", "a.png.svg": "svg"} {
		if got, err := PlotFormat(path); got != want || err != nil {
			t.Errorf("PlotFormat(%q) = %q, %v; want %q", path, got, err, want)
		}
	}
	for _, path := range []string{"a.pdf", "a", "a.svg.gz", "a.jpeg"} {
		if _, err := PlotFormat(path); err == nil {
			t.Errorf("PlotFormat(%q) accepted", path)
		}
	}
}

// A timeline with an empty interval in the middle and one at the end still draws,
// the same way twice.
func TestRenderTimeline(t *testing.T) {
	l := &bench.IntervalLatency{Average: 0.002, P50: 0.0015, P99: 0.009, Slowest: 0.01}
	rep := &bench.Report{Target: "t", Op: "put", Conns: 2, Clients: 8, Requests: 30, Succeeded: 20, Failed: 10,
		TotalSeconds: 0.4, TimelineInterval: 0.1, Params: map[string]any{"b": 1, "a": "x"},
		Timeline: []bench.TimelinePoint{
			{T: 0, Seconds: 0.1, Succeeded: 10, RequestsPerSec: 100, Latency: l},
			{T: 0.1, Seconds: 0.1, Failed: 10},
			{T: 0.2, Seconds: 0.1, Succeeded: 10, RequestsPerSec: 100, Latency: l},
			{T: 0.3, Seconds: 0.1},
		}}
	var a, b bytes.Buffer
	if err := RenderTimeline(&a, "svg", rep); err != nil {
		t.Fatal(err)
	}
	if err := RenderTimeline(&b, "svg", rep); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("the same timeline drew two different SVGs")
	}
	for _, want := range []string{"t: put, 2 conns / 8 clients", "a=x b=1", "30 requests (10 failed)", "intervals of 100ms"} {
		if !strings.Contains(a.String(), want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	var p bytes.Buffer
	if err := RenderTimeline(&p, "png", &bench.Report{Op: "range"}); err != nil {
		t.Fatal(err)
	}
	if _, err := png.Decode(&p); err != nil {
		t.Errorf("an empty run's PNG: %v", err)
	}
}
