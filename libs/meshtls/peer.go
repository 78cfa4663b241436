package meshtls

import (
	"context"
	"crypto/x509"
	"errors"
	"net"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// How a handler learns who is on the other end of a TLS connection that the
// listener terminated: net/http servers put the connection into each request's context
// (WithConn from http.Server.ConnContext); grpc-go servers report its state through
// TerminatedCredentials.

type connKey struct{}

// WithConn is for http.Server.ConnContext: requests on c can find its TLS state.
func WithConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// VerifiedChains are the client's certificate chains that the server verified, for a
// request served on a TLS connection (nil otherwise).
func VerifiedChains(ctx context.Context) [][]*x509.Certificate {
	if c, ok := ctx.Value(connKey{}).(net.Conn); ok {
		if st := ConnState(c); st != nil {
			return st.VerifiedChains
		}
		return nil
	}
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			return ti.State.VerifiedChains
		}
	}
	return nil
}

// CommonName is the subject common name of the client's verified certificate (etcd's
// AuthInfoFromTLS: the first verified chain's leaf), or "".
func CommonName(ctx context.Context) string {
	for _, chain := range VerifiedChains(ctx) {
		if len(chain) > 0 {
			return chain[0].Subject.CommonName
		}
	}
	return ""
}

// TerminatedCredentials are grpc-go server credentials for connections whose TLS the
// listener has already terminated: they only report the connection's TLS state, so
// that peer.FromContext shows the client's certificate. Plaintext connections pass as
// they are.
func TerminatedCredentials() credentials.TransportCredentials { return terminated{} }

type terminated struct{}

func (terminated) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	st := ConnState(c)
	if st == nil {
		return c, plaintextInfo{credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
	}
	return c, credentials.TLSInfo{State: *st, CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (terminated) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errServerOnly
}

func (terminated) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (t terminated) Clone() credentials.TransportCredentials { return t }

func (terminated) OverrideServerName(string) error { return nil }

type plaintextInfo struct{ credentials.CommonAuthInfo }

func (plaintextInfo) AuthType() string { return "insecure" }

var errServerOnly = errors.New("meshtls: terminated credentials only serve")
