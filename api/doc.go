// Package api is kvmesh's client-side module, as etcd's api module is: the wire types
// of every API kvmesh serves (gen/: etcd's etcdserverpb, mvccpb, authpb, v3lockpb and
// v3electionpb, and kvmesh's own kvmesh.*.v1) with their Connect and grpc-go clients,
// generated from proto/ by scripts/generate.sh. It pulls in no server: a client that
// imports it links neither Pebble, nor a NATS server, nor anything of the replicas.
package api
