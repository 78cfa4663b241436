// Package config loads a role's configuration from KVMESH_… environment variables
// with github.com/sethvargo/go-envconfig. There is one loader for every service, so
// every service reports bad configuration the same way: one line naming the variable.
package config

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strings"

	"github.com/sethvargo/go-envconfig"
)

// Load fills v (a pointer to a struct with `env` tags) from the environment, every
// variable name prefixed with prefix (for example "KVMESH_REPLICA_").
func Load(ctx context.Context, prefix string, v any) error {
	return LoadFrom(ctx, prefix, envconfig.OsLookuper(), v)
}

// Part is one struct of a process's configuration and the prefix of its variables.
type Part struct {
	Prefix string
	Into   any // a pointer to a struct with `env` tags
	// Validate, if set, checks the part once every part is loaded.
	Validate func() error
}

// LoadAll loads every part (Load), then validates them all: a process checks its whole
// configuration before it starts anything.
func LoadAll(ctx context.Context, parts ...Part) error {
	for _, p := range parts {
		if err := Load(ctx, p.Prefix, p.Into); err != nil {
			return err
		}
	}
	var errs []error
	for _, p := range parts {
		if p.Validate != nil {
			errs = append(errs, p.Validate())
		}
	}
	return errors.Join(errs...)
}

// LoadFrom is Load with the variables from l, for tests.
func LoadFrom(ctx context.Context, prefix string, l envconfig.Lookuper, v any) error {
	err := envconfig.ProcessWith(ctx, &envconfig.Config{
		Target:   v,
		Lookuper: envconfig.PrefixLookuper(prefix, l),
	})
	if err == nil {
		return nil
	}
	// go-envconfig names the struct field ("TickInterval: …"); users set variables.
	msg := err.Error()
	if field, rest, ok := strings.Cut(msg, ": "); ok {
		if name := envName(v, field); name != "" {
			return fmt.Errorf("%s%s: %s", prefix, name, rest)
		}
	}
	return fmt.Errorf("invalid configuration (%s…): %w", prefix, err)
}

// envName returns the variable name (without prefix) of the struct field called field.
func envName(v any, field string) string {
	t := reflect.TypeOf(v)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return ""
	}
	f, ok := t.FieldByName(field)
	if !ok {
		return ""
	}
	name, _, _ := strings.Cut(f.Tag.Get("env"), ",")
	return strings.TrimSpace(name)
}

// MapLookuper returns a Lookuper over a fixed map, for tests.
func MapLookuper(m map[string]string) envconfig.Lookuper { return envconfig.MapLookuper(m) }

// CheckReplicaURLs checks a list of replica URLs set by the variable name: at least
// one, each a URL with a host, https:// when the mesh's mutual TLS is configured (tls)
// and http:// when it is not.
func CheckReplicaURLs(name string, urls []string, tls bool) error {
	if len(urls) == 0 {
		return fmt.Errorf("%s: at least one URL is needed", name)
	}
	want := "http"
	if tls {
		want = "https"
	}
	for _, u := range urls {
		p, err := url.Parse(u)
		if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
			return fmt.Errorf("%s: %q is not an http(s) URL", name, u)
		}
		if p.Scheme != want {
			if tls {
				return fmt.Errorf("%s: %q: with mutual TLS configured (…_MTLS_* variables) the URLs are https://", name, u)
			}
			return fmt.Errorf("%s: %q: an https:// URL needs mutual TLS configured (…_MTLS_* variables)", name, u)
		}
	}
	return nil
}
