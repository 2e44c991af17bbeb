"""KV-cache formats, the paged pool and the attention backend that reads it."""
