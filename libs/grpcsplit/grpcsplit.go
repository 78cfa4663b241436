// Package grpcsplit shares one port between grpc-go and net/http: a connection whose
// first request is gRPC goes to grpc-go's server, which needs a third of the CPU per
// call of net/http's HTTP/2 server with connect-go (see BENCHMARKS.md); every other
// connection (Connect, gRPC-Web, HTTP/1.1, plain HTTP endpoints) goes to net/http.
package grpcsplit

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
)

// The port carries every protocol. A connection that starts with the HTTP/2
// preface (prior-knowledge h2c) and whose first request has a gRPC content type goes to
// grpc-go; everything else (HTTP/1.1, Connect, gRPC-Web, h2c Connect) goes to net/http.
// gRPC clients send nothing before the server's SETTINGS arrive, so the sniffer sends
// an empty SETTINGS frame first; net/http's HTTP/2 server treats an acknowledgement of
// SETTINGS it never sent as a protocol error, so on connections handed to it the
// client's first SETTINGS ACK is removed (grpc-go ignores it).

var clientPreface = []byte(http2.ClientPreface)

const sniffTimeout = 10 * time.Second

// Listener routes the connections accepted on one port to GRPC or HTTP.
type Listener struct {
	l     net.Listener
	log   *slog.Logger
	grpcL *chanListener
	httpL *chanListener
}

// New starts routing the connections l accepts; it stops when l is closed.
func New(l net.Listener, log *slog.Logger) *Listener {
	s := &Listener{l: l, log: log, grpcL: newChanListener(l), httpL: newChanListener(l)}
	go s.run()
	return s
}

// Serve answers the connections l accepts, gRPC ones with g and the others with h,
// until l is closed. The channel gets the first failure of either server; their being
// stopped or closed is none.
func Serve(l net.Listener, log *slog.Logger, g *grpc.Server, h *http.Server) <-chan error {
	s := New(l, log)
	errc := make(chan error, 2)
	serve := func(fn func() error) {
		if err := fn(); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, net.ErrClosed) {
			errc <- err
		}
	}
	go serve(func() error { return g.Serve(s.GRPC()) })
	go serve(func() error { return h.Serve(s.HTTP()) })
	return errc
}

// GRPC is the listener of the connections for grpc-go.
func (s *Listener) GRPC() net.Listener { return s.grpcL }

// HTTP is the listener of every other connection, for net/http.
func (s *Listener) HTTP() net.Listener { return s.httpL }

func (s *Listener) run() {
	defer s.grpcL.Close()
	defer s.httpL.Close()
	for {
		c, err := s.l.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return
		}
		go s.route(c)
	}
}

func (s *Listener) route(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(sniffTimeout))
	if tc, ok := c.(*tls.Conn); ok {
		// A peer without a certificate the server trusts (or that does not trust the
		// server's) is refused here; say so where an operator looks.
		if err := tc.Handshake(); err != nil {
			s.log.Warn("refused connection: TLS handshake failed", "remote", c.RemoteAddr().String(), "err", err)
			c.Close()
			return
		}
	}
	rec := &recorder{r: c}
	isGRPC, h2, err := sniff(c, rec)
	c.SetReadDeadline(time.Time{})
	if err != nil {
		s.log.Debug("closing connection that sent no request", "remote", c.RemoteAddr().String(), "err", err)
		c.Close()
		return
	}
	rc := &replayConn{Conn: c, r: io.MultiReader(bytes.NewReader(rec.buf.Bytes()), c)}
	switch {
	case isGRPC:
		s.grpcL.deliver(rc)
	case h2:
		s.httpL.deliver(&ackFilterConn{Conn: rc, r: bufio.NewReader(rc), prefaceLeft: len(clientPreface)})
	default:
		s.httpL.deliver(rc)
	}
}

// sniff reads the start of a connection: HTTP/1 (h2 false), or HTTP/2 whose first
// request is gRPC or not.
func sniff(c net.Conn, rec *recorder) (isGRPC, h2 bool, err error) {
	var b [1]byte
	for i := range clientPreface {
		if _, err := io.ReadFull(rec, b[:]); err != nil {
			return false, false, err
		}
		if b[0] != clientPreface[i] {
			return false, false, nil // not HTTP/2 prior knowledge
		}
	}
	if _, err := c.Write([]byte{0, 0, 0, byte(http2.FrameSettings), 0, 0, 0, 0, 0}); err != nil {
		return false, true, err
	}
	fr := http2.NewFramer(nil, rec)
	fr.SetMaxReadFrameSize(1 << 20)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	for range 16 {
		f, err := fr.ReadFrame()
		if err != nil {
			return false, true, err
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			ct := h.PseudoValue("content-type")
			for _, hf := range h.RegularFields() {
				if hf.Name == "content-type" {
					ct = hf.Value
				}
			}
			return strings.HasPrefix(ct, "application/grpc") && !strings.HasPrefix(ct, "application/grpc-web"), true, nil
		}
	}
	return false, true, nil
}

// recorder keeps every byte read, to replay them to the chosen server.
type recorder struct {
	r   io.Reader
	buf bytes.Buffer
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.buf.Write(p[:n])
	return n, err
}

// replayConn reads the sniffed bytes again, then the connection.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// NetConn is the connection under the replay (for its TLS state).
func (c *replayConn) NetConn() net.Conn { return c.Conn }

// ackFilterConn passes an HTTP/2 client's bytes through, except its first SETTINGS
// acknowledgement (the one for the sniffer's SETTINGS).
type ackFilterConn struct {
	net.Conn
	r           *bufio.Reader
	prefaceLeft int
	dropped     bool
	out         []byte
}

// NetConn is the connection under the filter (for its TLS state).
func (c *ackFilterConn) NetConn() net.Conn { return c.Conn }

func (c *ackFilterConn) Read(p []byte) (int, error) {
	for len(c.out) == 0 {
		if c.dropped {
			return c.r.Read(p)
		}
		if c.prefaceLeft > 0 {
			n, err := c.r.Read(p[:min(len(p), c.prefaceLeft)])
			c.prefaceLeft -= n
			return n, err
		}
		var hdr [9]byte
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return 0, err
		}
		length := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
		if http2.FrameType(hdr[3]) == http2.FrameSettings && http2.Flags(hdr[4]).Has(http2.FlagSettingsAck) {
			c.dropped = true
			if _, err := c.r.Discard(length); err != nil {
				return 0, err
			}
			continue
		}
		frame := make([]byte, 9+length)
		copy(frame, hdr[:])
		if _, err := io.ReadFull(c.r, frame[9:]); err != nil {
			return 0, err
		}
		c.out = frame
	}
	n := copy(p, c.out)
	c.out = c.out[n:]
	return n, nil
}

// chanListener is a net.Listener fed by the splitter.
type chanListener struct {
	addr net.Addr
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func newChanListener(parent net.Listener) *chanListener {
	return &chanListener{addr: parent.Addr(), ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) deliver(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// Dial opens a grpc-go link to a kvmesh port served through a Listener, at base: in
// plaintext to an http:// URL, over TLS with tlsCfg to an https:// one; connected lazily, the address resolved at each dial (a name
// that no longer resolves, such as a stopped container's, fails as a dial error, like
// a refused connection), and an idle link pinged every 10 s to find a dead peer.
func Dial(base string, tlsCfg *tls.Config, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	creds := insecure.NewCredentials()
	switch {
	case u.Scheme == "https" && tlsCfg == nil:
		return nil, fmt.Errorf("%s: an https URL needs the mesh's TLS (…_MTLS_* variables)", base)
	case u.Scheme == "https":
		creds = credentials.NewTLS(tlsCfg)
	case u.Scheme != "http":
		return nil, fmt.Errorf("%s: not an http(s) URL", base)
	}
	return grpc.NewClient("passthrough:///"+u.Host, append(opts,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		grpc.WithInitialWindowSize(linkWindow), grpc.WithInitialConnWindowSize(linkWindow))...)
}

// linkWindow is the HTTP/2 flow-control window of the mesh's links, both ways, per
// stream and per connection. Set, it turns off grpc-go's window estimation, whose
// pings and window updates are frames (and often writes) of their own on every link
// that carries a request at a time; 8 MiB covers a link's bandwidth-delay product
// many times over on a LAN.
const linkWindow = 8 << 20

// ServerOptions are what a grpc-go server behind a Listener needs for the links Dial
// makes: their pings allowed.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.InitialWindowSize(linkWindow), grpc.InitialConnWindowSize(linkWindow),
	}
}
