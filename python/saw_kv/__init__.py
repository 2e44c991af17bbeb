"""The KV cache formats (bf16, int4, int4-bdr and their options, formats.py) and one layer's cache bundle
(cache.py): the definitions the worker and the kernels both import, so neither package imports the other's
internals for them."""
