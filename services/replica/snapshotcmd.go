package replica

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
)

// SnapshotCommand runs `snapshot status FILE` or `snapshot restore FILE --data-dir
// DIR` (etcdutl's snapshot commands, for kvmesh snapshot files): the command line of
// kvmesh-replica and of the all-in-one after their first argument, "snapshot".
func SnapshotCommand(args []string, out io.Writer) error {
	if len(args) == 0 {
		return errSnapshotUsage
	}
	switch args[0] {
	case "status":
		fs := flag.NewFlagSet("snapshot status", flag.ContinueOnError)
		format := fs.String("write-out", "table", "output format: table or json")
		fs.StringVar(format, "w", "table", "output format: table or json (shorthand)")
		file, err := parseFile(fs, args[1:])
		if err != nil {
			return err
		}
		meta, size, err := SnapshotStatus(file)
		if err != nil {
			return err
		}
		switch *format {
		case "json":
			return json.NewEncoder(out).Encode(map[string]any{
				"hash": meta.Hash, "revision": meta.Revision, "totalKey": meta.TotalKey, "totalSize": size, "version": meta.Version,
			})
		case "table":
			tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "HASH\tREVISION\tTOTAL KEYS\tTOTAL SIZE\tVERSION")
			fmt.Fprintf(tw, "%x\t%d\t%d\t%d\t%s\n", meta.Hash, meta.Revision, meta.TotalKey, size, meta.Version)
			return tw.Flush()
		}
		return fmt.Errorf("snapshot status: unknown output format %q (table or json)", *format)
	case "restore":
		fs := flag.NewFlagSet("snapshot restore", flag.ContinueOnError)
		dataDir := fs.String("data-dir", "", "the new member's data directory (KVMESH_REPLICA_DATA_DIR); must not exist or be empty")
		file, err := parseFile(fs, args[1:])
		if err != nil {
			return err
		}
		if *dataDir == "" {
			return errors.New("snapshot restore: --data-dir is required")
		}
		meta, err := Restore(file, *dataDir)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "restored snapshot %s (revision %d, %d keys) into %s\n", file, meta.Revision, meta.TotalKey, *dataDir)
		return nil
	}
	return errSnapshotUsage
}

var errSnapshotUsage = errors.New("usage: snapshot status FILE [-w table|json] | snapshot restore FILE --data-dir DIR")

// parseFile parses flags that may come before or after the one file argument.
func parseFile(fs *flag.FlagSet, args []string) (string, error) {
	fs.SetOutput(io.Discard)
	var files []string
	for {
		if err := fs.Parse(args); err != nil {
			return "", fmt.Errorf("%s: %w", fs.Name(), err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		files, args = append(files, args[0]), args[1:]
	}
	if len(files) != 1 {
		return "", fmt.Errorf("%s: want one snapshot file, got %d", fs.Name(), len(files))
	}
	return files[0], nil
}
