// Command kvmesh-devca makes a development CA and certificates signed by it, for the
// mesh's mutual TLS and the gateways' client TLS. Not for production: the CA's key sits
// beside the certificates, unencrypted.
//
//	kvmesh-devca -dir certs replica-1 replica-2 gateway fanout nats root alice
//
// makes certs/ca.pem and certs/ca-key.pem (kept when they exist), and for each name
// certs/NAME.pem and certs/NAME-key.pem (kept when they exist, unless -force): common
// name NAME (the user, for a client certificate the gateway accepts with
// KVMESH_GATEWAY_CLIENT_CERT_AUTH), usable to serve and to call, valid for NAME,
// localhost, 127.0.0.1, ::1 and the -hosts.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

func main() {
	dir := flag.String("dir", "certs", "where the CA and the certificates go")
	hosts := flag.String("hosts", "", "more DNS names or IPs every certificate is valid for, comma-separated")
	days := flag.Int("days", 825, "how long the certificates are valid")
	force := flag.Bool("force", false, "remake the certificates that exist (not the CA)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: kvmesh-devca [-dir DIR] [-hosts h1,h2] [-days N] [-force] NAME...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*dir, splitList(*hosts), *days, *force, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh-devca:", err)
		os.Exit(1)
	}
}

func splitList(s string) []string {
	var out []string
	for _, h := range strings.Split(s, ",") {
		if h = strings.TrimSpace(h); h != "" {
			out = append(out, h)
		}
	}
	return out
}

func run(dir string, hosts []string, days int, force bool, names []string) error {
	if days <= 0 {
		return errors.New("-days must be positive")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	ca, caKey, err := loadOrMakeCA(dir)
	if err != nil {
		return err
	}
	for _, name := range names {
		if name == "" || strings.ContainsAny(name, "/\\") || name == "ca" {
			return fmt.Errorf("%q: not a usable name", name)
		}
		cert, key := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
		if !force && exists(cert) && exists(key) {
			fmt.Printf("kept %s\n", cert)
			continue
		}
		if err := makeLeaf(ca, caKey, name, hosts, days, cert, key); err != nil {
			return err
		}
		fmt.Printf("made %s\n", cert)
	}
	return nil
}

func exists(f string) bool {
	_, err := os.Stat(f)
	return err == nil
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func loadOrMakeCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if exists(certFile) && exists(keyFile) {
		cb, err := readPEM(certFile, "CERTIFICATE")
		if err != nil {
			return nil, nil, err
		}
		cert, err := x509.ParseCertificate(cb)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", certFile, err)
		}
		kb, err := readPEM(keyFile, "EC PRIVATE KEY")
		if err != nil {
			return nil, nil, err
		}
		key, err := x509.ParseECPrivateKey(kb)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", keyFile, err)
		}
		return cert, key, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: "kvmesh development CA", Organization: []string{"kvmesh"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	if err := writeKey(keyFile, key); err != nil {
		return nil, nil, err
	}
	if err := writePEM(certFile, "CERTIFICATE", der, 0o644); err != nil {
		return nil, nil, err
	}
	fmt.Printf("made %s\n", certFile)
	return cert, key, nil
}

func makeLeaf(ca *x509.Certificate, caKey *ecdsa.PrivateKey, name string, hosts []string, days int, certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	sn, err := serial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: name, Organization: []string{"kvmesh"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(0, 0, days),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range append([]string{name, "localhost", "127.0.0.1", "::1"}, hosts...) {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writeKey(keyFile, key); err != nil {
		return err
	}
	return writePEM(certFile, "CERTIFICATE", der, 0o644)
}

func writeKey(file string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(file, "EC PRIVATE KEY", der, 0o600)
}

// writePEM writes through a temporary file and a rename, so a reader (a service
// reloading its certificate) never sees half a file.
func writePEM(file, typ string, der []byte, mode os.FileMode) error {
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

func readPEM(file, typ string) ([]byte, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != typ {
		return nil, fmt.Errorf("%s: no %s PEM block", file, typ)
	}
	return blk.Bytes, nil
}
