"""Decoding-head policies (Medusa, Hydra; static and dynamic trees): token-identical to
``ar`` under greedy decoding on the bundled model (shipped heads), stories260K and a tiny
model (heads trained by the recipe), on every placement and on the eager backend too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from engines import STORIES_REFERENCE, tiny_source

import leapc
from leapc.runtime.drafters.heads import DynamicTree
from leapc.runtime.policies import DraftOptions

CODE_PROMPT = 'def parse_header(line):\n    """Split an HTTP header line into name and value."""'
TINY_PROMPT = [5, 17, 33, 2 + 7, 101]


def assert_heads_policies_match_ar(engine, prompt, new_tokens=48) -> dict[str, float]:
    expected = engine.generate(prompt, new_tokens).token_ids
    heads = [p for p in engine.manifest.policies if p.value.startswith(("medusa", "hydra"))]
    assert len(heads) == 2
    taus = {}
    for policy in heads:
        for draft in (DraftOptions(), DraftOptions(dynamic=DynamicTree(total=24, beam=3))):
            got = engine.generate(prompt, new_tokens, policy=policy, draft=draft)
            assert got.token_ids == expected, (policy, draft.dynamic)
            taus[policy.value] = got.stats.tau
    return taus


@pytest.mark.parametrize("kind", ("medusa", "hydra"))
def test_bundled_heads_policies_equal_ar_and_draft_usefully(heads_engine_dir, kind):
    engine = leapc.load(heads_engine_dir("bundled", kind))
    taus = assert_heads_policies_match_ar(engine, CODE_PROMPT, 96)
    # The shipped heads are trained: a static tree accepts well over one token per step.
    assert taus[kind] > 1.4, taus


@pytest.mark.shared
@pytest.mark.parametrize("kind", ("medusa", "hydra"))
def test_stories_heads_policies_equal_ar(heads_engine_dir, kind):
    engine = leapc.load(heads_engine_dir("stories", kind))
    assert_heads_policies_match_ar(engine, STORIES_REFERENCE[:60])


@pytest.mark.parametrize(("kind", "placement", "backend"), [
    ("medusa", "program", "ort"), ("medusa", "step", "ort"), ("hydra", "program", "ort"),
    ("hydra", "program", "eager")])
def test_tiny_heads_policies_equal_ar(heads_engine_dir, kind, placement, backend):
    engine = leapc.load(heads_engine_dir("tiny-llama", kind, placement, backend))
    assert_heads_policies_match_ar(engine, TINY_PROMPT)


def test_step_placement_engine_has_no_heads_program(heads_engine_dir):
    step = leapc.load(heads_engine_dir("tiny-llama", "medusa", "step"))
    program = leapc.load(heads_engine_dir("tiny-llama", "medusa", "program"))
    assert set(step.manifest.programs) == {"full"}
    assert "head_logits" in step.step.output_names
    assert set(program.manifest.programs) == {"full", "heads"}
    assert "hidden" in program.step.output_names
    # the heads program only drafts, so its vocabulary projection is int8 (ORT MatMulNBits)
    heads_graph = onnx.load(str(program.path / program.manifest.programs["heads"].file)).graph
    assert "MatMulNBits" in {node.op_type for node in heads_graph.node}


@pytest.mark.slow  # trains heads, measures
def test_auto_tree_is_sequoias_best_for_the_measured_costs(tmp_path):
    """``--tree auto`` records the acceptance it measured and the predicted curve, and the
    tree it keeps is Sequoia's at the curve's best point, still token-identical to ``ar``."""
    from tokenizers import pre_tokenizers

    from leapc.compiler import planned_steps
    from leapc.heads import HeadsOptions
    from leapc.ir.tree_search import AcceptanceTable, optimal_tree
    from leapc.stage import BuildOptions

    source = tiny_source("llama")
    source.tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(str(3 + (i * 7919) % 250) for i in range(4000)))
    options = HeadsOptions(count=2, train_text=text, tree="auto", training_steps=5,
                           training_sequences=8, training_context=32)
    stages = []
    engine = leapc.load(leapc.build(source, tmp_path / "e", "ort", max_seq=256, max_new=16,
                                    heads=options, on_stage=stages.append))
    assert len(stages) == planned_steps(BuildOptions.parse(heads=options)), stages
    heads = engine.manifest.heads
    choice = heads.tree_choice
    assert choice.source == "auto" and len(choice.acceptance) == 2
    assert [row[0] for row in choice.curve] == list(range(16))
    best = max(choice.curve, key=lambda row: row[2])
    probs = np.asarray(choice.acceptance)
    # the best tree under one of the depth limits (Hydra drafts one call per depth)
    assert any(set(heads.tree) == set(optimal_tree(AcceptanceTable(probs[:depth]), best[0]))
               for depth in (1, 2))
    assert_heads_policies_match_ar(engine, TINY_PROMPT)
