"""Engines the runtime and CLI tests share, each built once per session.

``stories260K`` is read from ``../shared`` (a real externally trained model; tests that
need it skip with the reason when it is absent); the bundled model from the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from families import tiny_model
from tokenizers import Tokenizer, models

from leapc.models.loaders import BUNDLED_DIR, SourceModel

REPO = Path(__file__).resolve().parents[1]
STORIES_DIR = REPO.parent / "shared" / "models" / "stories260K"
STORIES_BIN = STORIES_DIR / "stories260K.bin"
# The exit layer of each engine the early-exit tests build (conftest.exit_engine_dir).
EXIT_LAYERS = {"bundled": 4, "stories": 3, "tiny-llama": 1}
# The sublayers each layer-skip engine's draft bypasses (conftest.skip_engine_dir); the
# bundled model's is the greedy agreement search's 14 of 24 (docs/decisions.md).
SKIP_SETS = {"bundled": "m2,3,5,6,m7,m8,a9,10,11", "stories": "a1,m3", "tiny-llama": "m0,a1"}
# The policies every engine offers (nothing is built for them). A new training-free policy
# is one entry here: the registry, identity, recorded-output and context-limit tests take it.
TRAINING_FREE = ("ar", "lookup", "suffix", "recycle", "lookahead")
STORIES_REFERENCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high"
)


def require_stories() -> Path:
    if not STORIES_BIN.is_file():
        pytest.skip(f"stories260K not found at {STORIES_DIR} (../shared is absent)")
    return STORIES_BIN


def require_bundled() -> Path:
    if not (BUNDLED_DIR / "model.safetensors").is_file():
        pytest.skip(f"bundled model weights not found in {BUNDLED_DIR}")
    return BUNDLED_DIR


def id_tokenizer(vocab: int) -> Tokenizer:
    """A tokenizer whose token i is the string ``str(i)``: tiny models take id prompts."""
    return Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))


def tiny_source(family: str) -> SourceModel:
    """A random tiny model that never stops early (no EOS), so every run is full length."""
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    return SourceModel(model, id_tokenizer(model.config.vocab_size), f"tiny-{family}", 1, ())


def record_steps(scheduler) -> tuple[list[tuple[int, int]], list[int]]:
    """Wrap a `Scheduler`'s step program; the lists it fills as steps run: (rows, width)
    of each decode call, and the width of each prefill call (a row's own cache)."""
    decodes, prefills, program = [], [], scheduler.step_program

    def recorded(tokens, positions, past, mask):
        if past is scheduler.cache.buffer:
            decodes.append(tokens.shape)
        else:
            prefills.append(tokens.shape[1])
        return program(tokens, positions, past, mask)

    scheduler.step_program = recorded
    return decodes, prefills


def run_all(scheduler, sequences) -> None:
    """Submit ``sequences`` to a `Scheduler` at once and step it until it is idle."""
    for sequence in sequences:
        scheduler.submit(sequence)
    while not scheduler.idle:
        scheduler.step()
