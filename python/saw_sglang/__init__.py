"""saw's KV formats inside SGLang's model runner (SGLang 0.5.11).

SGLang keeps its scheduler, radix cache, models and CUDA graphs; saw brings the KV pool and the attention
backend, registered through SGLang's own plugin entry point (`sglang.srt.plugins`, see `plugin.py`):

- `config.py`: the KV format the worker asks for, handed to SGLang's processes through one environment variable
- `pool.py`: `SawKVPool`, SGLang's token-to-KV pool holding saw's per-layer tensors (packed INT4 + (scale, lo))
- `backend.py`: `SawAttentionBackend`, SGLang's attention backend over saw's `TritonBackend` (the same class saw's
  own engine drives)
- `plugin.py`: registers the backend as `--attention-backend saw` and the two runtime hooks the pool needs
- `engine.py`: `SGLangEngine`, saw's `Engine` protocol over `sglang.Engine` (`python -m saw_worker --engine sglang`)

Nothing here is imported unless SGLang is installed; docs/sglang.md says how to install it and what works.
"""
