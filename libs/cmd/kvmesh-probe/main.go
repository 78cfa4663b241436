// Command kvmesh-probe is the health check of kvmesh's container images, which are
// built from scratch and so have no shell, curl or wget: it GETs each URL and exits 0
// when every one answers 200, 1 otherwise (printing what it got).
//
//	kvmesh-probe http://127.0.0.1:2390/readyz
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kvmesh-probe URL...")
		os.Exit(2)
	}
	client := &http.Client{Timeout: 5 * time.Second}
	failed := false
	for _, url := range os.Args[1:] {
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
