// Package charts draws loadtest's charts with gonum.org/v1/plot: the throughput
// and latency of one run over time (loadtest --plot), and the comparison of
// targets over the rounds of scripts/bench.sh (loadtest chart).
package charts

import (
	"bytes"
	"errors"
	"fmt"
	"image/color"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"

	"github.com/kvmesh/kvmesh/loadtest/internal/bench"
)

func init() {
	// Sans-serif text in every chart (the Liberation fonts come with gonum/plot).
	sans := font.Font{Typeface: "Liberation", Variant: "Sans"}
	plot.DefaultFont = sans
	plotter.DefaultFont = sans
}

// tickFormat keeps gonum's choice of ticks but writes their labels with format
// (0 as "0").
type tickFormat func(float64) string

func (f tickFormat) Ticks(min, max float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(min, max)
	for i := range ts {
		switch {
		case ts[i].Label == "":
		case ts[i].Value == 0:
			ts[i].Label = "0"
		default:
			ts[i].Label = trimZeros(f(ts[i].Value))
		}
	}
	return ts
}

// trimZeros drops the trailing zeros of a number's decimals: "250.0k" is "250k",
// "2.50" is "2.5".
func trimZeros(s string) string {
	i := strings.IndexByte(s, '.')
	if i < 0 {
		return s
	}
	j := i + 1
	for j < len(s) && s[j] >= '0' && s[j] <= '9' {
		j++
	}
	num := strings.TrimRight(s[:j], "0")
	num = strings.TrimSuffix(num, ".")
	return num + s[j:]
}

// PlotFormat is the image format of a chart file, from its extension: "svg" or
// "png" (case-insensitive). Any other extension is an error.
func PlotFormat(path string) (string, error) {
	switch ext := strings.ToLower(filepath.Ext(path)); ext {
	case ".svg", ".png":
		return ext[1:], nil
	case "":
		return "", fmt.Errorf("%q has no extension: want .svg or .png", path)
	default:
		return "", fmt.Errorf("%q: unsupported format %q: want .svg or .png", path, ext)
	}
}

// Timeline chart size; a PNG is rendered at 96 dpi (960×720 pixels).
const (
	timelineWidth  = 10 * vg.Inch
	timelineHeight = 7.5 * vg.Inch
	pngDPI         = 96
)

// Series colours, the same in every chart.
var (
	colorThroughput = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}
	colorP50        = color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}
	colorAverage    = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}
	colorP99        = color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}
)

// WriteTimeline writes the chart of rep's timeline to path, in the format of its
// extension (see PlotFormat). The file is only created once the chart is drawn.
func WriteTimeline(path string, rep *bench.Report) error {
	format, err := PlotFormat(path)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := RenderTimeline(&buf, format, rep); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// RenderTimeline draws rep's timeline as two stacked plots sharing the time axis:
// requests/s on top, the latency average, p50 and p99 (ms) below. format is "svg"
// or "png".
func RenderTimeline(w io.Writer, format string, rep *bench.Report) error {
	top, bottom := throughputPlot(rep), latencyPlot(rep)
	end := rep.TotalSeconds
	if end <= 0 {
		end = 1
	}
	for _, p := range []*plot.Plot{top, bottom} {
		p.X.Min, p.X.Max = 0, end
		p.Y.Min = 0
		p.Add(plotter.NewGrid())
	}
	return renderStacked(w, format, timelineWidth, timelineHeight, timelineTitle(rep), top, bottom)
}

// timelineTitle names the run: the target and the workload, then its parameters,
// then its totals.
func timelineTitle(rep *bench.Report) string {
	target := rep.Target
	if target == "" {
		target = strings.Join(rep.Endpoints, ",")
	}
	lines := []string{fmt.Sprintf("%s: %s, %s / %s", target, rep.Op, plural(rep.Conns, "conn"), plural(rep.Clients, "client"))}
	if len(rep.Params) > 0 {
		keys := make([]string, 0, len(rep.Params))
		for k := range rep.Params {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = fmt.Sprintf("%s=%v", k, rep.Params[k])
		}
		lines = append(lines, strings.Join(parts, " "))
	}
	sum := fmt.Sprintf("%d requests (%d failed) in %.2f s: %.0f req/s, average %s, p99 %s",
		rep.Requests, rep.Failed, rep.TotalSeconds, rep.RequestsPerSec, ms(rep.Latency.Average), ms(rep.Latency.P99))
	if rep.Interrupted {
		sum += " (interrupted)"
	}
	return strings.Join(append(lines, sum), "\n")
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

func ms(sec float64) string { return fmt.Sprintf("%.2f ms", sec*1000) }

func timeAxisLabel(rep *bench.Report) string {
	iv := time.Duration(rep.TimelineInterval * float64(time.Second)).Round(time.Microsecond)
	return fmt.Sprintf("time since the start of the run (s), in intervals of %v", iv)
}

func throughputPlot(rep *bench.Report) *plot.Plot {
	p := plot.New()
	p.X.Label.Text = timeAxisLabel(rep)
	p.Y.Label.Text = "requests/s (succeeded)"
	p.Y.Tick.Marker = tickFormat(formatCount)
	xys := make(plotter.XYs, len(rep.Timeline))
	for i, pt := range rep.Timeline {
		xys[i] = plotter.XY{X: pt.T + pt.Seconds/2, Y: pt.RequestsPerSec}
	}
	addSeries(p, "", xys, colorThroughput, nil)
	return p
}

func latencyPlot(rep *bench.Report) *plot.Plot {
	p := plot.New()
	p.X.Label.Text = timeAxisLabel(rep)
	p.Y.Label.Text = "latency (ms)"
	p.Y.Tick.Marker = tickFormat(formatSig)
	p.Legend.Top = true
	p.Legend.Left = true
	high := 0.0
	for _, s := range []struct {
		name  string
		col   color.Color
		dash  []vg.Length
		value func(*bench.IntervalLatency) float64
	}{
		{"p99", colorP99, nil, func(l *bench.IntervalLatency) float64 { return l.P99 }},
		{"average", colorAverage, []vg.Length{vg.Points(6), vg.Points(3)}, func(l *bench.IntervalLatency) float64 { return l.Average }},
		{"p50", colorP50, nil, func(l *bench.IntervalLatency) float64 { return l.P50 }},
	} {
		xys := make(plotter.XYs, 0, len(rep.Timeline))
		for _, pt := range rep.Timeline {
			x := pt.T + pt.Seconds/2
			if pt.Latency == nil {
				xys = append(xys, plotter.XY{X: x, Y: gap})
				continue
			}
			v := s.value(pt.Latency) * 1000
			high = max(high, v)
			xys = append(xys, plotter.XY{X: x, Y: v})
		}
		addSeries(p, s.name, xys, s.col, s.dash)
	}
	// Room above the highest point for the legend.
	p.Y.Max = max(high*1.25, 1e-3)
	return p
}

// gap marks a point without a value (no request succeeded in its interval): the
// line breaks there.
const gap = -1

// addSeries draws xys as a line, broken at gaps, with a dot on each point when
// there are few (and always on a point that stands alone between gaps), and names
// it in the legend unless name is empty.
func addSeries(p *plot.Plot, name string, xys plotter.XYs, col color.Color, dash []vg.Length) {
	style := draw.LineStyle{Color: col, Width: vg.Points(1.5), Dashes: dash}
	glyph := draw.GlyphStyle{Color: col, Radius: vg.Points(2), Shape: draw.CircleGlyph{}}
	dots := len(xys) <= 60
	var legend plot.Thumbnailer
	for i := 0; i < len(xys); {
		if xys[i].Y == gap {
			i++
			continue
		}
		j := i
		for j < len(xys) && xys[j].Y != gap {
			j++
		}
		seg := xys[i:j]
		if len(seg) > 1 {
			l, err := plotter.NewLine(seg)
			if err == nil {
				l.LineStyle = style
				p.Add(l)
				legend = l
			}
		}
		if dots || len(seg) == 1 {
			if s, err := plotter.NewScatter(seg); err == nil {
				s.GlyphStyle = glyph
				p.Add(s)
			}
		}
		i = j
	}
	if name != "" {
		if legend == nil {
			l := &plotter.Line{LineStyle: style}
			legend = l
		}
		p.Legend.Add(name, legend)
	}
}

// renderStacked draws plots one above the other under a title, their data areas
// aligned, and writes the image in format ("svg" or "png").
func renderStacked(w io.Writer, format string, width, height vg.Length, title string, plots ...*plot.Plot) error {
	var (
		c  vg.CanvasWriterTo
		dc draw.Canvas
	)
	switch format {
	case "svg":
		sc := vgsvg.New(width, height)
		c, dc = sc, draw.New(sc)
	case "png":
		ic := vgimg.NewWith(vgimg.UseWH(width, height), vgimg.UseDPI(pngDPI), vgimg.UseBackgroundColor(color.White))
		c, dc = vgimg.PngCanvas{Canvas: ic}, draw.New(ic)
	default:
		return fmt.Errorf("unsupported format %q", format)
	}
	if format == "svg" {
		// vgsvg leaves the background transparent; paint it white like the PNG.
		dc.SetColor(color.White)
		dc.Fill(dc.Rectangle.Path())
	}

	sty := plot.New().Title.TextStyle
	sty.Font.Size = vg.Points(12)
	sty.XAlign = draw.XCenter
	sty.YAlign = draw.YTop
	pad := vg.Points(8)
	top := dc.Max.Y - pad
	dc.FillText(sty, vg.Point{X: (dc.Min.X + dc.Max.X) / 2, Y: top}, title)
	body := dc
	body.Max.Y = top - sty.Height(title) - pad

	rows := make([][]*plot.Plot, len(plots))
	for i, p := range plots {
		rows[i] = []*plot.Plot{p}
	}
	tiles := draw.Tiles{
		Rows: len(plots), Cols: 1,
		PadTop: vg.Points(4), PadBottom: pad, PadLeft: pad, PadRight: vg.Points(16), PadY: vg.Points(16),
	}
	canvases := plot.Align(rows, tiles, body)
	for i, p := range plots {
		p.Draw(canvases[i][0])
	}
	if _, err := c.WriteTo(w); err != nil {
		return errors.Join(errors.New("writing the chart"), err)
	}
	return nil
}
