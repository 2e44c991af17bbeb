"""saw worker: paged-KV continuous-batching engine with BF16 / INT4 / INT4-BDR caches, served over gRPC."""
