"""Shared fixtures: a tokenizer trained in-test on the shipped corpus, and the fake server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Import the package from the source tree when it is not installed (before `pip install .`).
_SRC = Path(__file__).resolve().parents[2] / "python"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from saw_loadtest.corpus import corpus_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fake_server import FakeOptions, FakeServer  # noqa: E402


def train_bpe(vocab_size: int = 800) -> Tokenizer:
    """Byte-level BPE like GPT-2/Llama-3/Qwen, small enough to train in a blink."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([corpus_text()], trainer)
    return tok


def train_wordlevel() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus_text()], trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False))
    return tok


@pytest.fixture(scope="session")
def bpe() -> Tokenizer:
    return train_bpe()


@pytest.fixture(scope="session")
def wordlevel() -> Tokenizer:
    return train_wordlevel()


@pytest.fixture
def fake(bpe: Tokenizer):
    with FakeServer(FakeOptions(tokenizer=bpe)) as srv:
        yield srv
