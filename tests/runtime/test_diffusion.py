"""Block-diffusion decoding (runtime/diffusion.py) on a tiny random block-diffusion model.

The tiny model is a random Llama whose config names a block-diffusion contract: its
outputs are noise, but every rule's mechanics and ``freedave``'s exactness are the same
on noise as on text. The bundled diffusion model's tests are in test_diffusion_bundled.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from engines import tiny_source

import leapc
from leapc.ir.errors import InputError
from leapc.models.loaders import DIFFUSION_KEY
from leapc.runtime.diffusion import DiffusionOptions
from leapc.runtime.manifest import Backend
from leapc.runtime.policies import Policy
from leapc.runtime.sampling import TypicalAcceptance

BLOCK, MASK = 4, 0
PROMPTS = ([5, 17, 42], [9, 3, 3, 3, 101, 7, 250, 64, 12])
DIFFUSION_POLICIES = ("mdm", "freedave", "confidence", "prophet", "credit")


def diffusion_source(temperature_scale: float = 1.0):
    """A tiny block-diffusion model. Its random logits are sharpened (the LM head scaled) so
    that some positions are confident and the lossy rules decide several at once."""
    source = tiny_source("llama")
    source.model.config.update({DIFFUSION_KEY: {"block_size": BLOCK, "mask_token_id": MASK,
                                                "logits_shift": 1}})
    source.model.lm_head.weight.data *= temperature_scale
    return source


def built(backend: Backend, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"diffusion-{backend.value}")
    return leapc.load(leapc.build(diffusion_source(8.0), out, backend=backend, max_seq=96))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return built(Backend.ORT, tmp_path_factory)


def test_eager_engine_runs_the_same_rules(tmp_path_factory):
    """The exported program itself (the reference backend): freedave is mdm there too."""
    eager = built(Backend.EAGER, tmp_path_factory)
    ref = eager.generate(PROMPTS[1], 12, policy="mdm")
    fast = eager.generate(PROMPTS[1], 12, policy="freedave")
    assert fast.token_ids == ref.token_ids and fast.stats.steps < ref.stats.steps


def test_engine_offers_the_block_diffusion_policies_only(engine):
    assert [p.value for p in engine.manifest.policies] == list(DIFFUSION_POLICIES)
    contract = engine.manifest.model.diffusion
    assert (contract.block_size, contract.mask_token_id, contract.logits_shift) == (BLOCK, MASK, 1)
    with pytest.raises(InputError, match="needs an autoregressive model|does not support"):
        engine.generate(PROMPTS[0], 8, policy="ar")
    assert engine.policy("auto") is Policy.MDM


@pytest.mark.parametrize("gate", [0.0, 0.3])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_freedave_is_mdm_with_fewer_calls(engine, prompt, gate):
    ref = engine.generate(prompt, 40, policy="mdm")
    fast = engine.generate(prompt, 40, policy="freedave",
                           diffusion=DiffusionOptions(depth=4, gate=gate))
    assert fast.token_ids == ref.token_ids
    assert len(ref.token_ids) == 40 and MASK not in ref.token_ids
    # mdm: one call per decision but a block's last (its state needs no logits), plus the
    # prompt's prefill: BLOCK - 1 + 1 calls per block
    assert ref.stats.calls["full"] == 1 + 40 // BLOCK * BLOCK
    assert fast.stats.calls["full"] < ref.stats.calls["full"]
    drafted = engine.generate(prompt, 40, policy="freedave",
                              diffusion=DiffusionOptions(depth=4, gate=1.0))
    # a gate nothing passes drafts only the reference's own decision: mdm's calls exactly
    assert drafted.stats.calls["full"] == ref.stats.calls["full"]


@pytest.mark.parametrize("seed", [0, 7])
def test_freedave_reproduces_seeded_sampling(engine, seed):
    kwargs = dict(temperature=1.0, top_k=50, seed=seed)
    ref = engine.generate(PROMPTS[1], 24, policy="mdm", **kwargs)
    assert engine.generate(PROMPTS[1], 24, policy="freedave", **kwargs).token_ids == ref.token_ids
    other = engine.generate(PROMPTS[1], 24, policy="mdm", temperature=1.0, top_k=50, seed=seed + 1)
    assert other.token_ids != ref.token_ids  # the seed matters: the test can fail


@pytest.mark.parametrize("policy", ["confidence", "prophet", "credit"])
def test_lossy_rules_decide_several_positions_per_call(engine, policy):
    ref = engine.generate(PROMPTS[0], 40, policy="mdm")
    loose = DiffusionOptions(threshold=0.3, margin=0.2, credit=0.6)
    run = engine.generate(PROMPTS[0], 40, policy=policy, diffusion=loose)
    assert len(run.token_ids) == 40 and MASK not in run.token_ids
    assert run.stats.calls["full"] < ref.stats.calls["full"]


def test_strict_lossy_rules_are_the_reference(engine):
    """At thresholds nothing reaches, each rule decides the one most confident position a
    call: exactly mdm."""
    ref = engine.generate(PROMPTS[1], 16, policy="mdm").token_ids
    strict = DiffusionOptions(threshold=1.0, margin=1.0, credit=1e9)
    for policy in ("confidence", "prophet", "credit"):
        assert engine.generate(PROMPTS[1], 16, policy=policy, diffusion=strict).token_ids == ref


def test_generation_ends_at_max_seq(engine):
    prompt = list(range(3, 3 + 80))
    run = engine.generate(prompt, 64, policy="freedave")
    # 96 - 80 = 16 slots: whole blocks fit up to the context's end
    assert len(run.token_ids) == 16 and run.stats.stop_reason.value == "max_seq"
    assert run.token_ids == engine.generate(prompt, 64, policy="mdm").token_ids


def test_eos_cuts_the_block(engine):
    ref = engine.generate(PROMPTS[0], 24, policy="mdm").token_ids
    eos = ref[5]
    engine_eos = engine.manifest.tokenizer.model_copy(update={"eos_ids": (eos,)})
    manifest = engine.manifest.model_copy(update={"tokenizer": engine_eos})
    stopped = leapc.runtime.engine.Engine(engine.path, manifest, engine.tokenizer)
    run = stopped.generate(PROMPTS[0], 24, policy="freedave")
    assert run.token_ids == ref[: ref.index(eos) + 1] and run.stats.stop_reason.value == "eos"


def test_bad_options_are_refused(engine):
    with pytest.raises(InputError, match="depth >= 1"):
        engine.generate(PROMPTS[0], 8, policy="freedave", diffusion=DiffusionOptions(depth=0))
    with pytest.raises(InputError, match="gate in"):
        engine.generate(PROMPTS[0], 8, policy="freedave", diffusion=DiffusionOptions(gate=2.0))
    with pytest.raises(InputError, match="block-diffusion policy: typical acceptance"):
        engine.generate(PROMPTS[0], 8, policy="mdm", temperature=1.0,
                        typical=TypicalAcceptance())


def test_token_healing_is_the_next_tokens_only(engine):
    """A block-diffusion policy takes a text prompt as it is, healing asked or not."""
    text = "5 17 42"
    healed = engine.generate(text, 8, policy="mdm", token_healing=True)
    assert healed.token_ids == engine.generate(engine.encode(text), 8, policy="mdm").token_ids


def test_autoregressive_only_build_options_are_refused(tmp_path):
    with pytest.raises(InputError, match="--exit-layer: for autoregressive models"):
        leapc.build(diffusion_source(), tmp_path / "e", exit_layer=1)
    assert not (tmp_path / "e").exists()


def test_block_logits_are_shifted(engine):
    """A block's first position is predicted by the prefix's last row: with a one-token
    budget, mdm's first decision in a block of all masks comes from there or from the
    block's own rows — check the first block of a generation agrees with the rows the
    step program gives when run by hand."""
    prompt = PROMPTS[1]
    step, cache = engine.step, engine.new_cache("mdm")
    from leapc.runtime.decode import prefill

    out = prefill(step, cache, prompt, engine.manifest.max_new)
    first = out["logits"][0, -1]
    first[MASK] = -np.inf
    masked = np.full(BLOCK, MASK)
    n = BLOCK
    past = cache.past_for(n)
    mask = np.concatenate([np.broadcast_to(cache.valid_mask(), (n, past.shape[4])),
                           np.ones((n, n), bool)], axis=1)
    rows = step(masked[None], (cache.length + np.arange(n))[None], past, mask[None])["logits"][0]
    logits = np.concatenate([first[None], rows[:-1]]).astype(np.float64)
    logits[:, MASK] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    position = int(np.argmax(p.max(-1)))
    expected = int(np.argmax(logits[position]))
    # one block of BLOCK tokens, then the first decision is at `position`
    tokens = engine.generate(prompt, BLOCK, policy="mdm").token_ids
    assert tokens[position] == expected


def test_cli_runs_the_engine_policy_and_knobs(engine, capsys):
    """`leapc run` on a block-diffusion engine: `auto` is mdm, knobs reach the rules."""
    import json

    from leapc.cli import main

    def run(*args: str) -> dict:
        capsys.readouterr()
        main(["run", str(engine.path), "--prompt-ids", "5,17,42", "--max-new-tokens", "12",
              "--json", *args])
        return json.loads(capsys.readouterr().out)

    ref = engine.generate(PROMPTS[0], 12, policy="mdm")
    auto = run()
    assert auto["policy"] == "mdm" and auto["token_ids"] == ref.token_ids
    assert run("--policy", "freedave", "--unmask-depth", "3", "--unmask-gate", "0.2")[
        "token_ids"] == ref.token_ids
    strict = run("--policy", "confidence", "--unmask-threshold", "1.0")
    assert strict["token_ids"] == ref.token_ids and strict["steps"] == ref.stats.steps
    loose = run("--policy", "confidence", "--unmask-threshold", "0.3")
    assert loose["steps"] < ref.stats.steps


def test_cli_bench_measures_every_policy_against_mdm(engine, tmp_path, capsys):
    import json

    from leapc.cli import main

    out = tmp_path / "bench.json"
    main(["bench", str(engine.path), "--prompts", str(_prompt_file(tmp_path)), "--repeats", "1",
          "--max-new-tokens", "24", "--json", str(out)])
    rows = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == list(DIFFUSION_POLICIES)
    assert rows["mdm"]["speedup_vs_mdm"] == 1.0 and rows["freedave"]["identical_to_mdm"]
    assert rows["freedave"]["passes_per_token"] < rows["mdm"]["passes_per_token"]
    with pytest.raises(SystemExit) as stop:
        main(["bench", str(engine.path), "--policies", "ar", "--repeats", "1"])
    assert stop.value.code == 2 and "does not support policy 'ar'" in capsys.readouterr().err


def _prompt_file(directory):
    path = directory / "prompts.jsonl"
    path.write_text('"5 17 42"\n"9 3 3 3 101"\n')
    return path


def test_inspect_names_the_decoding_contract(engine):
    from leapc.inspection import inspect_engine

    summary = inspect_engine(engine.path)[0]
    rows = dict(zip(summary.columns[0]._cells, summary.columns[1]._cells, strict=True))
    assert rows["decoding"] == "block diffusion: blocks of 4, mask id 0, logits shifted by one"
    assert rows["policies"] == ", ".join(DIFFUSION_POLICIES)


def test_sampled_decisions_follow_the_filtered_distribution():
    """A sampled decision's token at a position is a draw from that position's softmax(z/T)
    under top-k (Gumbel-max with the decision's own noise key): chi-square over 3000 keys."""
    from stats import chi2_critical, chi2_goodness_of_fit

    from leapc.runtime.diffusion import Block, BlockDiffusion, Chooser
    from leapc.runtime.sampling import SamplingConfig, probabilities

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 12)).astype(np.float32) * 2
    sampling = SamplingConfig(temperature=0.7, top_k=6)
    scores = Chooser(BlockDiffusion(2, MASK, 1), sampling, seed=5)(logits)
    block = Block(0, np.full(2, MASK), MASK)
    draws = [int(scores.choices(block, decision).tokens[1]) for decision in range(3000)]
    z = logits[1].astype(np.float64)
    z[MASK] = -np.inf  # never the mask
    p = probabilities(z, sampling)
    stat, df = chi2_goodness_of_fit(draws, {t: float(q) for t, q in enumerate(p) if q > 0})
    assert stat < chi2_critical(df)
    assert set(draws) <= set(np.flatnonzero(p))


def test_prophet_lead_is_top1_minus_top2_of_every_row_asked():
    """`Scores.leads_by` (its top-1 shortcut included) against the definition, at margins
    around every row's own lead."""
    from leapc.runtime.diffusion import BlockDiffusion, Chooser
    from leapc.runtime.sampling import SamplingConfig

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 3
    scores = Chooser(BlockDiffusion(6, MASK, 1), SamplingConfig(), seed=0)(logits)
    top = np.sort(scores.p, axis=-1)
    lead = top[:, -1] - top[:, -2]
    rows = np.array([True, False, True, True, False, True])
    for margin in (*lead, *(lead + 1e-4), 0.0, 1.0):
        assert scores.leads_by(rows, margin) == bool((lead[rows] >= margin).all()), margin
