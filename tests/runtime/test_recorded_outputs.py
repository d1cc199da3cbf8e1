"""Greedy outputs of every policy against a recorded fixture, so that a refactor which
changes plain decoding itself (not only a policy's agreement with it) is caught.

The fixture (`tests/data/recorded_greedy.json`) holds `ar`'s greedy tokens on the bundled
model and stories260K; every lossless policy must reproduce them. Re-record only for a
deliberate change of the models or of decoding: ``LEAPC_RECORD_OUTPUTS=1 pytest
tests/runtime/test_recorded_outputs.py`` (then review the diff).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from engines import TRAINING_FREE

import leapc

FIXTURE = Path(__file__).parents[1] / "data" / "recorded_greedy.json"
PROMPTS = {
    "bundled": ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
                "import os\nimport sys\n\n\ndef main(argv):",
                "class Stack:\n    def __init__(self):\n        self.items = []"],
    "stories": ["Once upon a time", "Tom and Lily went to the park. They saw",
                "The little dog was sad because"],
}
NEW_TOKENS = 32
# The session fixture that builds the engine carrying each policy (tests/conftest.py).
ENGINES = {
    **{policy: ("engine_dir",) for policy in TRAINING_FREE},
    "draft": ("engine_dir",), "retrieval": ("engine_dir",),
    "medusa": ("heads_engine_dir", "medusa"), "medusa-dynamic": ("heads_engine_dir", "medusa"),
    "hydra": ("heads_engine_dir", "hydra"), "hydra-dynamic": ("heads_engine_dir", "hydra"),
    "early-exit": ("exit_engine_dir",), "kangaroo": ("exit_engine_dir",),
    "layer-skip": ("skip_engine_dir",), "swift": ("skip_engine_dir",),
}
RECORDING = os.environ.get("LEAPC_RECORD_OUTPUTS") == "1"


def _greedy(engine: leapc.Engine, model: str, policy: str) -> list[list[int]]:
    return [engine.generate(p, NEW_TOKENS, policy=policy).token_ids for p in PROMPTS[model]]


@pytest.mark.parametrize("model", sorted(PROMPTS))
@pytest.mark.parametrize("policy", list(ENGINES))
def test_every_policy_reproduces_the_recorded_greedy_output(request, model, policy):
    fixture, *args = ENGINES[policy]
    engine = leapc.load(request.getfixturevalue(fixture)(model, *args))
    outputs = _greedy(engine, model, policy)
    if RECORDING and policy == "ar":
        _record(model, outputs)
    assert outputs == json.loads(FIXTURE.read_text())[model]


def _record(model: str, outputs: list[list[int]]) -> None:
    recorded = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    recorded[model] = outputs
    lines = ",\n".join(f" {json.dumps(m)}: {json.dumps(v)}" for m, v in sorted(recorded.items()))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text("{\n" + lines + "\n}\n")
