"""`leapc bench --vs-llamacpp`: the GGUF writer (leapc/gguf_export.py) and llama.cpp's greedy
decoding of its files, checked token for token against leapc's ``ar``.

The writer tests need only the ``gguf`` package (in ``dev``); the llama.cpp ones skip, with
the reason, where llama-cpp-python (the ``llamacpp`` extra, compiled from source) is absent.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from engines import id_tokenizer, tiny_source
from families import (
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    MAX_POSITIONS,
    VOCAB,
    tiny_checkpoint,
    tiny_model,
)
from test_cli import cli, user_error

import leapc
from leapc.benchmark import LlamaCppGreedy, bench_table, llamacpp_ggufs
from leapc.cache import cache_dir
from leapc.gguf_export import (
    WRITER_VERSION,
    GGUFType,
    _interleave_rope_rows,
    cached_gguf,
    write_gguf,
)
from leapc.ir.errors import InputError
from leapc.models.loaders import SourceModel, weights_sha256
from leapc.runtime.decode import StopConfig

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install "
                                          "'leapc[dev]')")


def require_llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                   "(pip install 'leapc[llamacpp]')")


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> dict[GGUFType, str]:
    directory = tmp_path_factory.mktemp("gguf")
    source = tiny_source("llama")
    return {kind: write_gguf(source, directory / f"tiny-{kind.value}.gguf", kind)
            for kind in GGUFType}


def _field(reader, key: str):
    return reader.fields[key].contents()


# ------------------------------------------------------------------ the file


def test_gguf_metadata_reads_back(tiny_ggufs):
    for kind, path in tiny_ggufs.items():
        reader = gguf.GGUFReader(path)
        expected = {
            "general.architecture": "llama",
            "llama.context_length": MAX_POSITIONS,
            "llama.embedding_length": HIDDEN,
            "llama.block_count": LAYERS,
            "llama.feed_forward_length": FFN,
            "llama.attention.head_count": HEADS,
            "llama.attention.head_count_kv": KV_HEADS,
            "llama.attention.key_length": HEAD_DIM,
            "llama.attention.value_length": HEAD_DIM,
            "llama.rope.dimension_count": HEAD_DIM,
            "llama.vocab_size": VOCAB,
            "general.file_type": {GGUFType.F32: gguf.LlamaFileType.ALL_F32,
                                  GGUFType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
                                  GGUFType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[kind],
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": 1,
        }
        assert {key: _field(reader, key) for key in expected} == expected
        assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
        assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
        assert _field(reader, "tokenizer.ggml.tokens") == [str(i) for i in range(VOCAB)]
        assert _field(reader, "tokenizer.ggml.token_type") == [gguf.TokenType.NORMAL] * VOCAB
        assert len(_field(reader, "tokenizer.ggml.merges")) == 1  # the WordLevel placeholder
        assert "tokenizer.ggml.eos_token_id" not in reader.fields  # tiny_source has no EOS


def test_gguf_tensors_have_llama_cpp_names_shapes_and_types(tiny_ggufs):
    per_layer = {"attn_norm": (HIDDEN,), "attn_q": (HIDDEN, HEADS * HEAD_DIM),
                 "attn_k": (HIDDEN, KV_HEADS * HEAD_DIM), "attn_v": (HIDDEN, KV_HEADS * HEAD_DIM),
                 "attn_output": (HEADS * HEAD_DIM, HIDDEN), "ffn_norm": (HIDDEN,),
                 "ffn_gate": (HIDDEN, FFN), "ffn_up": (HIDDEN, FFN), "ffn_down": (FFN, HIDDEN)}
    # GGUF dimensions are innermost first: a [out, in] torch weight reads back as (in, out)
    expected = {"token_embd.weight": (HIDDEN, VOCAB), "output_norm.weight": (HIDDEN,),
                "output.weight": (HIDDEN, VOCAB)}  # the tiny Llama's head is untied
    for i in range(LAYERS):
        expected |= {f"blk.{i}.{name}.weight": shape for name, shape in per_layer.items()}
    for kind, path in tiny_ggufs.items():
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        assert {name: tuple(int(d) for d in t.shape) for name, t in tensors.items()} == expected
        for name, t in tensors.items():
            matrix = len(expected[name]) == 2
            stored = {GGUFType.Q8_0: gguf.GGMLQuantizationType.Q8_0,
                      GGUFType.BF16: gguf.GGMLQuantizationType.BF16}
            want = stored.get(kind) if matrix and kind in stored \
                else gguf.GGMLQuantizationType.F32
            assert t.tensor_type == want, (kind, name)


def test_gguf_f32_tensors_are_the_weights_with_q_and_k_rows_interleaved(tiny_ggufs):
    model = tiny_source("llama").model
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tiny_ggufs[GGUFType.F32]).tensors}
    layer = model.model.layers[1].self_attn
    np.testing.assert_array_equal(tensors["token_embd.weight"],
                                  model.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], layer.v_proj.weight.detach().numpy())
    q = layer.q_proj.weight.detach().numpy()
    half = HEAD_DIM // 2
    for head in range(HEADS):  # row 2i of a head is its row i, row 2i + 1 its row i + d/2
        rows = tensors["blk.1.attn_q.weight"][head * HEAD_DIM : (head + 1) * HEAD_DIM]
        np.testing.assert_array_equal(rows[0::2], q[head * HEAD_DIM : head * HEAD_DIM + half])
        np.testing.assert_array_equal(rows[1::2], q[head * HEAD_DIM + half : (head + 1) * HEAD_DIM])
    # GQA: k_proj is permuted head by head over its KV_HEADS heads (convert_hf_to_gguf.py's
    # permute with n_head_kv), not over the query heads
    k = layer.k_proj.weight.detach().numpy()
    assert KV_HEADS != HEADS
    for head in range(KV_HEADS):
        rows = tensors["blk.1.attn_k.weight"][head * HEAD_DIM : (head + 1) * HEAD_DIM]
        np.testing.assert_array_equal(rows[0::2], k[head * HEAD_DIM : head * HEAD_DIM + half])
        np.testing.assert_array_equal(rows[1::2], k[head * HEAD_DIM + half : (head + 1) * HEAD_DIM])


def test_interleaved_rows_under_adjacent_pair_rope_give_rotate_half_attention_scores():
    """Why the permutation is right: the q.k score of Hugging Face's rotate-half RoPE on the
    original rows equals the score of GGML's adjacent-pair RoPE on the interleaved rows."""
    rng = np.random.default_rng(0)
    d, heads, hidden = 8, 2, 12
    wq, wk = rng.normal(size=(heads * d, hidden)), rng.normal(size=(heads * d, hidden))
    x_q, x_k = rng.normal(size=hidden), rng.normal(size=hidden)
    freq = 10000.0 ** (-np.arange(d // 2) * 2 / d)

    def rotate_half(v, pos):  # pairs (i, i + d/2)
        a, b = v[: d // 2], v[d // 2 :]
        cos, sin = np.cos(pos * freq), np.sin(pos * freq)
        return np.concatenate([a * cos - b * sin, b * cos + a * sin])

    def adjacent(v, pos):  # pairs (2i, 2i + 1)
        out, cos, sin = v.copy(), np.cos(pos * freq), np.sin(pos * freq)
        out[0::2], out[1::2] = v[0::2] * cos - v[1::2] * sin, v[1::2] * cos + v[0::2] * sin
        return out

    pq, pk = _interleave_rope_rows(wq, heads) @ x_q, _interleave_rope_rows(wk, heads) @ x_k
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        hf = rotate_half((wq @ x_q)[s], 7) @ rotate_half((wk @ x_k)[s], 3)
        ggml = adjacent(pq[s], 7) @ adjacent(pk[s], 3)
        assert ggml == pytest.approx(hf, rel=1e-12)


def test_gguf_writer_refuses_a_non_llama_family(tmp_path):
    source = SourceModel(tiny_model("gpt2"), id_tokenizer(VOCAB), "tiny-gpt2", 1, (2,))
    with pytest.raises(InputError) as refused:
        write_gguf(source, tmp_path / "gpt2.gguf")
    assert str(refused.value) == ("--vs-llamacpp: the GGUF writer handles Llama-architecture "
                                  "models (llama, mistral); this model is 'gpt2'")
    assert list(tmp_path.iterdir()) == []  # no file, not even a partial one


def test_gguf_cache_is_leapc_cache_gguf_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPC_CACHE", str(tmp_path / "cache"))
    source = tiny_source("llama")
    digest = weights_sha256(source.model)
    path = cached_gguf(source, digest, GGUFType.F32)
    assert path == (tmp_path / "cache" / "gguf" /
                    f"{digest[:16]}-f32-ctx{MAX_POSITIONS}-v{WRITER_VERSION}.gguf")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    monkeypatch.setattr("leapc.gguf_export.write_gguf", None)  # a second write would fail
    assert cached_gguf(source, digest, GGUFType.F32) == path


def test_gguf_cache_that_cannot_be_created_is_one_input_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LEAPC_CACHE", str(blocker / "cache"))
    with pytest.raises(InputError) as refused:
        cache_dir("gguf")
    message = str(refused.value)
    assert message.startswith(f"cannot create the GGUF cache {blocker / 'cache' / 'gguf'} (")
    assert message.endswith("); set LEAPC_CACHE to a writable directory")


def test_bench_table_says_where_llama_cpp_first_differs():
    from rich.console import Console

    row = {"policy": "ar", "ran": "ar", "tokens_per_s": 100.0, "tau": 1.0, "steps": 8,
           "calls_per_token": 1.0, "overhead_share": 0.05, "speedup_vs_ar": 1.0, "identical_to_ar": True}
    result = {"model": "m", "backend": "ort", "prompts": 3, "max_new_tokens": 4, "repeats": 1,
              "results": [row],
              "baselines": {"llamacpp_tokens_per_s": 50.0, "llamacpp_identical_to_ar": True,
                            "llamacpp_first_difference": [None, None, None],
                            "llamacpp_q8_tokens_per_s": 80.0,
                            "llamacpp_q8_identical_to_ar": False,
                            "llamacpp_q8_first_difference": [None, 3, 1]}}
    console = Console(width=250, record=True, color_system=None)
    console.print(bench_table(result))
    lines = console.export_text().splitlines()
    f32 = next(line for line in lines if "llama.cpp f32" in line)
    q8 = next(line for line in lines if "llama.cpp q8_0" in line)
    assert "(ar is 2.00× this)" in f32 and f32.rstrip(" │").endswith("yes")
    assert "(ar is 1.25× this)" in q8 and "NO (2/3 prompts, first at token 1)" in q8


def test_bench_vs_llamacpp_without_llama_cpp_is_one_error_line(in_process, engine_dir,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails
    user_error(in_process("bench", engine_dir("tiny-llama"), "--vs-llamacpp", "--repeats", "1"),
               "--vs-llamacpp needs llama-cpp-python", "pip install 'leapc[llamacpp]'")


# ------------------------------------------------------------------ llama.cpp


def test_llama_cpp_greedy_on_the_f32_gguf_is_leapc_ar(tiny_ggufs, engine_dir):
    require_llama_cpp()
    engine = leapc.load(engine_dir("tiny-llama"))
    assert weights_sha256(tiny_source("llama").model) == engine.manifest.model.weights_sha256
    prompts = [[5], [17, 3, 99], [200, 1, 1, 42, 7, 7, 7, 9]]
    runner = LlamaCppGreedy(tiny_ggufs[GGUFType.F32], engine.manifest.max_seq, 8, threads=1)
    try:
        stop = StopConfig(40, ())
        ours = [engine.generate(p, 40).token_ids for p in prompts]
        theirs = [runner.generate(p, stop, engine.manifest.max_seq)[0] for p in prompts]
        # the context limit: 4 tokens of room after a prompt of max_seq - 4
        long = [3] * (engine.manifest.max_seq - 4)
        ours.append(engine.generate(long, 40).token_ids)
        theirs.append(runner.generate(long, stop, engine.manifest.max_seq)[0])
    finally:
        runner.close()
    assert [len(t) for t in theirs] == [40, 40, 40, 4]
    assert theirs == ours


def test_llama_cpp_logits_on_the_f32_gguf_are_the_models(tiny_ggufs):
    """Every position's logits of a prompt (llama.cpp ``logits_all``) against the Hugging
    Face model's: the same numbers up to float32 rounding, so the tensor layout, the RoPE
    row permutation (GQA included), the norms' epsilon and the untied head are all right."""
    llama_cpp = require_llama_cpp()
    import torch

    prompt = [17, 3, 99, 200, 1, 1, 42, 7, 7, 7, 9, 250]
    with torch.inference_mode():
        ours = tiny_source("llama").model(torch.tensor([prompt])).logits[0].numpy()
    llm = llama_cpp.Llama(str(tiny_ggufs[GGUFType.F32]), n_ctx=64, n_batch=16, n_ubatch=16,
                          n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(prompt)
        theirs = np.array(llm.scores[: len(prompt)])
    finally:
        llm.close()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.parametrize("kind", [GGUFType.Q8_0, GGUFType.BF16])
def test_llama_cpp_runs_the_reduced_precision_ggufs(tiny_ggufs, engine_dir, kind):
    require_llama_cpp()
    max_seq = leapc.load(engine_dir("tiny-llama")).manifest.max_seq
    runner = LlamaCppGreedy(tiny_ggufs[kind], max_seq, 8, f32_cache=False, threads=1)
    try:
        tokens, seconds = runner.generate([5, 6], StopConfig(16, ()), max_seq)
    finally:
        runner.close()
    assert len(tokens) == 16 and all(0 <= t < VOCAB for t in tokens) and seconds > 0


@pytest.mark.slow  # builds an engine of its own and benches it in a process (~15 s)
def test_bench_vs_llamacpp_reports_llama_cpp_rows(tmp_path, monkeypatch):
    """End to end, on an engine built from a Hugging Face directory (its source reloads):
    the tiny Llama's EOS (2) is kept, so the stop rule is mirrored too."""
    require_llama_cpp()
    checkpoint = tiny_checkpoint("llama", tmp_path / "model")
    id_tokenizer(VOCAB).save(str(checkpoint / "tokenizer.json"))
    leapc.build(str(checkpoint), tmp_path / "engine", "ort", max_seq=64)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in ("5", "17", "200")))
    out = tmp_path / "bench.json"
    monkeypatch.setenv("LEAPC_CACHE", str(tmp_path / "cache"))
    result = cli("bench", tmp_path / "engine", "--policies", "ar,lookup", "--max-new-tokens",
                 "24", "--repeats", "1", "--prompts", prompts, "--vs-llamacpp", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())["baselines"]
    assert data["llamacpp_tokens_per_s"] > 0 and data["llamacpp_q8_tokens_per_s"] > 0
    assert data["llamacpp_bf16_tokens_per_s"] > 0
    assert data["llamacpp_identical_to_ar"] is True
    assert data["llamacpp_weight_repacking"] is False  # its Q8_0 repacking crashes here
    assert data["llamacpp_first_difference"] == [None, None, None]
    assert len(data["llamacpp_q8_first_difference"]) == 3
    assert isinstance(data["llamacpp_q8_identical_to_ar"], bool)
    assert "llama.cpp f32" in result.stdout and "llama.cpp q8_0" in result.stdout
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache" / "gguf").iterdir()) == \
        ["bf16", "f32", "q8_0"]
    assert not list((tmp_path / "engine").rglob("*.gguf"))  # never into the engine


@pytest.mark.slow
def test_llama_cpp_greedy_on_the_bundled_model_is_leapc_ar(engine_dir, monkeypatch, tmp_path):
    require_llama_cpp()
    from leapc.benchmark import CODE_PROMPTS

    monkeypatch.setenv("LEAPC_CACHE", str(tmp_path))
    engine = leapc.load(engine_dir("bundled"))
    path = llamacpp_ggufs(engine)["llamacpp"]
    prompts = [engine.encode(p) for p in CODE_PROMPTS]
    stop = StopConfig(64, engine.manifest.tokenizer.eos_ids)
    runner = LlamaCppGreedy(path, engine.manifest.max_seq, max(map(len, prompts)))
    try:
        theirs = [runner.generate(p, stop, engine.manifest.max_seq)[0] for p in prompts]
    finally:
        runner.close()
    assert theirs == [engine.generate(p, 64).token_ids for p in prompts]
