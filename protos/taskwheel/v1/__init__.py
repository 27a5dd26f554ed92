"""taskwheel's gRPC contract (package taskwheel.v1), generated from the .proto files beside it."""
