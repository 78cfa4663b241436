package authz

import (
	"context"
	"net/url"
	"strconv"
	"strings"

	replicav1 "github.com/kvmesh/kvmesh/api/gen/kvmesh/replica/v1"
)

// MetadataKey is the metadata (gRPC) or header (Connect) a gateway sends the stamp of
// its decision in: "<revision>:<enabled 0|1>:<url-escaped user>".
const MetadataKey = "kvmesh-auth"

// Decision is what a gateway sends with a request it checked: the state it checked it
// with, and the user it runs as ("" for none).
type Decision struct {
	Stamp *replicav1.AuthStamp
	User  string
	// encoded caches Encode (set by WithDecision).
	encoded string
}

// Encode is the metadata value of d.
func (d Decision) Encode() string {
	if d.encoded != "" {
		return d.encoded
	}
	en := "0"
	if d.Stamp.GetEnabled() {
		en = "1"
	}
	return strconv.FormatUint(d.Stamp.GetRevision(), 10) + ":" + en + ":" + url.QueryEscape(d.User)
}

// Decode parses a metadata value; ok is false if it is malformed.
func Decode(v string) (d Decision, ok bool) {
	parts := strings.SplitN(v, ":", 3)
	if len(parts) != 3 || (parts[1] != "0" && parts[1] != "1") {
		return Decision{}, false
	}
	rev, err := strconv.ParseUint(parts[0], 10, 64)
	if err != nil {
		return Decision{}, false
	}
	u, err := url.QueryUnescape(parts[2])
	if err != nil {
		return Decision{}, false
	}
	return Decision{Stamp: &replicav1.AuthStamp{Revision: rev, Enabled: parts[1] == "1"}, User: u, encoded: v}, true
}

type decisionKey struct{}

// WithDecision carries a decision in a context.
func WithDecision(ctx context.Context, d Decision) context.Context {
	if d.encoded == "" {
		d.encoded = d.Encode()
	}
	return context.WithValue(ctx, decisionKey{}, d)
}

// DecisionFrom is the decision a context carries, if any.
func DecisionFrom(ctx context.Context) (Decision, bool) {
	d, ok := ctx.Value(decisionKey{}).(Decision)
	return d, ok
}
