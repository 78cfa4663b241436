// Command loadtest is a load generator for the etcd v3 KV API, modelled on
// etcd's `benchmark` tool. It speaks gRPC over plaintext HTTP/2, like any
// etcd client, so the same run can target kvmesh and a real etcd.
//
//	loadtest [global flags] put   [--key-size=8] [--val-size=256] [--total=10000] [--sequential-keys] [--key-space-size=1]
//	loadtest [global flags] range KEY [RANGE_END] [--total=10000] [--consistency=l|s] [--limit=0]
//	loadtest [global flags] watch [--watchers=100000] [--streams=100] [--hot] [--rates=1000] [--step=10s] [--server-pids=PID,…]
//	loadtest [global flags] lease-keepalive [--total=10000] [--ttl=100] [--leases-per-client=1] [--once]
//	loadtest [global flags] mixed [--total=10000] [--key-space-size=1000] [--get=50] [--put=25] [--cas=15] [--delete=10]
//
// Global flags may also be given after the subcommand.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvmesh/kvmesh/loadtest/internal/bench"
	"golang.org/x/term"
)

type globalFlags struct {
	endpoints  string
	conns      int
	clients    int
	precise    bool
	json       bool
	duration   time.Duration
	timeout    time.Duration
	targetName string
	user       string
}

func (g *globalFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&g.endpoints, "endpoints", "127.0.0.1:2379", "comma-separated host:port list; connections are spread over them")
	fs.IntVar(&g.conns, "conns", 1, "number of TCP connections")
	fs.IntVar(&g.clients, "clients", 1, "number of concurrent clients, spread over the connections")
	fs.BoolVar(&g.precise, "precise", false, "print latencies with full floating point precision")
	fs.BoolVar(&g.json, "json", false, "also print the report as one JSON object on stdout (the text report then goes to stderr)")
	fs.DurationVar(&g.duration, "duration", 0, "run for this long instead of --total requests (if --total is also given, stop at whichever comes first)")
	fs.DurationVar(&g.timeout, "timeout", 10*time.Second, "per-request timeout")
	fs.StringVar(&g.targetName, "target-name", "", "label for the target printed in the report, e.g. kvmesh or etcd")
	fs.StringVar(&g.user, "user", "", "name:password to authenticate each connection with (auth enabled on the server)")
}

const usage = `Usage:
  loadtest [global flags] put   [--key-size=8] [--val-size=256] [--total=10000] [--sequential-keys] [--key-space-size=1]
  loadtest [global flags] range KEY [RANGE_END] [--total=10000] [--consistency=l|s] [--limit=0]
  loadtest [global flags] watch [--watchers=100000] [--streams=100] [--hot] [--rates=1000] [--step=10s] [--server-pids=PID,…]
  loadtest [global flags] lease-keepalive [--total=10000] [--ttl=100] [--leases-per-client=1] [--once]
  loadtest [global flags] mixed [--total=10000] [--key-space-size=1000] [--get=50] [--put=25] [--cas=15] [--delete=10]

Run "loadtest COMMAND -h" for the subcommand flags.

Global flags (also accepted after the subcommand):
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal, restore default handling so a second
		// Ctrl-C kills the process even if requests hang.
		<-ctx.Done()
		stop()
	}()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the CLI and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var g globalFlags
	root := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	root.SetOutput(stderr)
	g.register(root)
	root.Usage = func() {
		fmt.Fprint(stderr, usage)
		root.PrintDefaults()
	}
	if err := root.Parse(args); err != nil {
		return exitCode(err)
	}
	if root.NArg() == 0 {
		root.Usage()
		return 2
	}
	cmd, rest := root.Arg(0), root.Args()[1:]

	var (
		rep *bench.Report
		err error
	)
	switch cmd {
	case "watch":
		return runWatch(ctx, &g, rest, stdout, stderr)
	case "put":
		rep, err = runPut(ctx, &g, rest, stderr)
	case "range":
		rep, err = runRange(ctx, &g, rest, stderr)
	case "lease-keepalive":
		rep, err = runLeaseKeepAlive(ctx, &g, rest, stderr)
	case "mixed":
		rep, err = runMixed(ctx, &g, rest, stderr)
	default:
		fmt.Fprintf(stderr, "loadtest: unknown command %q\n\n", cmd)
		root.Usage()
		return 2
	}
	if err != nil {
		var ue usageError
		if errors.As(err, &ue) || errors.Is(err, flag.ErrHelp) {
			return exitCode(err)
		}
		fmt.Fprintf(stderr, "loadtest %s: %v\n", cmd, err)
		return 1
	}

	return printReport(&g, stdout, stderr, func(w io.Writer) error { return rep.WriteText(w, g.precise) }, rep.WriteJSON, rep.Interrupted)
}

// printReport writes a report's text (to stderr when --json puts the JSON object on
// stdout) and JSON, and returns the exit code: 130 when the run was interrupted (the
// partial report was printed).
func printReport(g *globalFlags, stdout, stderr io.Writer, text, json func(io.Writer) error, interrupted bool) int {
	tw := stdout
	if g.json {
		tw = stderr
	}
	if err := text(tw); err != nil {
		fmt.Fprintf(stderr, "loadtest: %v\n", err)
		return 1
	}
	if g.json {
		if err := json(stdout); err != nil {
			fmt.Fprintf(stderr, "loadtest: %v\n", err)
			return 1
		}
	}
	if interrupted {
		return 130
	}
	return 0
}

// usageError is a command-line error whose message was already printed.
type usageError struct{ error }

func exitCode(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

// parseInterleaved parses flags that may appear before, between or after
// positional arguments (the standard flag package stops at the first
// positional one). Everything after "--" is positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

func newSubFlagSet(name, synopsis string, g *globalFlags, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("loadtest "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage:\n  loadtest [global flags] %s\n\nFlags (subcommand and global):\n", synopsis)
		fs.PrintDefaults()
	}
	// Registering resets the variables to their defaults; keep whatever
	// was already parsed before the subcommand name.
	saved := *g
	g.register(fs)
	*g = saved
	return fs
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

func (g *globalFlags) config(total int64, totalSet bool, stderr io.Writer) bench.Config {
	var eps []string
	for _, ep := range strings.Split(g.endpoints, ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			eps = append(eps, ep)
		}
	}
	cfg := bench.Config{
		Endpoints:  eps,
		Conns:      g.conns,
		Clients:    g.clients,
		Total:      total,
		Duration:   g.duration,
		Timeout:    g.timeout,
		TargetName: g.targetName,
	}
	if g.user != "" {
		cfg.User, cfg.Password, _ = strings.Cut(g.user, ":")
	}
	if g.duration > 0 && !totalSet {
		cfg.Total = 0 // --duration alone: unbounded count
	}
	if f, ok := stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		cfg.Progress = stderr
	}
	return cfg
}

func runPut(ctx context.Context, g *globalFlags, args []string, stderr io.Writer) (*bench.Report, error) {
	fs := newSubFlagSet("put",
		"put [--key-size=8] [--val-size=256] [--total=10000] [--sequential-keys] [--key-space-size=1]", g, stderr)
	keySize := fs.Int("key-size", 8, "key size in bytes")
	valSize := fs.Int("val-size", 256, "value size in bytes")
	total := fs.Int64("total", 10000, "total number of put requests")
	seq := fs.Bool("sequential-keys", false, "use sequential keys: the i-th put writes key i (modulo --key-space-size if that is given)")
	keySpace := fs.Int64("key-space-size", 1, "random keys are drawn from [0, key-space-size)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, usageError{err}
	}
	if len(pos) != 0 {
		fmt.Fprintf(stderr, "loadtest put: unexpected arguments %q\n", pos)
		fs.Usage()
		return nil, usageError{errors.New("unexpected arguments")}
	}
	cfg := g.config(*total, isSet(fs, "total"), stderr)
	opts := bench.PutOptions{
		KeySize:        *keySize,
		ValSize:        *valSize,
		KeySpaceSize:   *keySpace,
		SequentialKeys: *seq,
	}
	if *seq && !isSet(fs, "key-space-size") {
		opts.KeySpaceSize = 0 // unbounded: the i-th put writes key i
	}
	return bench.Put(ctx, cfg, opts)
}

func runRange(ctx context.Context, g *globalFlags, args []string, stderr io.Writer) (*bench.Report, error) {
	fs := newSubFlagSet("range",
		"range KEY [RANGE_END] [--total=10000] [--consistency=l|s] [--limit=0]", g, stderr)
	total := fs.Int64("total", 10000, "total number of range requests")
	consistency := fs.String("consistency", "l", "linearizable (l) or serializable (s)")
	limit := fs.Int64("limit", 0, "maximum number of keys returned per request (0 = no limit)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, usageError{err}
	}
	if len(pos) < 1 || len(pos) > 2 {
		fmt.Fprintln(stderr, "loadtest range: expected KEY [RANGE_END]")
		fs.Usage()
		return nil, usageError{errors.New("bad arguments")}
	}
	cfg := g.config(*total, isSet(fs, "total"), stderr)
	opts := bench.RangeOptions{Key: pos[0], Consistency: *consistency, Limit: *limit}
	if len(pos) == 2 {
		opts.RangeEnd = pos[1]
	}
	return bench.Range(ctx, cfg, opts)
}

func runMixed(ctx context.Context, g *globalFlags, args []string, stderr io.Writer) (*bench.Report, error) {
	fs := newSubFlagSet("mixed",
		"mixed [--total=10000] [--key-space-size=1000] [--get=50] [--put=25] [--cas=15] [--delete=10]", g, stderr)
	total := fs.Int64("total", 10000, "total number of requests")
	var opts bench.MixedOptions
	fs.IntVar(&opts.KeySize, "key-size", 8, "key size in bytes")
	fs.IntVar(&opts.ValSize, "val-size", 256, "value size in bytes")
	fs.Int64Var(&opts.KeySpaceSize, "key-space-size", 1000, "keys are drawn from [0, key-space-size)")
	fs.IntVar(&opts.Get, "get", 50, "weight of gets (linearizable ranges of one key)")
	fs.IntVar(&opts.Put, "put", 25, "weight of puts")
	fs.IntVar(&opts.CAS, "cas", 15, "weight of CAS txns (put if the key holds the benchmark's value)")
	fs.IntVar(&opts.Delete, "delete", 10, "weight of deletes")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, usageError{err}
	}
	if len(pos) != 0 {
		fmt.Fprintf(stderr, "loadtest mixed: unexpected arguments %q\n", pos)
		fs.Usage()
		return nil, usageError{errors.New("unexpected arguments")}
	}
	return bench.Mixed(ctx, g.config(*total, isSet(fs, "total"), stderr), opts)
}

func runLeaseKeepAlive(ctx context.Context, g *globalFlags, args []string, stderr io.Writer) (*bench.Report, error) {
	fs := newSubFlagSet("lease-keepalive", "lease-keepalive [--total=10000] [--ttl=100] [--leases-per-client=1] [--once]", g, stderr)
	total := fs.Int64("total", 10000, "total number of keep-alives")
	var opts bench.LeaseOptions
	fs.Int64Var(&opts.TTL, "ttl", 100, "TTL of the granted leases, seconds")
	fs.IntVar(&opts.LeasesPerClient, "leases-per-client", 1, "leases each client grants before the run and keeps alive in turn")
	fs.BoolVar(&opts.Once, "once", false, "a new LeaseKeepAlive stream per keep-alive (clientv3's KeepAliveOnce, etcd's benchmark) instead of one stream per client")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, usageError{err}
	}
	if len(pos) != 0 {
		fmt.Fprintln(stderr, "loadtest lease-keepalive: takes no arguments")
		fs.Usage()
		return nil, usageError{errors.New("bad arguments")}
	}
	return bench.LeaseKeepAlive(ctx, g.config(*total, isSet(fs, "total"), stderr), opts)
}

func runWatch(ctx context.Context, g *globalFlags, args []string, stdout, stderr io.Writer) int {
	fs := newSubFlagSet("watch",
		"watch [--watchers=100000] [--streams=100] [--hot] [--rates=1000] [--step=10s] [--server-pids=PID,…]", g, stderr)
	var opts bench.WatchOptions
	fs.IntVar(&opts.Watchers, "watchers", 100000, "number of watches")
	fs.IntVar(&opts.Streams, "streams", 100, "number of Watch streams the watches are spread over (round-robin over the conns)")
	fs.BoolVar(&opts.Hot, "hot", false, "watch one key with every watch (otherwise each watch has its own key and each put writes a random watched key)")
	fs.StringVar(&opts.Prefix, "prefix", "/loadtest/watch/", "prefix of the watched keys")
	fs.IntVar(&opts.ValSize, "val-size", 64, "value size in bytes")
	fs.IntVar(&opts.Writers, "writers", 32, "concurrent put loops sharing the rate")
	rates := fs.String("rates", "1000", "comma-separated put rates (puts/s), one step each, in order")
	fs.DurationVar(&opts.Step, "step", 10*time.Second, "how long each step puts")
	fs.DurationVar(&opts.Drain, "drain", 10*time.Second, "how long to wait after a step for its events")
	fs.DurationVar(&opts.Settle, "settle", 5*time.Second, "idle time after the watches are created before the servers' memory is read")
	fs.DurationVar(&opts.MaxP99, "max-p99", 0, "stop after the first step whose p99 delivery latency exceeds this (0: run every step)")
	pids := fs.String("server-pids", "", "comma-separated server process ids whose resident memory is read (Linux)")
	fs.BoolVar(&opts.FromPast, "from-past", false, "create every watch with a start revision (the revision before the run), as Kubernetes reflectors do")
	coreMetrics := fs.String("core-metrics", "", "comma-separated /metrics URLs of the core (kvmesh's replicas) whose RPCs are counted over an idle window and over the creation")
	corePIDs := fs.String("core-pids", "", "comma-separated process ids of the core whose CPU is read over the same windows (Linux)")
	fs.DurationVar(&opts.IdleWindow, "idle-window", 10*time.Second, "the idle window before the creation, with --core-metrics or --core-pids")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitCode(err)
	}
	if len(pos) != 0 {
		fmt.Fprintf(stderr, "loadtest watch: unexpected arguments %q\n", pos)
		fs.Usage()
		return 2
	}
	for _, f := range strings.Split(*rates, ",") {
		r, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil {
			fmt.Fprintf(stderr, "loadtest watch: --rates: %v\n", err)
			return 2
		}
		opts.Rates = append(opts.Rates, r)
	}
	if *pids != "" {
		for _, f := range strings.Split(*pids, ",") {
			pid, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				fmt.Fprintf(stderr, "loadtest watch: --server-pids: %v\n", err)
				return 2
			}
			opts.ServerPIDs = append(opts.ServerPIDs, pid)
		}
	}
	if *coreMetrics != "" {
		opts.CoreMetrics = strings.Split(*coreMetrics, ",")
	}
	if *corePIDs != "" {
		for _, f := range strings.Split(*corePIDs, ",") {
			pid, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				fmt.Fprintf(stderr, "loadtest watch: --core-pids: %v\n", err)
				return 2
			}
			opts.CorePIDs = append(opts.CorePIDs, pid)
		}
	}
	rep, err := bench.Watch(ctx, g.config(0, false, stderr), opts)
	if err != nil {
		fmt.Fprintf(stderr, "loadtest watch: %v\n", err)
		return 1
	}
	return printReport(g, stdout, stderr, rep.WriteText, rep.WriteJSON, rep.Interrupted)
}
