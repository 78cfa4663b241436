// Command etcdctl is upstream etcd's etcdctl, built from the Go module proxy at the
// version pinned in this directory's go.mod: the end-to-end tests check that its
// commands (snapshot save above all) work against kvmesh as they do against etcd.
package main

import "go.etcd.io/etcd/etcdctl/v3/ctlv3"

func main() { ctlv3.MustStart() }
