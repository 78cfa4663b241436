package api_test

import (
	"context"
	"fmt"
	"net/http"

	"connectrpc.com/connect"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/etcdserverpb/etcdserverpbconnect"
)

// A put and a get over Connect (JSON here) against a gateway (the all-in-one's
// address); the same client speaks gRPC with connect.WithGRPC() over HTTP/2.
func Example() {
	ctx := context.Background()
	kv := etcdserverpbconnect.NewKVClient(http.DefaultClient, "http://127.0.0.1:2379", connect.WithProtoJSON())
	if _, err := kv.Put(ctx, connect.NewRequest(&pb.PutRequest{Key: []byte("greeting"), Value: []byte("hello")})); err != nil {
		fmt.Println(err)
		return
	}
	resp, err := kv.Range(ctx, connect.NewRequest(&pb.RangeRequest{Key: []byte("greeting")}))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s at revision %d\n", resp.Msg.GetKvs()[0].GetValue(), resp.Msg.GetHeader().GetRevision())
}
