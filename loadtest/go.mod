module github.com/kvmesh/kvmesh/loadtest

go 1.26.0

require (
	connectrpc.com/connect v1.21.1
	github.com/kvmesh/kvmesh/libs v0.0.0
	golang.org/x/term v0.47.0
)

require (
	golang.org/x/sys v0.49.0 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)

replace github.com/kvmesh/kvmesh/libs => ../libs
