"""taskwheel's internal gRPC contract (package taskwheel.internal.v1): what the services of one
deployment say to each other across processes, generated from the .proto files beside it. No
public .proto imports these; clients never need them."""
