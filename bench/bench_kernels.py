"""Triton ``tree_attention`` against the pure-torch reference and dense SDPA, on CUDA.

    python bench/bench_kernels.py [--pasts 64,1024,4096] [--sizes 1,8,32] [--dtype float16]

One attention call of a verify step: a heap-shaped tree of N nodes (node i's parent is
(i - 1) // 2) over ``past`` valid cache slots, for two head layouts (the bundled model's
10 query / 2 KV heads of dim 32, and a Llama-8B-like 32 / 8 of dim 128). Each kernel's
output is first checked against the reference, then timed with `triton.testing.do_bench`
(median ms). Writes bench/results/kernels.{json,md}.

Without CUDA (or triton) there is nothing to time: the script says why and exits 0. The
kernel's correctness on the CPU is covered by tests/kernels/test_triton_tree_attention.py
under Triton's interpreter, whose speed says nothing about a GPU's.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import typer

from leapc.benchmark import save_results

ROOT = Path(__file__).resolve().parents[1]
# (name, batch, heads, kv_heads, head_dim)
LAYOUTS = [("bundled", 1, 10, 2, 32), ("llama-8b", 1, 32, 8, 128)]


def unavailable() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the Triton kernel only runs on a GPU (tests cover it on the CPU)"
    return None


def attention_inputs(layout, past: int, new: int, dtype):
    import torch

    from leapc.ir.tree import tree_from_parents

    _, batch, heads, kv_heads, head_dim = layout
    tree = tree_from_parents([-1, *((i - 1) // 2 for i in range(1, new))])
    q = torch.randn(batch, heads, new, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, past + new, head_dim, device="cuda", dtype=dtype)
            for _ in range(2))
    past_len = torch.full((batch,), past, device="cuda")
    tree_mask = torch.from_numpy(tree.ancestor_mask).cuda().expand(batch, new, new)
    return q, k, v, past_len, tree_mask


def implementations():
    """name -> callable(q, k, v, past_len, tree_mask, scale)."""
    import torch

    from leapc.kernels import reference, triton_tree_attention

    def dense_sdpa(q, k, v, past_len, tree_mask, scale):
        mask = reference.visible_keys(past_len, tree_mask, k.shape[2] - q.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)

    return {"reference": reference.tree_attention, "sdpa": dense_sdpa,
            "triton": triton_tree_attention.tree_attention}


def measure(layout, past: int, new: int, dtype) -> dict:
    import torch
    from triton.testing import do_bench

    inputs = attention_inputs(layout, past, new, dtype)
    scale = inputs[0].shape[-1] ** -0.5
    kernels = implementations()
    exact = [t.float() if t.is_floating_point() else t for t in inputs]
    want = kernels["reference"](*exact, scale)  # float32: the half reference rounds more
    row = {"layout": layout[0], "past": past, "N": new}
    for name, kernel in kernels.items():
        torch.testing.assert_close(kernel(*inputs, scale).float(), want, atol=1e-2, rtol=1e-2)
        row[f"{name}_ms"] = do_bench(lambda kernel=kernel: kernel(*inputs, scale),
                                     return_mode="median")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| layout | past | N | reference ms | sdpa ms | triton ms | reference / triton |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['layout']} | {r['past']} | {r['N']} | {r['reference_ms']:.3f} | "
              f"{r['sdpa_ms']:.3f} | {r['triton_ms']:.3f} | "
              f"{r['reference_ms'] / r['triton_ms']:.2f}× |" for r in rows]
    return "\n".join(lines)


def main(pasts: str = "64,1024,4096", sizes: str = "1,8,32", dtype: str = "float16") -> None:
    reason = unavailable()
    if reason:
        print(f"bench_kernels: skipped: {reason}")
        raise typer.Exit(0)
    import torch

    torch_dtype = getattr(torch, dtype)
    rows = []
    for layout in LAYOUTS:
        for past in map(int, pasts.split(",")):
            for new in map(int, sizes.split(",")):
                rows.append(measure(layout, past, new, torch_dtype))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    setup = {"device": torch.cuda.get_device_name(), "dtype": dtype,
             "torch": torch.__version__, "machine": platform.machine()}
    save_results(ROOT / "bench" / "results", "kernels", {"setup": setup, "rows": rows},
                 f"`leapc.tree_attention` on {setup['device']} ({dtype}), one call, heap-shaped "
                 f"tree of N nodes over a full past, median of `triton.testing.do_bench` "
                 f"(`python bench/bench_kernels.py`).", markdown(rows))


if __name__ == "__main__":
    typer.run(main)
