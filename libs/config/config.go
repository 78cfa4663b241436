// Package config loads a role's configuration from KVMESH_… environment variables
// with github.com/sethvargo/go-envconfig. There is one loader for every service, so
// every service reports bad configuration the same way: one line naming the variable.
package config

import (
	"context"
	"fmt"

	"github.com/sethvargo/go-envconfig"
)

// Load fills v (a pointer to a struct with `env` tags) from the environment, every
// variable name prefixed with prefix (for example "KVMESH_REPLICA_").
func Load(ctx context.Context, prefix string, v any) error {
	return LoadFrom(ctx, prefix, envconfig.OsLookuper(), v)
}

// LoadFrom is Load with the variables from l, for tests.
func LoadFrom(ctx context.Context, prefix string, l envconfig.Lookuper, v any) error {
	err := envconfig.ProcessWith(ctx, &envconfig.Config{
		Target:   v,
		Lookuper: envconfig.PrefixLookuper(prefix, l),
	})
	if err != nil {
		return fmt.Errorf("invalid configuration: %w", err)
	}
	return nil
}

// MapLookuper returns a Lookuper over a fixed map, for tests.
func MapLookuper(m map[string]string) envconfig.Lookuper { return envconfig.MapLookuper(m) }
