// Package meshtls is the TLS of kvmesh's links: mutual TLS between the services (a
// replica's internal and peer port, the gateways' and the fanout's calls to it, the
// fanout's health port, NATS), and the server side of the gateways' client TLS.
//
// Every service has one identity in the mesh: a certificate and key signed by the
// cluster CA, used both to serve and to call. A server asks every caller for a
// certificate the cluster CA signed and refuses the connection otherwise; a caller
// checks the server's certificate against the same CA and the host in the URL.
// Certificates are read again when their files change (checked at most once a
// second), so they can be rotated without a restart, as etcd does.
//
// Plaintext is for loopback development only: a listener on any other address needs
// TLS, or an explicit KVMESH_…_ALLOW_PLAINTEXT=true.
package meshtls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// Config is a service's mesh identity, from KVMESH_<ROLE>_MTLS_… variables (the
// service's own prefix), and whether its listeners may be plaintext off loopback.
type Config struct {
	// CertFile and KeyFile are the service's certificate (PEM, with any intermediates)
	// and its key; the certificate serves and calls, so it needs both the server and the
	// client extended key usage, and the names or IPs the others dial it by.
	CertFile string `env:"MTLS_CERT_FILE"`
	KeyFile  string `env:"MTLS_KEY_FILE"`
	// CAFile is the cluster CA (PEM): the only issuer of peers' certificates trusted.
	CAFile string `env:"MTLS_CA_FILE"`
	// AllowPlaintext lets a plaintext listener bind a non-loopback address (a
	// development mesh in containers, say). Off, such a listener refuses to start.
	AllowPlaintext bool `env:"ALLOW_PLAINTEXT, default=false"`
}

// Enabled tells whether mutual TLS is configured.
func (c Config) Enabled() bool { return c.CertFile != "" || c.KeyFile != "" || c.CAFile != "" }

// Validate checks that the files are all named or none; prefix names the variables.
func (c Config) Validate(prefix string) error {
	if !c.Enabled() {
		return nil
	}
	var errs []error
	for _, f := range []struct{ name, v string }{{"MTLS_CERT_FILE", c.CertFile}, {"MTLS_KEY_FILE", c.KeyFile}, {"MTLS_CA_FILE", c.CAFile}} {
		if f.v == "" {
			errs = append(errs, fmt.Errorf("%s%s: must be set with the other %sMTLS_… files", prefix, f.name, prefix))
		}
	}
	return errors.Join(errs...)
}

// Load reads the files: nil (plaintext) when none is configured.
func (c Config) Load(prefix string) (*Mesh, error) {
	if err := c.Validate(prefix); err != nil || !c.Enabled() {
		return nil, err
	}
	pool, err := LoadPool(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("%sMTLS_CA_FILE: %w", prefix, err)
	}
	kp, err := NewKeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%sMTLS_CERT_FILE/%sMTLS_KEY_FILE: %w", prefix, prefix, err)
	}
	return &Mesh{pair: kp, pool: pool}, nil
}

// Mesh is a loaded identity. A nil *Mesh is plaintext.
type Mesh struct {
	pair *KeyPair
	pool *x509.CertPool
}

// nextProtos are what kvmesh's servers offer through ALPN: HTTP/2 first (gRPC needs
// it), HTTP/1.1 for the rest.
var nextProtos = []string{"h2", "http/1.1"}

// ServerConfig asks every client for a certificate from the cluster CA.
func (m *Mesh) ServerConfig() *tls.Config {
	if m == nil {
		return nil
	}
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: m.pair.GetCertificate,
		ClientCAs:      m.pool,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		NextProtos:     nextProtos,
	}
}

// ClientConfig presents the service's certificate and trusts only the cluster CA.
func (m *Mesh) ClientConfig() *tls.Config {
	if m == nil {
		return nil
	}
	return &tls.Config{
		MinVersion:           tls.VersionTLS12,
		GetClientCertificate: m.pair.GetClientCertificate,
		RootCAs:              m.pool,
		NextProtos:           nextProtos,
	}
}

// LoadPool reads a PEM file of CA certificates.
func LoadPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", file)
	}
	return pool, nil
}

// KeyPair is a certificate and key read from files, read again when either changes.
type KeyPair struct {
	certFile, keyFile string

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   [2]time.Time // the files' modification times when read
	checked time.Time
}

// NewKeyPair reads the pair; an error names what is wrong with the files.
func NewKeyPair(certFile, keyFile string) (*KeyPair, error) {
	kp := &KeyPair{certFile: certFile, keyFile: keyFile}
	if err := kp.load(); err != nil {
		return nil, err
	}
	return kp, nil
}

func (kp *KeyPair) load() error {
	var stamp [2]time.Time
	for i, f := range []string{kp.certFile, kp.keyFile} {
		st, err := os.Stat(f)
		if err != nil {
			return err
		}
		stamp[i] = st.ModTime()
	}
	cert, err := tls.LoadX509KeyPair(kp.certFile, kp.keyFile)
	if err != nil {
		return err
	}
	kp.cert, kp.stamp = &cert, stamp
	return nil
}

// current returns the certificate, reading the files again when they changed. A
// rotation that leaves them unreadable (half written, say) keeps the last good pair.
func (kp *KeyPair) current() *tls.Certificate {
	kp.mu.Lock()
	defer kp.mu.Unlock()
	now := time.Now()
	if now.Sub(kp.checked) < time.Second {
		return kp.cert
	}
	kp.checked = now
	for i, f := range []string{kp.certFile, kp.keyFile} {
		if st, err := os.Stat(f); err == nil && !st.ModTime().Equal(kp.stamp[i]) {
			_ = kp.load() // on failure the last good pair stays
			break
		}
	}
	return kp.cert
}

// GetCertificate is for tls.Config.GetCertificate.
func (kp *KeyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return kp.current(), nil
}

// GetClientCertificate is for tls.Config.GetClientCertificate.
func (kp *KeyPair) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return kp.current(), nil
}

// Listen binds addr for a server: with TLS when cfg is set; in plaintext only on a
// loopback address, unless allowPlaintext. name is the variable that set addr,
// allowName the variable that allows plaintext.
func Listen(name, allowName, addr string, cfg *tls.Config, allowPlaintext bool) (net.Listener, error) {
	if cfg == nil && !allowPlaintext {
		if err := CheckLoopback(name, allowName, addr); err != nil {
			return nil, err
		}
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if cfg != nil {
		lis = tls.NewListener(lis, cfg)
	}
	return lis, nil
}

// CheckLoopback refuses a plaintext listener off loopback: the address must be a
// loopback IP or "localhost".
func CheckLoopback(name, allowName, addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("%s: %q is not a loopback address, and plaintext is for loopback only: configure TLS, or set %s=true for a development setup",
		name, addr, allowName)
}

// ClientFacing is the TLS of a server that etcd clients reach (the gateway's), as
// etcd's --cert-file, --key-file, --trusted-ca-file and --client-cert-auth: with
// clientCertAuth every client must present a certificate that trustedCA signed; without
// it, client certificates are not asked for.
func ClientFacing(certFile, keyFile, trustedCA string, clientCertAuth bool) (*tls.Config, error) {
	kp, err := NewKeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: kp.GetCertificate, NextProtos: nextProtos}
	if trustedCA != "" {
		if cfg.ClientCAs, err = LoadPool(trustedCA); err != nil {
			return nil, err
		}
	}
	if clientCertAuth {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// ConnState finds the TLS state under a connection that wrappers (such as the
// listener that routes gRPC and HTTP on one port) may hide, after its handshake; nil
// for a plaintext connection.
func ConnState(c net.Conn) *tls.ConnectionState {
	for c != nil {
		switch t := c.(type) {
		case *tls.Conn:
			st := t.ConnectionState()
			return &st
		case interface{ NetConn() net.Conn }:
			c = t.NetConn()
		default:
			return nil
		}
	}
	return nil
}
