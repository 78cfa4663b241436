// Package inproc carries HTTP requests to a handler in the same process, without
// sockets or HTTP/2 framing. The all-in-one uses it between its gateway and its
// replica: the gateway still speaks kvmesh's internal Connect API (same handlers,
// same protocol, same interceptors) exactly as it does across the network, only the
// bytes do not leave the process.
//
// It serves the Connect protocol (unary and streaming), which needs no HTTP trailers;
// clients using it must not select gRPC.
package inproc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Transport is an http.RoundTripper that serves every request with Handler.
type Transport struct {
	Handler http.Handler
}

// Client calls a handler in process. It has the one method connect-go's clients need
// (Do), and skips what http.Client does on every request (redirects, cookies,
// timeouts, copies of the request), none of which applies in process.
type Client struct{ t Transport }

// NewClient returns a Client for h.
func NewClient(h http.Handler) *Client { return &Client{t: Transport{Handler: h}} }

// Do serves req with the handler.
func (c *Client) Do(req *http.Request) (*http.Response, error) { return c.t.RoundTrip(req) }

// RoundTrip implements http.RoundTripper. The response is returned as soon as the
// handler writes its header (or returns), and its body streams while the handler
// writes, so server streams work.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	// A shallow copy, as Request.WithContext makes: handlers only read the request's
	// header, so sharing it saves a deep copy per call.
	sreq := new(http.Request)
	*sreq = *req
	sreq.Proto, sreq.ProtoMajor, sreq.ProtoMinor = "HTTP/2.0", 2, 0
	sreq.RequestURI = req.URL.RequestURI()
	sreq.RemoteAddr = "inproc"
	sreq.Host = req.URL.Host
	if sreq.Body == nil {
		sreq.Body = http.NoBody
	}
	if isUnary(req) {
		return t.unary(req, sreq), nil
	}
	pr, pw := io.Pipe()
	w := &responseWriter{header: make(http.Header), body: pw, started: make(chan struct{})}
	go func() {
		defer func() {
			if p := recover(); p != nil && p != http.ErrAbortHandler {
				pw.CloseWithError(errors.New("inproc: handler panicked"))
				w.start()
				panic(p)
			}
			w.start()
			pw.Close()
		}()
		t.Handler.ServeHTTP(w, sreq)
	}()
	select {
	case <-w.started:
	case <-req.Context().Done():
		pr.CloseWithError(req.Context().Err())
		return nil, req.Context().Err()
	}
	return &http.Response{
		Status:        http.StatusText(w.status),
		StatusCode:    w.status,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        w.sent,
		Body:          pr,
		ContentLength: -1,
		Request:       req,
	}, nil
}

// isUnary tells a Connect unary call (its content type has no "connect+" streaming
// prefix and its body is complete) from a stream.
func isUnary(req *http.Request) bool {
	ct := req.Header.Get("Content-Type")
	return req.GetBody != nil && strings.HasPrefix(ct, "application/") && !strings.HasPrefix(ct, "application/connect+")
}

// unary runs the handler on the caller's goroutine and buffers its answer: a unary
// call's request is complete before it is sent and its response is read whole.
func (t *Transport) unary(req, sreq *http.Request) *http.Response {
	w := &bufferedWriter{header: make(http.Header)}
	t.Handler.ServeHTTP(w, sreq)
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return &http.Response{
		Status:        http.StatusText(w.status),
		StatusCode:    w.status,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        w.header,
		Body:          io.NopCloser(&w.body),
		ContentLength: int64(w.body.Len()),
		Request:       req,
	}
}

type bufferedWriter struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (w *bufferedWriter) Header() http.Header { return w.header }

func (w *bufferedWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
}

func (w *bufferedWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return w.body.Write(p)
}

func (w *bufferedWriter) Flush() {}

type responseWriter struct {
	header http.Header
	sent   http.Header
	body   *io.PipeWriter
	status int

	once    sync.Once
	started chan struct{}
}

func (w *responseWriter) Header() http.Header { return w.header }

func (w *responseWriter) WriteHeader(status int) {
	w.once.Do(func() {
		w.status = status
		w.sent = w.header.Clone()
		close(w.started)
	})
}

// start sends the header with status 200 if the handler never did.
func (w *responseWriter) start() { w.WriteHeader(http.StatusOK) }

func (w *responseWriter) Write(p []byte) (int, error) {
	w.start()
	return w.body.Write(p)
}

// Flush implements http.Flusher: writes reach the reader as they happen.
func (w *responseWriter) Flush() { w.start() }

// Context hides ctx's deadline but keeps its cancellation (Done fires when the
// deadline passes). A client of an in-process handler passes its context through it:
// the handler runs under that very context, so sending the deadline as a header too
// would only make the handler parse it and start a second timer.
func Context(ctx context.Context) context.Context { return noDeadline{ctx} }

type noDeadline struct{ context.Context }

func (noDeadline) Deadline() (time.Time, bool) { return time.Time{}, false }
