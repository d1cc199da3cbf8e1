"""The bundled model's quality on held-out code: next-line completion with and without
token healing, and held-out loss per token (what `bench/bench_quality.py` records and
`leapc demo` reports).

Cases come from the standard-library files the model never trained on
(`corpus.is_held_out`): at a random line whose text is not blank, the prompt is up to
``CONTEXT_CHARS`` characters of the file before it, cut either at the start of that line
(after the "\\n") or a few characters into it (after a word, or inside one). The model
completes greedily until a newline; a case is an exact match when the completion's first
line equals the rest of the file's line (trailing whitespace ignored), and a first-word
match when the two agree up to the end of their first word or symbol, indentation
included.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

from leapc.models import corpus
from leapc.runtime.decode import prefill
from leapc.runtime.engine import Engine

CONTEXT_CHARS = 600
MAX_LINE_TOKENS = 48
CUTS = ("line start", "mid-line")


@dataclass(frozen=True)
class Case:
    prompt: str
    rest: str  # the rest of the file's line after the prompt
    cut: str  # one of CUTS


@dataclass(frozen=True)
class Score:
    cut: str
    healing: bool
    cases: int
    exact: float  # share of next lines matched exactly
    first_word: float  # share whose first word (or symbol) matched


def cases(count: int, seed: int = 0) -> list[Case]:
    """``count`` held-out cases, alternating the two cuts."""
    files = [f for f in corpus.read_stdlib() if f.held_out and len(f.text) > 2 * CONTEXT_CHARS]
    rng = random.Random(seed)
    out: list[Case] = []
    while len(out) < count:
        text = rng.choice(files).text
        start = rng.choice([i + 1 for i, c in enumerate(text)
                            if c == "\n" and i > CONTEXT_CHARS // 2])
        line = text[start:].split("\n", 1)[0]
        cut = CUTS[len(out) % 2]
        inside = 0 if cut == CUTS[0] else _cut_inside(line, rng)
        if not line.strip() or inside is None:
            continue
        out.append(Case(text[max(0, start - CONTEXT_CHARS) : start + inside],
                        line[inside:].rstrip(), cut))
    return out


def _cut_inside(line: str, rng: random.Random) -> int | None:
    """A cut after the line's indentation and at least one more character, before its
    last character: after a word, or inside one."""
    indent = len(line) - len(line.lstrip())
    if len(line) - indent < 3:
        return None
    return rng.randrange(indent + 1, len(line) - 1)


def first_word(line: str) -> str:
    """The line's indentation and its first word (or symbol)."""
    found = re.match(r"\s*(\w+|\S)", line)
    return found.group(0) if found else line


def first_line(engine: Engine, prompt: str, healing: bool) -> str:
    """The greedy completion of ``prompt`` up to its first newline."""
    text = ""
    for chunk in engine.stream(prompt, MAX_LINE_TOKENS, token_healing=healing):
        text += chunk.text
        if "\n" in text:
            break
    return text.split("\n", 1)[0].rstrip()


def next_line_scores(engine: Engine, chosen: list[Case]) -> list[Score]:
    """Exact and first-word match per cut, healing off and on."""
    scores = []
    for cut in CUTS:
        mine = [c for c in chosen if c.cut == cut]
        for healing in (False, True):
            lines = [first_line(engine, c.prompt, healing) for c in mine]
            scores.append(Score(
                cut, healing, len(mine),
                float(np.mean([line == c.rest for line, c in zip(lines, mine, strict=True)])),
                float(np.mean([first_word(line) == first_word(c.rest)
                               for line, c in zip(lines, mine, strict=True)]))))
    return scores


def held_out_loss(engine: Engine, windows: list[list[int]]) -> float:
    """Mean next-token cross-entropy (nats) over the windows, from the engine's logits."""
    return float(np.mean(np.concatenate([-token_log_probs(engine, ids) for ids in windows])))


def completion_loss(engine: Engine, prompt: list[int], completion: list[int]) -> float:
    """Mean cross-entropy (nats/token) of ``completion`` after ``prompt`` under ``engine``'s
    model: how plausible another model's (or policy's) output is to this one."""
    return float(np.mean(-token_log_probs(engine, prompt + completion)[len(prompt) - 1:]))


def token_log_probs(engine: Engine, ids: list[int]) -> np.ndarray:
    """``log p(ids[i + 1] | ids[: i + 1])`` for every i, from the engine's logits."""
    cache = engine.new_cache()
    logits = []
    for start in range(0, len(ids), engine.manifest.max_new):
        piece = ids[start : start + engine.manifest.max_new]
        logits.append(prefill(engine.step, cache, piece, len(piece))["logits"][0])
    z = np.concatenate(logits)[:-1].astype(np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return log_p[np.arange(len(ids) - 1), ids[1:]]


def markdown(scores: list[Score]) -> str:
    rows = [f"| {s.cut} | {'on' if s.healing else 'off'} | {s.cases} | {s.exact:.1%} | "
            f"{s.first_word:.1%} |" for s in scores]
    return "\n".join(["| prompt cut | token healing | cases | next-line exact match | "
                      "first-word match |", "| --- | --- | --- | --- | --- |", *rows])
