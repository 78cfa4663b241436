package bench

import (
	"io"
	"time"

	"github.com/cheggaaa/pb/v3"
)

// Progress bar templates (github.com/cheggaaa/pb/v3). With a request count the bar
// fills with the completed requests; with --duration alone the count is unbounded,
// so the bar shows the count, the rate and the time against the duration.
const (
	progressCounted   = `{{counters . }} {{bar . }} {{percent . }} {{speed . "%s req/s"}} {{etime . }}{{with string . "limit"}} / {{.}}{{end}}`
	progressUncounted = `{{counters . }} requests {{speed . "%s req/s"}} {{etime . }} / {{string . "limit"}}`
)

// startProgress draws a progress bar on w, redrawn in place. It is only meant for
// a terminal; the caller decides whether to enable it. The run counts completed
// requests with Increment (an atomic add, no lock) and calls Finish at the end.
func startProgress(w io.Writer, total int64, duration time.Duration) *pb.ProgressBar {
	bar := pb.New64(total)
	if total > 0 {
		bar.SetTemplateString(progressCounted)
	} else {
		bar.SetTemplateString(progressUncounted)
	}
	if duration > 0 {
		bar.Set("limit", duration.String())
	}
	bar.SetWriter(w)
	bar.Set(pb.Terminal, true)
	bar.SetMaxWidth(100)
	bar.SetRefreshRate(200 * time.Millisecond)
	return bar.Start()
}
