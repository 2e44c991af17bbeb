"""The KV cache formats (bf16, int4, int4-bdr and their options): the definition the worker and the kernels
both import, so neither package imports the other's internals for it."""
