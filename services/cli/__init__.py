"""The taskwheel command line: up, serve, submit, worker, status, dev."""
