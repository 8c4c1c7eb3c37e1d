"""nextserve router: the public gRPC API. Never imports torch."""
