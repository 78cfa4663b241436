// Package revstream is the contract between the fanout, which publishes every committed
// revision to NATS JetStream, and the gateways, which consume it to serve watches.
//
// The stream holds one message per revision, its body a kvmesh.replica.v1.Revision in
// protobuf, its "Kvmesh-Revision" header the revision. Consecutive messages carry
// consecutive revisions: the fanout publishes revision r+1 only with JetStream's
// expected-last-sequence set to the sequence of revision r, so a second fanout, a
// restarted one or a retried publish can never insert a duplicate, reorder the stream
// or leave a hole in it. A reader therefore finds revision r at sequence
// r - (lastRev - lastSeq), and checks the header of what it reads. Beside the stream, a
// key-value bucket holds what makes no revision of its own: the compacted revision and
// the auth store's revision (state.go).
package revstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/proto"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
)

// Config is where the stream lives and how much of it is kept, from KVMESH_NATS_…
// variables (shared by the fanout, the gateways and the all-in-one).
type Config struct {
	// URL is the NATS server. Empty in the all-in-one means its embedded server.
	URL string `env:"URL"`
	// EmbeddedListen is where the all-in-one's embedded server accepts NATS clients
	// (host:port); empty means in-process connections only.
	EmbeddedListen string `env:"EMBEDDED_LISTEN"`
	// Stream and Subject name the JetStream stream of revisions.
	Stream  string `env:"STREAM, default=KVMESH_REVISIONS"`
	Subject string `env:"SUBJECT, default=kvmesh.revisions"`
	// MaxMsgs, MaxBytes and MaxAge bound the stream; the oldest revisions go first.
	// A watcher starting before what the stream keeps catches up from a replica.
	MaxMsgs  int64         `env:"MAX_MSGS, default=1000000"`
	MaxBytes int64         `env:"MAX_BYTES, default=1073741824"`
	MaxAge   time.Duration `env:"MAX_AGE, default=24h"`
}

// Validate checks the configuration; errors name the variable.
func (c *Config) Validate() error {
	switch {
	case c.Stream == "":
		return errors.New("KVMESH_NATS_STREAM: must not be empty")
	case c.Subject == "":
		return errors.New("KVMESH_NATS_SUBJECT: must not be empty")
	case c.MaxMsgs <= 0:
		return errors.New("KVMESH_NATS_MAX_MSGS: must be positive")
	case c.MaxBytes <= 0:
		return errors.New("KVMESH_NATS_MAX_BYTES: must be positive")
	case c.MaxAge <= 0:
		return errors.New("KVMESH_NATS_MAX_AGE: must be positive")
	}
	return nil
}

// HeaderRevision carries the revision of a message.
const HeaderRevision = "Kvmesh-Revision"

// Connect connects to the NATS server at url, reconnecting for ever; over TLS with
// tlsCfg (the mesh's mutual TLS) when it is set.
func Connect(url, name string, tlsCfg *tls.Config, opts ...nats.Option) (*nats.Conn, error) {
	if tlsCfg != nil {
		opts = append(opts, nats.Secure(tlsCfg))
	}
	opts = append([]nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
	}, opts...)
	return nats.Connect(url, opts...)
}

// Ensure creates the stream, or updates its limits to the configuration.
func Ensure(ctx context.Context, js jetstream.JetStream, c Config) (jetstream.Stream, error) {
	s, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        c.Stream,
		Description: "kvmesh: one message per committed revision",
		Subjects:    []string{c.Subject},
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		Storage:     jetstream.FileStorage,
		MaxMsgs:     c.MaxMsgs,
		MaxBytes:    c.MaxBytes,
		MaxAge:      c.MaxAge,
		Duplicates:  2 * time.Minute,
	})
	if err != nil {
		return nil, fmt.Errorf("nats: stream %s: %w", c.Stream, err)
	}
	return s, nil
}

// Tail is the end of the stream: its last sequence and, when that message is still
// kept, its revision (0 otherwise).
type Tail struct {
	Seq uint64
	Rev int64
}

// Offset is what turns a revision into its sequence (seq = rev - Offset); valid when
// Rev is known.
func (t Tail) Offset() int64 { return t.Rev - int64(t.Seq) }

// LastOf reads the end of the stream.
func LastOf(ctx context.Context, s jetstream.Stream) (Tail, error) {
	info, err := s.Info(ctx)
	if err != nil {
		return Tail{}, err
	}
	t := Tail{Seq: info.State.LastSeq}
	if t.Seq == 0 || info.State.Msgs == 0 {
		return t, nil
	}
	m, err := s.GetMsg(ctx, t.Seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return t, nil
	}
	if err != nil {
		return Tail{}, err
	}
	t.Rev, err = revisionOf(m.Header)
	return t, err
}

func revisionOf(h nats.Header) (int64, error) {
	v := h.Get(HeaderRevision)
	r, err := strconv.ParseInt(v, 10, 64)
	if err != nil || r <= 0 {
		return 0, fmt.Errorf("nats: message without a valid %s header (%q)", HeaderRevision, v)
	}
	return r, nil
}

// Message encodes one revision. A revision larger than maxPayload (less room for the
// headers) goes out as a too_large marker without events; readers fetch it from a
// replica; tooLarge reports it.
func Message(subject string, r *replicav1.Revision, maxPayload int64) (m *nats.Msg, tooLarge bool, err error) {
	data, err := proto.Marshal(r)
	if err != nil {
		return nil, false, err
	}
	if int64(len(data)) > maxPayload-1024 {
		tooLarge = true
		data, err = proto.Marshal(&replicav1.Revision{Revision: r.GetRevision(), CompactRevision: r.GetCompactRevision(), TooLarge: true})
		if err != nil {
			return nil, false, err
		}
	}
	m = nats.NewMsg(subject)
	m.Header.Set(HeaderRevision, strconv.FormatInt(r.GetRevision(), 10))
	m.Data = data
	return m, tooLarge, nil
}

// Decode reads a revision from a stream message and checks it against its header.
func Decode(h nats.Header, data []byte) (*replicav1.Revision, error) {
	rev, err := revisionOf(h)
	if err != nil {
		return nil, err
	}
	r := &replicav1.Revision{}
	if err := proto.Unmarshal(data, r); err != nil {
		return nil, fmt.Errorf("nats: decode revision %d: %w", rev, err)
	}
	if r.GetRevision() != rev {
		return nil, fmt.Errorf("nats: message of revision %d holds revision %d", rev, r.GetRevision())
	}
	return r, nil
}
