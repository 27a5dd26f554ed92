"""The node-to-node gRPC contract of taskwheel (package taskwheel.internal.v1): not for clients."""
