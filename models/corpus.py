"""The bundled model's corpus: the standard-library source of the running interpreter.

The split is a pure function of each file's path relative to the stdlib root, so every
machine (and every later recipe: heads, adapters, draft models) agrees on which files
are held out without storing a file list.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class CorpusFile:
    relpath: str
    text: str

    @property
    def held_out(self) -> bool:
        return is_held_out(self.relpath)


def is_held_out(relpath: str) -> bool:
    """A fixed 5% of files, chosen by the sha256 of their stdlib-relative path."""
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "little") % 100 < HELD_OUT_PERCENT


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib(root: Path | None = None) -> list[CorpusFile]:
    """Every ``*.py`` file under the stdlib root except installed third-party packages."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(CorpusFile(path.relative_to(root).as_posix(), text))
    return files


def train_tokenizer(texts: list[str], vocab_size: int = 8192) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every byte string is encodable, no unknown token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """One token stream: ``BOS doc EOS BOS doc EOS ...`` as uint16."""
    eos_id = tokenizer.token_to_id(EOS)
    encodings = tokenizer.encode_batch(texts)
    pieces = [np.array([*enc.ids, eos_id], dtype=np.uint16) for enc in encodings]
    return np.concatenate(pieces)


def held_out_prompts(count: int = 20, chars: int = 200) -> list[str]:
    """The first ``chars`` characters of held-out files: code the model never trained on."""
    files = [f for f in read_stdlib() if f.held_out and len(f.text) > 2 * chars]
    return [f.text[:chars] for f in files[:count]]


def text_windows(tokenizer: Tokenizer, texts: list[str], count: int, length: int,
                 seed: int = 0) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, each from a different long enough text."""
    rng = np.random.default_rng(seed)
    long = [t for t in texts if len(t) > 8 * length]
    chosen = rng.choice(len(long), size=min(count, len(long)), replace=False)
    windows = []
    for i in chosen:
        ids = tokenizer.encode(long[i], add_special_tokens=False).ids
        start = int(rng.integers(0, max(1, len(ids) - length)))
        windows.append(ids[start : start + length])
    return windows
