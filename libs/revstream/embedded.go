package revstream

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/kvmesh/kvmesh/libs/meshtls"
)

// MaxPayload is the largest message the embedded server accepts (NATS's default is
// 1 MiB; etcd's requests alone go up to 1.5 MiB).
const MaxPayload = 8 << 20

// Embedded is a NATS server with JetStream inside this process (the all-in-one's and
// the tests'). Its store is on disk, so the stream survives restarts.
type Embedded struct {
	*server.Server
}

// StartEmbedded starts a NATS server with JetStream storing under dir. listen is
// host:port for clients, or empty to accept in-process connections only. With tlsCfg
// (the mesh's mutual TLS) network clients must present a certificate from the cluster
// CA; without it, listen must be a loopback address unless allowPlaintext.
// In-process connections never use TLS.
func StartEmbedded(dir, listen string, tlsCfg *tls.Config, allowPlaintext bool, log *slog.Logger) (*Embedded, error) {
	opts := &server.Options{
		ServerName: "kvmesh-embedded",
		JetStream:  true,
		StoreDir:   dir,
		MaxPayload: MaxPayload,
		NoSigs:     true,
		DontListen: listen == "",
	}
	if listen != "" {
		if tlsCfg == nil && !allowPlaintext {
			if err := meshtls.CheckLoopback("KVMESH_NATS_EMBEDDED_LISTEN", "KVMESH_REPLICA_ALLOW_PLAINTEXT", listen); err != nil {
				return nil, err
			}
		}
		if tlsCfg != nil {
			opts.TLSConfig, opts.TLS, opts.TLSVerify, opts.TLSTimeout = tlsCfg, true, true, 5
		}
		host, port, err := net.SplitHostPort(listen)
		if err != nil {
			return nil, fmt.Errorf("nats listen address %q: %w", listen, err)
		}
		opts.Host = host
		if opts.Port, err = strconv.Atoi(port); err != nil {
			return nil, fmt.Errorf("nats listen address %q: %w", listen, err)
		}
		if opts.Port == 0 {
			opts.Port = server.RANDOM_PORT
		}
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats: %w", err)
	}
	s.SetLoggerV2(natsLogger{log.With("component", "nats")}, false, false, false)
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("nats: embedded server not ready within 30s")
	}
	return &Embedded{s}, nil
}

// Stop shuts the server down and waits for it.
func (e *Embedded) Stop() {
	e.Shutdown()
	e.WaitForShutdown()
}

type natsLogger struct{ log *slog.Logger }

func (l natsLogger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l natsLogger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l natsLogger) Fatalf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l natsLogger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l natsLogger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l natsLogger) Tracef(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
