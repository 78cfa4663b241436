// Command kvmesh-probe is the health check of kvmesh's container images, which are
// built from scratch and so have no shell, curl or wget: it GETs each URL and exits 0
// when every one answers 200, 1 otherwise (printing what it got). https:// URLs are
// called with the CA and the client certificate given (a mesh's mutual TLS).
//
//	kvmesh-probe http://127.0.0.1:2390/readyz
//	kvmesh-probe -cacert ca.pem -cert replica.pem -key replica-key.pem https://127.0.0.1:2390/readyz
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	cacert := flag.String("cacert", "", "CA certificate (PEM) to check an https server with")
	cert := flag.String("cert", "", "client certificate (PEM) for https")
	key := flag.String("key", "", "client key (PEM) for https")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, "usage: kvmesh-probe [-cacert F -cert F -key F] URL...") }
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	tlsCfg, err := clientTLS(*cacert, *cert, *key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kvmesh-probe:", err)
		os.Exit(2)
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsCfg}}
	failed := false
	for _, url := range flag.Args() {
		if err := probe(client, url); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", url, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}

func probe(client *http.Client, url string) error {
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

func clientTLS(cacert, cert, key string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if cacert != "" {
		b, err := os.ReadFile(cacert)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s: no PEM certificate", cacert)
		}
	}
	if cert != "" || key != "" {
		c, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg, nil
}
