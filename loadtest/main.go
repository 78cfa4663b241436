// Command loadtest is a load generator for the etcd v3 KV API, modelled on
// etcd's `benchmark` tool. It speaks gRPC over plaintext HTTP/2, like any
// etcd client, so the same run can target kvmesh and a real etcd.
//
//	loadtest [global flags] put   [--key-size=8] [--val-size=256] [--total=10000] [--sequential-keys] [--key-space-size=1]
//	loadtest [global flags] range KEY [RANGE_END] [--total=10000] [--consistency=l|s] [--limit=0]
//	loadtest [global flags] watch [--watchers=100000] [--streams=100] [--hot] [--rates=1000] [--step=10s] [--server-pids=PID,…]
//	loadtest [global flags] lease-keepalive [--total=10000] [--ttl=100] [--leases-per-client=1] [--once]
//	loadtest [global flags] mixed [--total=10000] [--key-space-size=1000] [--get=50] [--put=25] [--cas=15] [--delete=10]
//	loadtest chart --out DIR [--prefix=P] [--title=T] RESULTS.tsv
//
// Global flags may also be given after the subcommand, and flags may come before
// or after the positional arguments. The command line is parsed by
// github.com/spf13/cobra.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/kvmesh/kvmesh/loadtest/internal/bench"
	"github.com/kvmesh/kvmesh/loadtest/internal/charts"
)

// Exit codes.
const (
	exitOK          = 0
	exitRunError    = 1 // the run (or writing its results) failed
	exitUsage       = 2 // the command line is wrong; nothing was run
	exitInterrupted = 130
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
	plot       string
}

func (g *globalFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&g.endpoints, "endpoints", "127.0.0.1:2379", "comma-separated host:port list; connections are spread over them")
	fs.IntVar(&g.conns, "conns", 1, "number of TCP connections")
	fs.IntVar(&g.clients, "clients", 1, "number of concurrent clients, spread over the connections")
	fs.BoolVar(&g.precise, "precise", false, "print latencies with full floating point precision")
	fs.BoolVar(&g.json, "json", false, "also print the report as one JSON object on stdout (the text report then goes to stderr)")
	fs.DurationVar(&g.duration, "duration", 0, "run for this long instead of --total requests (if --total is also given, stop at whichever comes first)")
	fs.DurationVar(&g.timeout, "timeout", 10*time.Second, "per-request timeout")
	fs.StringVar(&g.targetName, "target-name", "", "label for the target printed in the report, e.g. kvmesh or etcd")
	fs.StringVar(&g.user, "user", "", "name:password to authenticate each connection with (auth enabled on the server)")
	fs.StringVar(&g.plot, "plot", "", "write a chart of the run's throughput and latency over time to this file (.svg or .png; put, range, lease-keepalive, mixed)")
}

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

// runError is a failure after the command line was accepted (exit status 1). Any
// other error out of the command tree is a usage error (exit status 2).
type runError struct{ error }

var errNoCommand = errors.New("a command is required")

func (e runError) Unwrap() error { return e.error }

// app is one invocation of the CLI.
type app struct {
	g              globalFlags
	stdout, stderr io.Writer
	code           int // exit status of a command that returned no error

	// The benchmarks; tests replace them to see what the command line asked for.
	bench func(ctx context.Context, cfg bench.Config, opts any) (*bench.Report, error)
	watch func(ctx context.Context, cfg bench.Config, opts bench.WatchOptions) (*bench.WatchReport, error)
}

// runBench runs the request-driven benchmark that opts configures.
func runBench(ctx context.Context, cfg bench.Config, opts any) (*bench.Report, error) {
	switch o := opts.(type) {
	case bench.PutOptions:
		return bench.Put(ctx, cfg, o)
	case bench.RangeOptions:
		return bench.Range(ctx, cfg, o)
	case bench.LeaseOptions:
		return bench.LeaseKeepAlive(ctx, cfg, o)
	case bench.MixedOptions:
		return bench.Mixed(ctx, cfg, o)
	}
	return nil, fmt.Errorf("unknown benchmark options %T", opts)
}

// run executes the CLI and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return (&app{stdout: stdout, stderr: stderr, bench: runBench, watch: bench.Watch}).run(ctx, args)
}

func (a *app) run(ctx context.Context, args []string) int {
	root := a.commands()
	root.SetArgs(args)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return a.code
	}
	if re := (runError{}); errors.As(err, &re) {
		fmt.Fprintf(a.stderr, "%s: %v\n", cmd.CommandPath(), re.error)
		return exitRunError
	}
	if errors.Is(err, errNoCommand) {
		fmt.Fprintf(a.stderr, "%s: %v\n\n%s", cmd.CommandPath(), err, cmd.UsageString())
	} else {
		fmt.Fprintf(a.stderr, "%s: %v\nRun \"%s --help\" for usage.\n", cmd.CommandPath(), err, cmd.CommandPath())
	}
	return exitUsage
}

func (a *app) commands() *cobra.Command {
	root := &cobra.Command{
		Use:   "loadtest [global flags] COMMAND [flags] [ARGS]",
		Short: "A load generator for the etcd v3 API, modelled on etcd's benchmark tool",
		Long: `loadtest drives an etcd v3 API server (kvmesh or etcd) over gRPC and prints a
report like etcd's benchmark tool: throughput, a latency histogram and
percentiles, errors by code. Global flags may come before or after the command,
and flags before or after positional arguments.`,
		SilenceErrors:     true,
		SilenceUsage:      true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		// Without a command: the usage, and exit status 2. (cobra rejects an
		// unknown command before this runs.)
		RunE: func(cmd *cobra.Command, args []string) error {
			return errNoCommand
		},
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if a.g.plot != "" {
				if _, err := charts.PlotFormat(a.g.plot); err != nil {
					return fmt.Errorf("--plot: %w", err)
				}
			}
			return nil
		},
	}
	a.g.register(root.PersistentFlags())
	root.AddCommand(a.putCommand(), a.rangeCommand(), a.watchCommand(), a.leaseCommand(), a.mixedCommand(), a.chartCommand())
	root.DisableFlagsInUseLine = true
	for _, c := range root.Commands() {
		c.DisableFlagsInUseLine = true // each Use lists its flags
	}
	return root
}

// noArgs rejects positional arguments.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("unexpected arguments %q", args)
	}
	return nil
}

func (g *globalFlags) config(cmd *cobra.Command, total int64, stderr io.Writer) bench.Config {
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
	if g.duration > 0 && (cmd.Flags().Lookup("total") == nil || !cmd.Flags().Changed("total")) {
		cfg.Total = 0 // --duration alone: unbounded count
	}
	if f, ok := stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		cfg.Progress = stderr
	}
	return cfg
}

// runReport runs a request-driven benchmark, prints its report and writes its
// chart (--plot).
func (a *app) runReport(cmd *cobra.Command, total int64, opts any) error {
	rep, err := a.bench(cmd.Context(), a.g.config(cmd, total, a.stderr), opts)
	if err != nil {
		return runError{err}
	}
	if err := a.printReport(func(w io.Writer) error { return rep.WriteText(w, a.g.precise) }, rep.WriteJSON); err != nil {
		return err
	}
	if a.g.plot != "" {
		if err := charts.WriteTimeline(a.g.plot, rep); err != nil {
			return runError{fmt.Errorf("--plot: %w", err)}
		}
	}
	a.setCode(rep.Interrupted)
	return nil
}

// printReport writes a report's text (to stderr when --json puts the JSON object on
// stdout) and JSON.
func (a *app) printReport(text, json func(io.Writer) error) error {
	tw := a.stdout
	if a.g.json {
		tw = a.stderr
	}
	if err := text(tw); err != nil {
		return runError{err}
	}
	if a.g.json {
		if err := json(a.stdout); err != nil {
			return runError{err}
		}
	}
	return nil
}

// setCode sets the exit status of a run whose report was printed: 130 when it was
// interrupted (the report is partial).
func (a *app) setCode(interrupted bool) {
	a.code = exitOK
	if interrupted {
		a.code = exitInterrupted
	}
}

func (a *app) putCommand() *cobra.Command {
	var (
		total int64
		opts  bench.PutOptions
	)
	cmd := &cobra.Command{
		Use:   "put [--key-size=8] [--val-size=256] [--total=10000] [--sequential-keys] [--key-space-size=1]",
		Short: "Benchmark KV.Put",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.SequentialKeys && !cmd.Flags().Changed("key-space-size") {
				opts.KeySpaceSize = 0 // unbounded: the i-th put writes key i
			}
			return a.runReport(cmd, total, opts)
		},
	}
	fs := cmd.Flags()
	fs.IntVar(&opts.KeySize, "key-size", 8, "key size in bytes")
	fs.IntVar(&opts.ValSize, "val-size", 256, "value size in bytes")
	fs.Int64Var(&total, "total", 10000, "total number of put requests")
	fs.BoolVar(&opts.SequentialKeys, "sequential-keys", false, "use sequential keys: the i-th put writes key i (modulo --key-space-size if that is given)")
	fs.Int64Var(&opts.KeySpaceSize, "key-space-size", 1, "random keys are drawn from [0, key-space-size)")
	return cmd
}

func (a *app) rangeCommand() *cobra.Command {
	var (
		total int64
		opts  bench.RangeOptions
	)
	cmd := &cobra.Command{
		Use:   "range KEY [RANGE_END] [--total=10000] [--consistency=l|s] [--limit=0]",
		Short: "Benchmark KV.Range of KEY (to RANGE_END)",
		Long: `Benchmark KV.Range of KEY, or of [KEY, RANGE_END). Use -- before a key that
starts with a dash.`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return fmt.Errorf("expected KEY [RANGE_END], got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Key = args[0]
			if len(args) == 2 {
				opts.RangeEnd = args[1]
			}
			return a.runReport(cmd, total, opts)
		},
	}
	fs := cmd.Flags()
	fs.Int64Var(&total, "total", 10000, "total number of range requests")
	fs.StringVar(&opts.Consistency, "consistency", "l", "linearizable (l) or serializable (s)")
	fs.Int64Var(&opts.Limit, "limit", 0, "maximum number of keys returned per request (0 = no limit)")
	return cmd
}

func (a *app) mixedCommand() *cobra.Command {
	var (
		total int64
		opts  bench.MixedOptions
	)
	cmd := &cobra.Command{
		Use:   "mixed [--total=10000] [--key-space-size=1000] [--get=50] [--put=25] [--cas=15] [--delete=10]",
		Short: "Benchmark a mix of gets, puts, CAS txns and deletes of random keys",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.runReport(cmd, total, opts)
		},
	}
	fs := cmd.Flags()
	fs.Int64Var(&total, "total", 10000, "total number of requests")
	fs.IntVar(&opts.KeySize, "key-size", 8, "key size in bytes")
	fs.IntVar(&opts.ValSize, "val-size", 256, "value size in bytes")
	fs.Int64Var(&opts.KeySpaceSize, "key-space-size", 1000, "keys are drawn from [0, key-space-size)")
	fs.IntVar(&opts.Get, "get", 50, "weight of gets (linearizable ranges of one key)")
	fs.IntVar(&opts.Put, "put", 25, "weight of puts")
	fs.IntVar(&opts.CAS, "cas", 15, "weight of CAS txns (put if the key holds the benchmark's value)")
	fs.IntVar(&opts.Delete, "delete", 10, "weight of deletes")
	return cmd
}

func (a *app) leaseCommand() *cobra.Command {
	var (
		total int64
		opts  bench.LeaseOptions
	)
	cmd := &cobra.Command{
		Use:   "lease-keepalive [--total=10000] [--ttl=100] [--leases-per-client=1] [--once]",
		Short: "Benchmark lease keep-alives",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.runReport(cmd, total, opts)
		},
	}
	fs := cmd.Flags()
	fs.Int64Var(&total, "total", 10000, "total number of keep-alives")
	fs.Int64Var(&opts.TTL, "ttl", 100, "TTL of the granted leases, seconds")
	fs.IntVar(&opts.LeasesPerClient, "leases-per-client", 1, "leases each client grants before the run and keeps alive in turn")
	fs.BoolVar(&opts.Once, "once", false, "a new LeaseKeepAlive stream per keep-alive (clientv3's KeepAliveOnce, etcd's benchmark) instead of one stream per client")
	return cmd
}

func (a *app) watchCommand() *cobra.Command {
	var (
		opts                            bench.WatchOptions
		rates, pids, coreMetrics, cores string
	)
	cmd := &cobra.Command{
		Use:   "watch [--watchers=100000] [--streams=100] [--hot] [--rates=1000] [--step=10s] [--server-pids=PID,…]",
		Short: "Benchmark the delivery of watch events",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if a.g.plot != "" {
				return errors.New("--plot: watch records no timeline (only put, range, lease-keepalive and mixed do)")
			}
			for _, f := range strings.Split(rates, ",") {
				r, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
				if err != nil {
					return fmt.Errorf("--rates: %v", err)
				}
				opts.Rates = append(opts.Rates, r)
			}
			var err error
			if opts.ServerPIDs, err = parsePIDs(pids); err != nil {
				return fmt.Errorf("--server-pids: %v", err)
			}
			if coreMetrics != "" {
				opts.CoreMetrics = strings.Split(coreMetrics, ",")
			}
			if opts.CorePIDs, err = parsePIDs(cores); err != nil {
				return fmt.Errorf("--core-pids: %v", err)
			}
			rep, err := a.watch(cmd.Context(), a.g.config(cmd, 0, a.stderr), opts)
			if err != nil {
				return runError{err}
			}
			if err := a.printReport(rep.WriteText, rep.WriteJSON); err != nil {
				return err
			}
			a.setCode(rep.Interrupted)
			return nil
		},
	}
	fs := cmd.Flags()
	fs.IntVar(&opts.Watchers, "watchers", 100000, "number of watches")
	fs.IntVar(&opts.Streams, "streams", 100, "number of Watch streams the watches are spread over (round-robin over the conns)")
	fs.BoolVar(&opts.Hot, "hot", false, "watch one key with every watch (otherwise each watch has its own key and each put writes a random watched key)")
	fs.StringVar(&opts.Prefix, "prefix", "/loadtest/watch/", "prefix of the watched keys")
	fs.IntVar(&opts.ValSize, "val-size", 64, "value size in bytes")
	fs.IntVar(&opts.Writers, "writers", 32, "concurrent put loops sharing the rate")
	fs.StringVar(&rates, "rates", "1000", "comma-separated put rates (puts/s), one step each, in order")
	fs.DurationVar(&opts.Step, "step", 10*time.Second, "how long each step puts")
	fs.DurationVar(&opts.Drain, "drain", 10*time.Second, "how long to wait after a step for its events")
	fs.DurationVar(&opts.Settle, "settle", 5*time.Second, "idle time after the watches are created before the servers' memory is read")
	fs.DurationVar(&opts.MaxP99, "max-p99", 0, "stop after the first step whose p99 delivery latency exceeds this (0: run every step)")
	fs.StringVar(&pids, "server-pids", "", "comma-separated server process ids whose resident memory is read (Linux)")
	fs.BoolVar(&opts.FromPast, "from-past", false, "create every watch with a start revision (the revision before the run), as Kubernetes reflectors do")
	fs.StringVar(&coreMetrics, "core-metrics", "", "comma-separated /metrics URLs of the core (kvmesh's replicas) whose RPCs are counted over an idle window and over the creation")
	fs.StringVar(&cores, "core-pids", "", "comma-separated process ids of the core whose CPU is read over the same windows (Linux)")
	fs.DurationVar(&opts.IdleWindow, "idle-window", 10*time.Second, "the idle window before the creation, with --core-metrics or --core-pids")
	return cmd
}

// parsePIDs parses a comma-separated list of process ids ("" is none).
func parsePIDs(s string) ([]int, error) {
	if s == "" {
		return nil, nil
	}
	var pids []int
	for _, f := range strings.Split(s, ",") {
		pid, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

func (a *app) chartCommand() *cobra.Command {
	var out, prefix, title string
	cmd := &cobra.Command{
		Use:   "chart --out DIR [--prefix=P] [--title=T] RESULTS.tsv",
		Short: "Render comparison charts from the results.tsv of scripts/bench.sh",
		Long: `Render comparison charts from a results file of scripts/bench.sh: one line per
measurement, tab-separated: round, workload, target, requests/s, average latency
(s), p99 latency (s), failed requests, server CPU per request (µs).

It writes three SVG files into DIR: throughput.svg, latency.svg (average) and
cpu.svg (server CPU per request), each named with --prefix in front. Each has one
group of bars per workload, one bar per target at the median over the rounds,
with every round's value drawn as a dot on its bar.`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 1 {
				return fmt.Errorf("expected one RESULTS.tsv file, got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("--out DIR is required")
			}
			rs, err := charts.ReadResultsFile(args[0])
			if err != nil {
				return runError{err}
			}
			files, err := charts.WriteComparison(out, prefix, title, rs)
			if err != nil {
				return runError{err}
			}
			for _, f := range files {
				fmt.Fprintln(a.stderr, "wrote", f)
			}
			return nil
		},
	}
	// Only the chart's own flags in its usage: the global ones configure runs.
	cmd.SetUsageFunc(func(c *cobra.Command) error {
		fmt.Fprintf(c.OutOrStderr(), "Usage:\n  %s\n\nFlags:\n%s", c.UseLine(), c.LocalFlags().FlagUsages())
		return nil
	})
	cmd.DisableFlagsInUseLine = true
	fs := cmd.Flags()
	fs.StringVar(&out, "out", "", "directory to write the charts into (created if missing)")
	fs.StringVar(&prefix, "prefix", "", "prefix of the file names, e.g. allinone- for allinone-throughput.svg")
	fs.StringVar(&title, "title", "", "title above each chart's metric (default: the targets, e.g. \"etcd vs kvmesh\")")
	return cmd
}
