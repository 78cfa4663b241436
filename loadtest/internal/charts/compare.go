package charts

import (
	"bufio"
	"bytes"
	"fmt"
	"image/color"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// Result is one measurement of scripts/bench.sh's results.tsv: one run of one
// workload against one target in one round.
type Result struct {
	Round    int
	Workload string
	Target   string
	// RequestsPerSec, LatencyAverage and LatencyP99 (seconds) are loadtest's report's.
	RequestsPerSec float64
	LatencyAverage float64
	LatencyP99     float64
	Failed         int64
	// CPUPerRequest is the server processes' CPU time per successful request, µs.
	CPUPerRequest float64
}

// resultFields names the columns of results.tsv, in order.
var resultFields = []string{"round", "workload", "target", "requests_per_sec", "latency average (s)", "latency p99 (s)", "failed", "server CPU per request (µs)"}

// ReadResultsFile reads a results.tsv file (see ReadResults).
func ReadResultsFile(path string) ([]Result, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ReadResults(f, path)
}

// ReadResults parses the results that scripts/bench.sh writes: one line per
// measurement, eight tab-separated fields (round, workload, target, requests/s,
// average latency in seconds, p99 latency in seconds, failed requests, server CPU µs
// per request). Blank lines are skipped. name prefixes the errors, which give the
// line and the field.
func ReadResults(r io.Reader, name string) ([]Result, error) {
	var rs []Result
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimRight(sc.Text(), "\r")
		if strings.TrimSpace(text) == "" {
			continue
		}
		f := strings.Split(text, "\t")
		if len(f) != len(resultFields) {
			return nil, fmt.Errorf("%s:%d: %d tab-separated fields, want %d (%s)", name, line, len(f), len(resultFields), strings.Join(resultFields, ", "))
		}
		bad := func(i int, err error) error {
			return fmt.Errorf("%s:%d: field %d (%s) %q: %v", name, line, i+1, resultFields[i], f[i], err)
		}
		var (
			res Result
			err error
		)
		if res.Round, err = strconv.Atoi(f[0]); err != nil {
			return nil, bad(0, errNotInteger)
		}
		res.Workload, res.Target = strings.TrimSpace(f[1]), strings.TrimSpace(f[2])
		if res.Workload == "" {
			return nil, bad(1, errEmpty)
		}
		if res.Target == "" {
			return nil, bad(2, errEmpty)
		}
		for _, fl := range []struct {
			i int
			p *float64
		}{{3, &res.RequestsPerSec}, {4, &res.LatencyAverage}, {5, &res.LatencyP99}, {7, &res.CPUPerRequest}} {
			i, p := fl.i, fl.p
			v, err := strconv.ParseFloat(strings.TrimSpace(f[i]), 64)
			if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
				return nil, bad(i, errNotNumber)
			}
			*p = v
		}
		if res.Failed, err = strconv.ParseInt(strings.TrimSpace(f[6]), 10, 64); err != nil || res.Failed < 0 {
			return nil, bad(6, errNotCount)
		}
		rs = append(rs, res)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if len(rs) == 0 {
		return nil, fmt.Errorf("%s: no measurements", name)
	}
	return rs, nil
}

type parseError string

func (e parseError) Error() string { return string(e) }

const (
	errNotInteger = parseError("not an integer")
	errEmpty      = parseError("empty")
	errNotNumber  = parseError("not a finite number >= 0")
	errNotCount   = parseError("not a count >= 0")
)

// metric is one comparison chart.
type metric struct {
	file, name, unit string
	value            func(Result) float64
	format           func(float64) string
}

var metrics = []metric{
	{"throughput.svg", "throughput", "requests/s", func(r Result) float64 { return r.RequestsPerSec }, formatCount},
	{"latency.svg", "average latency", "ms", func(r Result) float64 { return r.LatencyAverage * 1000 }, formatSig},
	{"cpu.svg", "server CPU per request", "µs", func(r Result) float64 { return r.CPUPerRequest }, formatSig},
}

// formatCount writes a rate compactly: 950, 12.3k, 1.25M.
func formatCount(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'f', 2, 64) + "M"
	case v >= 1e4:
		return strconv.FormatFloat(v/1e3, 'f', 1, 64) + "k"
	case v >= 1e3:
		return strconv.FormatFloat(v/1e3, 'f', 2, 64) + "k"
	}
	return strconv.FormatFloat(v, 'f', 0, 64)
}

// formatSig writes v with three significant digits (at most two decimals).
func formatSig(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// Target colours, in the order targets first appear; etcd and kvmesh keep theirs.
var (
	targetColors = []color.RGBA{
		{R: 0x41, G: 0x8c, B: 0xd8, A: 0xff}, // blue
		{R: 0xf2, G: 0x8e, B: 0x2b, A: 0xff}, // orange
		{R: 0x59, G: 0xa1, B: 0x4f, A: 0xff}, // green
		{R: 0xaf, G: 0x7a, B: 0xa1, A: 0xff}, // purple
		{R: 0x9c, G: 0x75, B: 0x5f, A: 0xff}, // brown
		{R: 0xba, G: 0xb0, B: 0xac, A: 0xff}, // grey
	}
	dotColor = color.RGBA{R: 0x22, G: 0x22, B: 0x22, A: 0xff}
)

// comparison is the results grouped for the charts: workloads and targets in the
// order they first appear, and each (workload, target)'s values in file order.
type comparison struct {
	workloads, targets []string
	rounds             int
	results            map[[2]string][]Result
}

func group(rs []Result) comparison {
	c := comparison{results: map[[2]string][]Result{}}
	rounds := map[int]bool{}
	for _, r := range rs {
		if !slices.Contains(c.workloads, r.Workload) {
			c.workloads = append(c.workloads, r.Workload)
		}
		if !slices.Contains(c.targets, r.Target) {
			c.targets = append(c.targets, r.Target)
		}
		k := [2]string{r.Workload, r.Target}
		c.results[k] = append(c.results[k], r)
		rounds[r.Round] = true
	}
	c.rounds = len(rounds)
	return c
}

// median is the median of vs (the mean of the middle two for an even count, as
// Python's statistics.median that scripts/bench.sh reports with).
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// WriteComparison writes throughput.svg, latency.svg and cpu.svg (each name
// prefixed with prefix) into dir, creating it if needed, and returns their paths.
// title heads every chart; empty, it is the targets ("etcd vs kvmesh").
func WriteComparison(dir, prefix, title string, rs []Result) ([]string, error) {
	if len(rs) == 0 {
		return nil, fmt.Errorf("no measurements")
	}
	if strings.ContainsAny(prefix, `/\`) {
		return nil, fmt.Errorf("prefix %q: not a file name prefix", prefix)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	c := group(rs)
	if title == "" {
		title = strings.Join(c.targets, " vs ")
	}
	var files []string
	for _, m := range metrics {
		var buf bytes.Buffer
		if err := c.render(&buf, title, m); err != nil {
			return files, fmt.Errorf("%s: %w", m.file, err)
		}
		path := filepath.Join(dir, prefix+m.file)
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			return files, err
		}
		files = append(files, path)
	}
	return files, nil
}

// Bars take this share of a group's width; the rest separates the groups.
const groupWidth = 0.8

// render draws one metric's grouped bars: a group per workload, a bar per target
// at the median over the rounds, a dot per round, the median above each bar.
func (c comparison) render(w io.Writer, title string, m metric) error {
	p := plot.New()
	rounds := fmt.Sprintf("median of %d rounds, a dot per round", c.rounds)
	if c.rounds == 1 {
		rounds = "1 round"
	}
	p.Title.Text = fmt.Sprintf("%s: %s (%s)\n%s", title, m.name, m.unit, rounds)
	p.Title.TextStyle.Font.Size = vg.Points(13)
	p.Y.Label.Text = m.name + " (" + m.unit + ")"
	p.X.Label.Text = "workload (conns / clients)"
	if len(c.targets) == 2 {
		p.X.Label.Text += fmt.Sprintf(", then %s / %s", c.targets[1], c.targets[0])
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(&plotter.Grid{Horizontal: plotter.DefaultGridLineStyle})

	nt := float64(len(c.targets))
	barW := groupWidth / nt
	labels := workloadLabels(c.workloads)
	top := 0.0
	var valueLabels plotter.XYLabels
	for ti, target := range c.targets {
		col := targetColors[ti%len(targetColors)]
		var legend plot.Thumbnailer
		for wi, wl := range c.workloads {
			rs := c.results[[2]string{wl, target}]
			if len(rs) == 0 {
				continue
			}
			vs := make([]float64, len(rs))
			for i, r := range rs {
				vs[i] = m.value(r)
			}
			med := median(vs)
			x0 := float64(wi) - groupWidth/2 + float64(ti)*barW
			x1 := x0 + barW
			inset := barW * 0.06
			bar, err := plotter.NewPolygon(plotter.XYs{{X: x0 + inset, Y: 0}, {X: x1 - inset, Y: 0}, {X: x1 - inset, Y: med}, {X: x0 + inset, Y: med}})
			if err != nil {
				return err
			}
			bar.Color = col
			bar.LineStyle.Width = 0
			p.Add(bar)
			legend = bar

			// The rounds' dots, spread evenly across the middle of the bar.
			mid := (x0 + x1) / 2
			spread := barW * 0.5
			dots := make(plotter.XYs, len(vs))
			high := med
			for i, v := range vs {
				off := 0.0
				if len(vs) > 1 {
					off = spread * (float64(i)/float64(len(vs)-1) - 0.5)
				}
				dots[i] = plotter.XY{X: mid + off, Y: v}
				high = max(high, v)
			}
			s, err := plotter.NewScatter(dots)
			if err != nil {
				return err
			}
			s.GlyphStyle = draw.GlyphStyle{Color: dotColor, Radius: vg.Points(2.2), Shape: draw.CircleGlyph{}}
			p.Add(s)

			valueLabels.XYs = append(valueLabels.XYs, plotter.XY{X: mid, Y: high})
			valueLabels.Labels = append(valueLabels.Labels, m.format(med))
			top = max(top, high)
		}
		if legend != nil {
			p.Legend.Add(target, legend)
		}
	}
	if len(valueLabels.XYs) > 0 {
		lb, err := plotter.NewLabels(valueLabels)
		if err != nil {
			return err
		}
		for i := range lb.TextStyle {
			lb.TextStyle[i].XAlign = draw.XCenter
			lb.TextStyle[i].YAlign = draw.YBottom
			lb.TextStyle[i].Font.Size = vg.Points(8)
		}
		lb.Offset = vg.Point{Y: vg.Points(4)}
		p.Add(lb)
	}

	if len(c.targets) == 2 {
		for wi, wl := range c.workloads {
			a, b := c.medianOf(wl, c.targets[0], m), c.medianOf(wl, c.targets[1], m)
			ratio := "–"
			if a > 0 && !math.IsNaN(b) {
				ratio = strconv.FormatFloat(b/a, 'f', 2, 64) + "×"
			}
			labels[wi] += "\n" + ratio
		}
	}
	p.NominalX(labels...)
	p.X.Tick.Label.Font.Size = vg.Points(9)
	p.X.Min, p.X.Max = -0.5, float64(len(c.workloads))-0.5
	p.Y.Min = 0
	p.Y.Tick.Marker = tickFormat(m.format)
	if top <= 0 {
		top = 1
	}
	// Room above the highest bar for its label and for the legend.
	p.Y.Max = top * (1.12 + 0.07*nt)

	width := max(6*vg.Inch, vg.Length(len(c.workloads))*1.5*vg.Inch+1.5*vg.Inch)
	height := 5.5 * vg.Inch
	cv := vgsvg.New(width, height)
	dc := draw.New(cv)
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	p.Draw(draw.Crop(dc, vg.Points(6), -vg.Points(10), vg.Points(6), -vg.Points(6)))
	_, err := cv.WriteTo(w)
	return err
}

func (c comparison) medianOf(workload, target string, m metric) float64 {
	rs := c.results[[2]string{workload, target}]
	vs := make([]float64, len(rs))
	for i, r := range rs {
		vs[i] = m.value(r)
	}
	return median(vs)
}

var (
	// "100 conns / 1000 clients", "1 conn / 1 client", "100 / 1000".
	concurrencyRE = regexp.MustCompile(`(\d+)\s*(?:conns?)?\s*/\s*(\d+)(?:\s*clients?)?`)
	parensRE      = regexp.MustCompile(`\s*\([^)]*\)`)
)

// workloadLabels shortens workload names for the axis: the name up to its first
// comma or colon without parenthesized asides, wrapped, then the concurrency
// ("100 / 1000") when the name gives one. A label that two workloads would share
// is their whole name instead, wrapped.
func workloadLabels(names []string) []string {
	labels := make([]string, len(names))
	count := map[string]int{}
	for i, n := range names {
		labels[i] = shortLabel(n)
		count[labels[i]]++
	}
	for i, n := range names {
		if count[labels[i]] > 1 {
			labels[i] = strings.Join(wrap(n, labelWidth), "\n")
		}
	}
	return labels
}

const labelWidth = 16 // characters per line of an axis label

func shortLabel(name string) string {
	head := name
	if i := strings.IndexAny(head, ",:"); i >= 0 {
		head = head[:i]
	}
	head = strings.TrimSpace(parensRE.ReplaceAllString(head, ""))
	if head == "" {
		head = strings.TrimSpace(name)
	}
	lines := wrap(head, labelWidth)
	if m := concurrencyRE.FindStringSubmatch(name); m != nil {
		lines = append(lines, m[1]+" / "+m[2])
	}
	return strings.Join(lines, "\n")
}

// wrap breaks s into lines of at most width characters at spaces (a longer word
// stands on its own line).
func wrap(s string, width int) []string {
	var lines []string
	var cur string
	for _, w := range strings.Fields(s) {
		switch {
		case cur == "":
			cur = w
		case len([]rune(cur))+1+len([]rune(w)) <= width:
			cur += " " + w
		default:
			lines = append(lines, cur)
			cur = w
		}
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	return lines
}
