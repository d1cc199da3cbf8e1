"""Tests for the llama2.c loader against the externally trained stories260K model."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import torch

from leapc.models.llama2c import load_llama2c, load_llama2c_checkpoint, load_llama2c_tokenizer

STORIES = Path(__file__).resolve().parents[2].parent / "shared/models/stories260K"

# The README's known-good greedy continuation of [BOS] (60 tokens), joined onto one line.
KNOWN_GOOD = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in "
    "the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high"
)

SAMPLES = [
    "",
    "Once upon a time, there was a little girl named Lily.",
    'She saw a big, red ball. "Can I play?" she asked.',
    "Tom and Sue went to the park. They played all day!",
    "The end.",
    " leading space",
    "trailing space ",
    "double  space and\ttab",
    "line one\nline two\n",
    "Numbers: 0 1 2 42 3.14159 2024-06-01",
    "Punctuation!?;:'\"()[]{}<>|~@#$%^&*_+=-/\\`",
    "Literal specials stay text: <s> </s> <unk> <0x41>",
    "Café, naïve, façade, jalapeño, Ærøskøbing",
    "Emoji: 😀🙂🚀 and ✨ sparkles",
    "日本語のテキスト and 中文",
    "Привет, мир",
    "™ € â and a hair\u200aspace",
    "aaaaaaaaaaaaaaaaaaaaaaaa",
    "\u2581sentencepiece marker is just a character here",
    "supercalifragilisticexpialidocious",
]


@pytest.fixture(scope="module")
def stories() -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES} (shared model folder absent)")
    return STORIES


@pytest.fixture(scope="module")
def tokenizer(stories):
    return load_llama2c_tokenizer(stories / "tok512.bin")


@pytest.fixture(scope="module")
def vocab(stories) -> tuple[list[bytes], list[float]]:
    data = (stories / "tok512.bin").read_bytes()
    offset, pieces, scores = 4, [], []
    while offset < len(data):
        score, n = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    return pieces, scores


def reference_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """Oracle: llama2.c's encode() (run.c) with BOS, transcribed from the README."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    if not text:
        return [1]
    tokens = []
    for ch in " " + text:
        raw = ch.encode("utf-8")
        tokens += [lookup[raw]] if raw in lookup else [byte + 3 for byte in raw]
    while True:
        best = None  # (score, position, merged id); strict ">" keeps the leftmost on ties
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and (best is None or scores[merged] > best[0]):
                best = (scores[merged], i, merged)
        if best is None:
            return [1, *tokens]
        _, i, merged = best
        tokens[i : i + 2] = [merged]


def test_greedy_decoding_reproduces_known_good_text(stories, tokenizer):
    model = load_llama2c_checkpoint(stories / "stories260K.bin")
    assert model.dtype == torch.float32 and not model.training
    bos = torch.tensor([[1]])
    with torch.no_grad():
        out = model.generate(
            bos, attention_mask=torch.ones_like(bos), do_sample=False, max_new_tokens=60
        )
    ids = out[0].tolist()
    assert len(ids) == 61
    assert tokenizer.decode(ids) == KNOWN_GOOD
    assert tokenizer.encode(KNOWN_GOOD).ids == ids


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_llama2c_and_round_trips(tokenizer, vocab, text):
    ids = tokenizer.encode(text).ids
    assert ids == reference_encode(text, *vocab)
    assert tokenizer.decode(ids) == text


def test_encode_matches_llama2c_on_random_piece_soup(tokenizer, vocab):
    # Concatenated vocabulary pieces create many competing merges of similar score.
    pieces, scores = vocab
    texts = [p.decode("utf-8") for p in pieces[259:]] + ["é", "🙂", "\n", " "]
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choices(texts, k=rng.randint(1, 12)))
        assert tokenizer.encode(text).ids == reference_encode(text, pieces, scores), text


def test_load_llama2c_finds_sibling_tokenizer(stories, tmp_path):
    model, tok = load_llama2c(stories / "stories260K.bin")
    assert model.config.vocab_size == tok.get_vocab_size() == 512
    (tmp_path / "model.bin").symlink_to(stories / "stories260K.bin")
    with pytest.raises(ValueError, match="exactly one tok"):
        load_llama2c(tmp_path / "model.bin")


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\x40\x00\x00\x00\xac")
    with pytest.raises(ValueError, match="truncated llama2.c checkpoint"):
        load_llama2c_checkpoint(path)
    path.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + bytes(400))
    with pytest.raises(ValueError, match="implies .* bytes"):
        load_llama2c_checkpoint(path)


def test_truncated_tokenizer_is_rejected(tmp_path):
    path = tmp_path / "tok.bin"
    path.write_bytes(struct.pack("<ifi", 7, 0.0, 5) + b"<u")
    with pytest.raises(ValueError, match="truncated llama2.c tokenizer"):
        load_llama2c_tokenizer(path)


def test_negative_vocab_size_loads_separate_classifier(tmp_path):
    # dim 8, hidden 16, 1 layer, 2 heads, 1 kv head, vocab -300 (unshared), seq_len 4.
    header = struct.pack("<7i", 8, 16, 1, 2, 1, -300, 4)
    n_body = 300 * 8 + (2 * 8 + 2 * 64 + 2 * 4 * 8 + 3 * 16 * 8) + 8 + 4 * 4
    values = torch.arange(n_body + 300 * 8, dtype=torch.float32)
    path = tmp_path / "untied.bin"
    path.write_bytes(header + values.numpy().tobytes())
    model = load_llama2c_checkpoint(path)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, values[n_body:].view(300, 8))
    assert torch.equal(model.model.embed_tokens.weight, values[: 300 * 8].view(300, 8))
