package inproc

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestUnaryIsServedOnTheCallersGoroutineAndBuffered(t *testing.T) {
	c := testClient(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.ProtoMajor != 2 {
			t.Errorf("handler saw HTTP/%d, want 2", r.ProtoMajor)
		}
		w.Header().Set("X-Echo", "yes")
		w.WriteHeader(http.StatusTeapot)
		w.Write(append([]byte("echo:"), body...))
	}))
	resp, err := c.Post("http://svc/pkg.Svc/Unary", "application/proto", strings.NewReader("hi"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusTeapot || resp.Header.Get("X-Echo") != "yes" || string(body) != "echo:hi" {
		t.Fatalf("got %d %v %q", resp.StatusCode, resp.Header, body)
	}
}

func TestStreamsFlowWhileTheHandlerRuns(t *testing.T) {
	step := make(chan struct{})
	c := testClient(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		for i := range 3 {
			io.WriteString(w, strings.Repeat("x", i+1)+"\n")
			w.(http.Flusher).Flush()
			<-step
		}
	}))
	req, _ := http.NewRequest(http.MethodPost, "http://svc/pkg.Svc/Stream", strings.NewReader(""))
	req.Header.Set("Content-Type", "application/connect+proto")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := r.ReadString('\n')
		if err != nil || line != strings.Repeat("x", i+1)+"\n" {
			t.Fatalf("message %d: %q, %v", i, line, err)
		}
		step <- struct{}{}
	}
	if _, err := r.ReadString('\n'); err != io.EOF {
		t.Fatalf("after the handler returned: %v, want EOF", err)
	}
}

func TestCancelBeforeHeaders(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	c := testClient(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://svc/pkg.Svc/Stream", strings.NewReader(""))
	req.Header.Set("Content-Type", "application/connect+proto")
	if _, err := c.Do(req); err == nil {
		t.Fatal("a stream whose handler never answers returned without error after its context ended")
	}
}

func TestContextHidesTheDeadlineButKeepsCancellation(t *testing.T) {
	parent, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	ctx := Context(parent)
	if _, ok := ctx.Deadline(); ok {
		t.Fatal("deadline still visible")
	}
	select {
	case <-ctx.Done():
		if ctx.Err() != context.DeadlineExceeded {
			t.Fatalf("err %v, want DeadlineExceeded", ctx.Err())
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the parent's deadline did not end the context")
	}
}

func testClient(h http.Handler) *http.Client { return &http.Client{Transport: &Transport{Handler: h}} }

func TestClientDoesWhatTheTransportDoes(t *testing.T) {
	c := NewClient(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.URL.Path) }))
	req, _ := http.NewRequest(http.MethodPost, "http://svc/pkg.Svc/M", strings.NewReader("x"))
	req.Header.Set("Content-Type", "application/proto")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if string(body) != "/pkg.Svc/M" {
		t.Fatalf("body %q", body)
	}
}
