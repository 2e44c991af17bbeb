"""HF `tokenizers` JSON for the router, from an HF folder, GGUF metadata, or a byte-level fallback.

GGUF stores a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`) as tokens, merges and
token types plus a pre-tokenizer name (`tokenizer.ggml.pre`); we rebuild the same tokenizer the
model's `tokenizer.json` describes with the `tokenizers` library (no transformers dependency).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..config import TokenizerInfo

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pre-tokenizer split regexes of llama.cpp's `tokenizer.ggml.pre` names (same as the models' tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_STOP_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) for a `tokenizer.ggml.pre` name."""
    if pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        normalizer = normalizers.NFC() if _SPLITS[pre] is _QWEN2_SPLIT else None
        return normalizer, pre_tokenizers.Sequence([split, byte_level])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer.json: every digit on its own, then the GPT-2 split
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre not in ("gpt2", "default"):
        print(f"saw: unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 pre-tokenizer", file=sys.stderr)
    return None, gpt2


def _stop_ids(tokens: list[str], types: list[int], explicit: list[int]) -> tuple[int, ...]:
    """eos (and end-of-turn) ids, plus the usual chat stop tokens when the vocabulary marks them control."""
    ids = [i for i in explicit if i is not None]
    index = {t: i for i, t in enumerate(tokens)}
    for name in _STOP_NAMES:
        i = index.get(name)
        if i is not None and (not types or types[i] == TOKEN_TYPE_CONTROL):
            ids.append(i)
    return tuple(dict.fromkeys(ids))


def tokenizer_from_gguf(meta: dict[str, Any]) -> TokenizerInfo:
    """Build the tokenizer from GGUF `tokenizer.*` metadata (byte-level BPE only)."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type", [])]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # Llama 3's tokenizer.json sets ignore_merges: whole-word vocabulary hits skip the merge loop.
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=pre in _SPLITS and _SPLITS[pre] is _LLAMA3_SPLIT,
    )
    tok = Tokenizer(bpe)
    normalizer, pre_tok = _pre_tokenizer(pre)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=False))  # token_type may be absent
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else ""
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    explicit = [
        meta.get(k)
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ]
    return TokenizerInfo(
        tokenizer_json=tok.to_str(),
        chat_template=str(meta.get("tokenizer.chat_template") or CHATML_TEMPLATE),
        bos_token=bos,
        eos_token=tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else "",
        bos_token_id=int(bos_id) if bos_id is not None else None,
        eos_token_ids=_stop_ids(tokens, types, [int(x) for x in explicit if x is not None]),
    )


def _token_str(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("content", ""))
    return "" if v is None else str(v)


def tokenizer_from_hf_folder(folder: Path) -> TokenizerInfo:
    """tokenizer.json as is, chat template and special tokens from tokenizer_config.json (+ generation_config)."""
    tj = (folder / "tokenizer.json").read_text(encoding="utf-8")
    tok = Tokenizer.from_str(tj)  # validates
    cfg_path = folder / "tokenizer_config.json"
    tcfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    jinja = folder / "chat_template.jinja"
    if not template and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    bos, eos = _token_str(tcfg.get("bos_token")), _token_str(tcfg.get("eos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    eos_ids = [tok.token_to_id(eos)] if eos else []
    gen = folder / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        eos_ids += g if isinstance(g, list) else [g]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)  # type: ignore[arg-type]
    return TokenizerInfo(
        tokenizer_json=tj,
        chat_template=template or CHATML_TEMPLATE,
        bos_token=bos,
        eos_token=eos,
        bos_token_id=bos_id,
        eos_token_ids=_stop_ids(tokens, [], [i for i in eos_ids if i is not None])
        if eos_ids
        else _stop_ids(tokens, [], []),
    )


def folder_tokenizer(folder: Path, vocab_size: int) -> TokenizerInfo:
    """The folder's tokenizer.json (tokenizer_from_hf_folder), else the byte-level fallback (dummy models)."""
    if (folder / "tokenizer.json").exists():
        return tokenizer_from_hf_folder(folder)
    return byte_level_fallback(vocab_size)


def write_hf_tokenizer(tok: TokenizerInfo, folder: Path, model_max_length: int) -> None:
    """tok as an HF folder's tokenizer files (tokenizer.json, tokenizer_config.json with the chat template,
    generation_config.json), which tokenizer_from_hf_folder and other engines read back."""
    (folder / "tokenizer.json").write_text(tok.tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template, "eos_token": tok.eos_token,
        "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": model_max_length}, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(tok.eos_token_ids)}))


def byte_level_fallback(vocab_size: int = 259) -> TokenizerInfo:
    """A valid tokenizer for dummy-weight models without tokenizer.json: the 256 byte-level symbols
    (ids 0..255, no merges), ChatML specials 256..258, and ids 259..vocab_size-1 as filler words
    " w259", " w260", ... Text round-trips one token per byte (no merges, so encoding never yields a
    filler); the fillers give every id a random-weight model samples some text, so streams carry
    content and load tests measure real chunks."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # Order by byte value so id == byte; bytes_to_unicode maps printable bytes to themselves.
    byte_chars = sorted(alphabet, key=_byte_of)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    space = byte_chars[ord(" ")]
    fillers = [f"{space}w{i}" for i in range(len(byte_chars) + len(specials), vocab_size)]
    vocab = {c: i for i, c in enumerate(byte_chars + specials + fillers)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return TokenizerInfo(
        tokenizer_json=tok.to_str(),
        chat_template=CHATML_TEMPLATE,
        bos_token="",
        eos_token="<|im_end|>",
        bos_token_id=None,
        eos_token_ids=(258, 256),
    )


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one symbol."""
    o = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if o in printable:
        return o
    rest = [b for b in range(256) if b not in printable]
    return rest[o - 256]
