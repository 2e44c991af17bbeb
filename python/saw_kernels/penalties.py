"""The sampler's logit bias and penalties in one pass over the penalized rows (docs/router.md lists the options).

Row i of the launch changes logits row batch_rows[i] from the state in table row table_rows[i] (the engine's
PenaltyTable): the dense logit bias is added, vLLM's repetition penalty divides (x > 0) or multiplies (x <= 0)
the logits of tokens in the prompt or already generated, and OpenAI's frequency and presence penalties subtract
f x count and p x (count > 0). The torch twin is saw_worker.engine.penalties.penalize_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # tokens per program: 151,936 / 2,048 = 75 programs per row


@triton.jit
def _penalize_kernel(logits_ptr, stride_logits, batch_rows_ptr, table_rows_ptr, counts_ptr, in_prompt_ptr, bias_ptr,
                     params_ptr, vocab, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < vocab
    b = tl.load(batch_rows_ptr + i).to(tl.int64)
    r = tl.load(table_rows_ptr + i).to(tl.int64)
    frequency = tl.load(params_ptr + r * 4)
    presence = tl.load(params_ptr + r * 4 + 1)
    repetition = tl.load(params_ptr + r * 4 + 2)
    # the options a row does not use mask their loads off (no memory traffic): as limits, so the masks are blocks
    biased = offs < tl.where(tl.load(params_ptr + r * 4 + 3) != 0, vocab, 0)
    repeats = offs < tl.where(repetition != 1.0, vocab, 0)
    counted = offs < tl.where((frequency != 0.0) | (presence != 0.0) | (repetition != 1.0), vocab, 0)
    state = r * vocab + offs
    x = tl.load(logits_ptr + b * stride_logits + offs, mask=inside)
    x += tl.load(bias_ptr + state, mask=biased, other=0.0)
    count = tl.load(counts_ptr + state, mask=counted, other=0)
    seen = (count > 0) | (tl.load(in_prompt_ptr + state, mask=repeats, other=0) != 0)
    x = tl.where(seen & repeats, tl.where(x > 0, x / repetition, x * repetition), x)
    x = x - frequency * count.to(tl.float32) - tl.where(count > 0, presence, 0.0)
    tl.store(logits_ptr + b * stride_logits + offs, x, mask=inside)


def penalize(logits: torch.Tensor, batch_rows: torch.Tensor, table_rows: torch.Tensor, counts: torch.Tensor,
             in_prompt: torch.Tensor, bias: torch.Tensor, params: torch.Tensor) -> None:
    """In place on logits (float32 [B, V], rows contiguous). batch_rows, table_rows: int32/int64 [n];
    counts int32 [R, V], in_prompt uint8 [R, V], bias float32 [R, V], params float32 [R, 4]
    (frequency, presence, repetition, has_bias)."""
    n, vocab = batch_rows.numel(), logits.shape[-1]
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1 and counts.shape[-1] == vocab
    if n == 0:
        return
    _penalize_kernel[(n, triton.cdiv(vocab, BLOCK))](
        logits, logits.stride(0), batch_rows, table_rows, counts, in_prompt, bias, params, vocab, BLOCK=BLOCK)
