"""Worker rank 0's gRPC face: the internal Engine service that routers connect to."""
