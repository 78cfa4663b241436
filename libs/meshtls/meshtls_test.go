package meshtls

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCheckLoopback(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:2379": true, "127.0.0.2:1": true, "[::1]:2379": true, "localhost:2379": true,
		"0.0.0.0:2379": false, ":2379": false, "10.1.2.3:2379": false, "[::]:2379": false, "example.com:2379": false,
	} {
		err := CheckLoopback("KVMESH_X_LISTEN", "KVMESH_X_ALLOW_PLAINTEXT", addr)
		if (err == nil) != ok {
			t.Errorf("%s: %v, want allowed=%v", addr, err, ok)
		}
		if err != nil && !strings.Contains(err.Error(), "KVMESH_X_ALLOW_PLAINTEXT=true") {
			t.Errorf("%s: %v does not say how to allow it", addr, err)
		}
	}
	if _, err := Listen("KVMESH_X_LISTEN", "KVMESH_X_ALLOW_PLAINTEXT", "0.0.0.0:0", nil, false); err == nil {
		t.Error("a plaintext listener off loopback started")
	}
	lis, err := Listen("KVMESH_X_LISTEN", "KVMESH_X_ALLOW_PLAINTEXT", "0.0.0.0:0", nil, true)
	if err != nil {
		t.Fatalf("allowed plaintext: %v", err)
	}
	lis.Close()
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{}).Validate("KVMESH_X_"); err != nil {
		t.Errorf("nothing set: %v", err)
	}
	err := (Config{CertFile: "c.pem"}).Validate("KVMESH_X_")
	if err == nil || !strings.Contains(err.Error(), "KVMESH_X_MTLS_KEY_FILE") || !strings.Contains(err.Error(), "KVMESH_X_MTLS_CA_FILE") {
		t.Errorf("half set: %v", err)
	}
	if m, err := (Config{}).Load("KVMESH_X_"); m != nil || err != nil || m.ServerConfig() != nil || m.ClientConfig() != nil {
		t.Errorf("nothing set loads %v, %v", m, err)
	}
}

// writeCert writes a self-signed certificate with common name cn.
func writeCert(t *testing.T, certFile, keyFile, cn string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestKeyPairRotation(t *testing.T) {
	dir := t.TempDir()
	cf, kf := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	writeCert(t, cf, kf, "first")
	kp, err := NewKeyPair(cf, kf)
	if err != nil {
		t.Fatal(err)
	}
	cn := func() string {
		c, _ := kp.GetCertificate(nil)
		x, err := x509.ParseCertificate(c.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		return x.Subject.CommonName
	}
	if got := cn(); got != "first" {
		t.Fatalf("cn %q", got)
	}
	// A broken rotation keeps the last good pair.
	os.WriteFile(cf, []byte("garbage"), 0o644)
	os.Chtimes(cf, time.Now().Add(time.Minute), time.Now().Add(time.Minute))
	time.Sleep(1100 * time.Millisecond)
	if got := cn(); got != "first" {
		t.Fatalf("after a broken rotation: cn %q", got)
	}
	writeCert(t, cf, kf, "second")
	os.Chtimes(cf, time.Now().Add(2*time.Minute), time.Now().Add(2*time.Minute))
	time.Sleep(1100 * time.Millisecond)
	if got := cn(); got != "second" {
		t.Fatalf("after rotation: cn %q", got)
	}
}

type wrapped struct{ net.Conn }

func (w wrapped) NetConn() net.Conn { return w.Conn }

func TestConnStateThroughWrappers(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if ConnState(wrapped{a}) != nil {
		t.Error("plaintext connection has a TLS state")
	}
	tc := tls.Client(a, &tls.Config{InsecureSkipVerify: true})
	if ConnState(wrapped{wrapped{tc}}) == nil {
		t.Error("TLS state not found under two wrappers")
	}
}
