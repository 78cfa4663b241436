// Package h2c builds the HTTP servers and clients every kvmesh link uses: HTTP/1.1 and
// cleartext HTTP/2 on one port, so gRPC (which needs HTTP/2), gRPC-Web and Connect all
// work, with bidi streams. Servers set only a header timeout: read and write timeouts
// would cut long watch and keepalive streams.
package h2c

import (
	"crypto/tls"
	"net"
	"net/http"
	"time"
)

// NewServer returns a server for handler that speaks HTTP/1.1 and h2c.
func NewServer(handler http.Handler) *http.Server {
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &http.Server{
		Handler:           handler,
		Protocols:         p,
		ReadHeaderTimeout: 10 * time.Second,
		HTTP2: &http.HTTP2Config{
			// etcd lets one connection carry practically unlimited streams; clients
			// such as clientv3 multiplex everything over one connection.
			MaxConcurrentStreams: 1 << 20,
		},
	}
}

// NewClient returns a client that speaks HTTP/2 to every server: h2c (prior knowledge)
// to http:// URLs, and over TLS with tlsCfg (the mesh's mutual TLS) to https:// ones.
func NewClient(tlsCfg *tls.Config) *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	p.SetHTTP2(true)
	return &http.Client{Transport: &http.Transport{
		Protocols:       p,
		TLSClientConfig: tlsCfg,
		DialContext:     (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		HTTP2:           &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 5 * time.Second},
	}}
}
