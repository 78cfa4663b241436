package watch

import (
	"bytes"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/kvmesh/kvmesh/api/gen/etcdserverpb"
	"github.com/kvmesh/kvmesh/api/gen/mvccpb"
	"github.com/kvmesh/kvmesh/services/gateway/namespace"
)

// Watch responses in wire form. A put to a key with 100,000 watchers is 100,000
// responses that differ only in watch_id; marshaling each one whole was a fifth of the
// gateway's CPU. Over gRPC a stream encodes each event and each header once and
// writes every watcher's response as header, watch_id and events side by side: the
// bytes proto.Marshal would produce (WatchResponse's fields in number order).

// EncodedMsg is a message already in protobuf wire form; grpcCodec sends it as it is.
type EncodedMsg []byte

// grpcCodec is grpc-go's protobuf codec that also sends EncodedMsg.
type grpcCodec struct{ encoding.CodecV2 }

// Codec is the codec a grpc-go server of Watch needs (grpc.ForceServerCodecV2): grpc-go's
// protobuf codec, which also sends an EncodedMsg as it is.
func Codec() encoding.CodecV2 { return grpcCodec{encoding.GetCodecV2(grpcproto.Name)} }

func (c grpcCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(EncodedMsg); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return c.CodecV2.Marshal(v)
}

// wireCache is a stream's encoded headers and events. Events are encoded in the
// namespace of the last watcher that asked (see package namespace); a stream's watchers
// share one namespace unless a user's changes meanwhile, so that is the one encoding.
type wireCache struct {
	hdr    pb.ResponseHeader
	hdrEnc []byte
	prefix []byte
	events map[*mvccpb.Event][]byte
}

// maxCachedEvents bounds wireCache.events; it starts over when full.
const maxCachedEvents = 256

// header returns the encoding of a ResponseHeader with these fields.
func (c *wireCache) header(clusterID, memberID uint64, rev int64) []byte {
	if c.hdrEnc == nil || c.hdr.Revision != rev || c.hdr.ClusterId != clusterID || c.hdr.MemberId != memberID {
		c.hdr.Revision, c.hdr.ClusterId, c.hdr.MemberId = rev, clusterID, memberID
		b, err := proto.Marshal(&c.hdr)
		if err != nil {
			panic(err) // a ResponseHeader has no field that fails to marshal
		}
		c.hdrEnc = b
	}
	return c.hdrEnc
}

// event returns the encoding of ev with its keys out of the namespace p.
func (c *wireCache) event(p []byte, ev *mvccpb.Event) []byte {
	if !bytes.Equal(p, c.prefix) {
		c.prefix, c.events = p, nil
	}
	if b, ok := c.events[ev]; ok {
		return b
	}
	if c.events == nil || len(c.events) >= maxCachedEvents {
		c.events = make(map[*mvccpb.Event][]byte)
	}
	b, err := proto.Marshal(namespace.EventOut(p, ev))
	if err != nil {
		panic(err) // an Event has no field that fails to marshal
	}
	c.events[ev] = b
	return b
}

// encode returns WatchResponse{Header: hdr, WatchId: id, Events: evs} in wire form,
// hdr being what wireCache.header returned, the events' keys out of the namespace p.
func (c *wireCache) encode(hdr []byte, id int64, p []byte, evs []*mvccpb.Event) EncodedMsg {
	var few [4][]byte
	encs := few[:0]
	size := protowire.SizeTag(1) + protowire.SizeBytes(len(hdr)) + protowire.SizeTag(2) + protowire.SizeVarint(uint64(id))
	for _, ev := range evs {
		e := c.event(p, ev)
		encs = append(encs, e)
		size += protowire.SizeTag(11) + protowire.SizeBytes(len(e))
	}
	b := make([]byte, 0, size)
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, hdr)
	if id != 0 {
		b = protowire.AppendTag(b, 2, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(id))
	}
	for _, e := range encs {
		b = protowire.AppendTag(b, 11, protowire.BytesType)
		b = protowire.AppendBytes(b, e)
	}
	return b
}
