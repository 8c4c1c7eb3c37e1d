"""Generated protobuf stubs of the nextserve API (sources: proto/nextserve/v1/*.proto)."""
