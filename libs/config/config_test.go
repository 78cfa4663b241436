package config

import (
	"context"
	"strings"
	"testing"
	"time"
)

type sample struct {
	Tick  time.Duration `env:"TICK_INTERVAL, default=100ms"`
	Count int           `env:"COUNT, default=3"`
	URLs  []string      `env:"URLS, default=http://a,http://b"`
}

func TestDefaultsAndOverrides(t *testing.T) {
	var s sample
	if err := LoadFrom(context.Background(), "KVMESH_X_", MapLookuper(map[string]string{"KVMESH_X_COUNT": "7"}), &s); err != nil {
		t.Fatal(err)
	}
	if s.Tick != 100*time.Millisecond || s.Count != 7 || len(s.URLs) != 2 {
		t.Fatalf("loaded %+v", s)
	}
}

func TestErrorsNameTheVariable(t *testing.T) {
	for name, value := range map[string]string{"KVMESH_X_TICK_INTERVAL": "soon", "KVMESH_X_COUNT": "many"} {
		var s sample
		err := LoadFrom(context.Background(), "KVMESH_X_", MapLookuper(map[string]string{name: value}), &s)
		if err == nil || !strings.HasPrefix(err.Error(), name+": ") || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s=%s: error %q, want one line starting with the variable", name, value, err)
		}
	}
}
