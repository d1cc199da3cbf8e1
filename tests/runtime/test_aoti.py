"""The aoti backend: AOTInductor packages run every policy token-identically to ``ar`` and
to the ORT and eager engines, need neither leapc nor Python ops to run, and are validated
like every other program file.

Compiling is slow (~20 s a program on 2 cores; the tests that compile are marked ``aoti``,
which ``make test-fast`` leaves out): the engines come from the session's
``engine_dir`` fixture (tiny Llama; stories260K with its draft model and datastore) plus
one tiny Llama with the other attention lowering, built through the CLI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engines import STORIES_REFERENCE, tiny_source
from trees import random_tree, stack_masks, tree_step_inputs

import leapc
from leapc.ir.errors import EngineError
from leapc.kernels import reference
from leapc.runtime.backends.aoti import fused_sdpa
from leapc.runtime.backends.base import BACKENDS
from leapc.runtime.manifest import Backend

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
TINY_POLICIES = ("ar", "lookup", "recycle", "lookahead")
STORIES_PROMPTS = ("", "One day, Tom", "Once upon a time, there was a little girl named Lily. "
                   "She loved to play outside. Once upon a time, there was a little")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The packages' OpenMP kernels spin-wait for each other at every parallel region: when
    the suite shares the 2 cores with other processes, a 2-thread step took up to 100x
    longer (docs/decisions.md). These tests check tokens, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(engine_dir) -> leapc.Engine:
    return leapc.load(engine_dir("tiny-llama", "aoti"))


@pytest.fixture(scope="module")
def tiny_other_attention(tmp_path_factory) -> leapc.Engine:
    """The tiny Llama built by ``leapc build --backend aoti`` with the attention lowering
    aoti does not use by default."""
    source = tiny_source("llama")
    checkpoint = tmp_path_factory.mktemp("tiny-llama-checkpoint")
    source.model.config.eos_token_id = None  # as tiny_source: never stop early
    source.model.save_pretrained(checkpoint)
    source.tokenizer.save(str(checkpoint / "tokenizer.json"))
    aoti = BACKENDS[Backend.AOTI]
    other = next(a for a in aoti.attentions if a is not aoti.default_attention)
    out = tmp_path_factory.mktemp(f"tiny-llama-aoti-{other.value}")
    leapc_cli = Path(sys.executable).parent / "leapc"
    subprocess.run([leapc_cli, "build", checkpoint, "-o", out, "--backend", "aoti",
                    "--attention", other.value, "--max-seq", "256"], check=True)
    return leapc.load(out)


@pytest.fixture(scope="module")
def tiny_greedy(engine_dir) -> list[int]:
    """The tiny Llama's greedy tokens on its ORT engine, which its eager engine also emits."""
    expected = leapc.load(engine_dir("tiny-llama", "ort")).generate(PROMPT, 40).token_ids
    assert leapc.load(engine_dir("tiny-llama", "eager")).generate(PROMPT, 40).token_ids == expected
    return expected


@pytest.fixture(scope="module")
def stories(engine_dir) -> leapc.Engine:
    return leapc.load(engine_dir("stories", "aoti"))


@pytest.fixture(scope="module")
def stories_greedy(engine_dir) -> dict[str, list[int]]:
    ort = leapc.load(engine_dir("stories", "ort"))
    return {prompt: ort.generate(prompt, 96).token_ids for prompt in STORIES_PROMPTS}


@pytest.mark.aoti
def test_engine_is_a_package_per_program(stories):
    assert stories.manifest.backend is Backend.AOTI
    assert {name: entry.file for name, entry in stories.manifest.programs.items()} == \
        {"full": "full.pt2", "draft_model": "draft_model.pt2"}


@pytest.mark.parametrize(("heads", "kv_heads", "new", "past"),
                         [(4, 4, 1, 1), (4, 2, 6, 9), (8, 2, 16, 40), (3, 1, 5, 0)])
def test_the_decomposition_equals_the_reference(heads, kv_heads, new, past):
    """What aoti compiles in place of ``leapc.tree_attention`` (GQA ratios 1 to 4, a
    one-node tree, an empty past)."""
    g = torch.Generator().manual_seed(new)
    q = torch.randn(2, heads, new, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, past + new, 16, generator=g) for _ in range(2))
    past_len = torch.randint(0, past + 1, (2,), generator=g)
    tree_mask = stack_masks([random_tree(new, g) for _ in range(2)])
    torch.testing.assert_close(fused_sdpa(q, k, v, past_len, tree_mask, 0.3),
                               reference.tree_attention(q, k, v, past_len, tree_mask, 0.3))


@pytest.mark.aoti
@pytest.mark.parametrize("policy", TINY_POLICIES)
def test_tiny_policies_match_ort_and_eager_greedy(tiny, tiny_greedy, policy):
    assert tiny.generate(PROMPT, 40, policy=policy).token_ids == tiny_greedy


@pytest.mark.aoti
def test_both_attention_lowerings_agree(tiny, tiny_other_attention):
    lowered = [e.manifest.passes[-1] == "insert_tree_attention" for e in (tiny, tiny_other_attention)]
    assert sorted(lowered) == [False, True]
    for seed, shape in enumerate([(1, 1, 64), (2, 9, 64), (1, 32, 192)]):
        inputs = [t.numpy() for t in tree_step_inputs(tiny.manifest.model.dims, *shape, seed=seed)]
        want, got = tiny.step(*inputs), tiny_other_attention.step(*inputs)
        for name in ("logits", "present"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    for policy in ("ar", "lookahead"):
        assert tiny_other_attention.generate(PROMPT, 40, policy=policy).token_ids == \
            tiny.generate(PROMPT, 40).token_ids


@pytest.mark.aoti
def test_tree_package_runs_in_a_process_without_leapc(tiny, tiny_other_attention, tmp_path):
    """Tree attention is decomposed into aten ops before compiling: no call back into the
    Python op, so plain torch runs the package."""
    engine = next(e for e in (tiny, tiny_other_attention) if "insert_tree_attention" in
                  e.manifest.passes)
    inputs = [t.numpy() for t in tree_step_inputs(engine.manifest.model.dims, 1, 5, 64)]
    np.savez(tmp_path / "inputs.npz", *inputs)
    code = ("import sys, numpy as np, torch; "
            "runner = torch._inductor.aoti_load_package(sys.argv[1]); "
            "inputs = np.load(sys.argv[2]); "
            "logits, _ = runner(*(torch.from_numpy(inputs[f'arr_{i}']) for i in range(4))); "
            "assert not [m for m in sys.modules if m.startswith('leapc')]; "
            "np.save(sys.argv[3], logits.numpy())")
    package = engine.path / engine.manifest.programs["full"].file
    subprocess.run([sys.executable, "-c", code, str(package), str(tmp_path / "inputs.npz"),
                    str(tmp_path / "logits.npy")], check=True)
    # The other process may split reductions across threads differently: float32 noise.
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), engine.step(*inputs)["logits"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.aoti
def test_stories_reproduces_the_reference_text(stories):
    assert stories.generate("", 60).text.strip() == STORIES_REFERENCE


@pytest.mark.aoti
@pytest.mark.parametrize("policy", ("ar", "lookup", "recycle", "lookahead", "draft", "retrieval"))
def test_stories_policies_match_ort_greedy(stories, stories_greedy, policy):
    for prompt, expected in stories_greedy.items():
        assert stories.generate(prompt, 96, policy=policy).token_ids == expected, prompt


@pytest.mark.aoti
def test_corrupt_package_is_refused(engine_dir, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir("tiny-llama", "aoti"), copy)
    package = copy / "full.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="full program file full.pt2 is corrupt"):
        leapc.load(copy)
