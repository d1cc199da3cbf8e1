"""leapc's int8 GEMM kernel alone, in the state the engine sees it: all of the bundled
model's int8 GEMMs back to back, weights evicted from the caches before each pass.

    python bench/bench_q8_gemm.py [--rows 1,8,16,24,32] [--threads 1,2] [--rounds 7]
                                  [--reps 10] [--against main] [--hot]

The kernel (`kernels/native/q8_gemm.c`) is compiled with leapc's own flags
(`leapc.kernels.ort_ops.FLAGS`) together with a small C driver (`bench/native/
q8_gemm_driver.c`) that runs it as `ort_ops.c` does inside ONNX Runtime: a GEMM's rows
quantized on the calling thread, then its column tiles handed out task by task to the
threads (the caller included), which spin between GEMMs. The weights are random, in the
shapes of models/pycoder-15m (per layer the fused qkv, o, gate/up and down projections,
then the head), each in its own buffer; a 96 MB buffer is rewritten before every pass, so
the weights stream from DRAM as they do from one engine step to the next on this shared
host (`--hot` skips that). With ``--against REV[,REV...]`` the kernel of each git revision
(or directory of C sources) is built the same way and timed alternately with the working
tree's, round by round.

Writes bench/results/q8_gemm.{json,md}: per (rows, threads, kernel) the median over
rounds of each round's median pass, ms and GMAC/s.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from leapc.benchmark import save_results
from leapc.kernels import ort_ops

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "native" / "q8_gemm_driver.c"
EVICT_BYTES = 96 << 20


class Gemm(ctypes.Structure):
    _fields_ = [("K", ctypes.c_int64), ("N", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("ws", ctypes.c_void_p)]


def cpu_busy(seconds: float = 0.3) -> float:
    """The share of the machine's CPU time spent busy over the next ``seconds``."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(limit: float = 0.15, patience: float = 600) -> None:
    """Wait (up to ``patience`` s) until the machine is idle: another process on the two
    cores makes a two-thread pass wait for a descheduled thread, milliseconds at a time."""
    end = time.monotonic() + patience
    while cpu_busy() > limit and time.monotonic() < end:
        time.sleep(2)


def model_shapes(config: Path = ROOT / "models" / "pycoder-15m" / "config.json"
                 ) -> list[tuple[int, int]]:
    """(K, N) of every int8 GEMM of a step, in the order the step runs them."""
    c = json.loads(config.read_text())
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    layer = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inter), (inter, hidden)]
    return layer * c["num_hidden_layers"] + [(hidden, c["vocab_size"])]


def build(native: Path, out: Path) -> ctypes.CDLL:
    """The kernel in ``native`` and the driver, compiled with the engine library's flags."""
    command = [ort_ops.os.environ.get("CC", "cc"), *ort_ops.FLAGS, str(native / "q8_gemm.c"),
               str(DRIVER), "-lm", "-o", str(out)]
    subprocess.run(command, check=True)
    lib = ctypes.CDLL(str(out))
    lib.q8_bench.restype = ctypes.c_int
    lib.q8_bench.argtypes = [ctypes.POINTER(Gemm), ctypes.c_int, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_size_t]
    return lib


def sources_at(rev: str, into: Path) -> Path:
    """kernels/native as of git revision ``rev``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kernels/native"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "kernels" / "native"


def main(rows: str = "1,8,16,24,32", threads: str = "1,2", rounds: int = 7, reps: int = 10,
         against: str = "", hot: bool = False, out: str = "q8_gemm") -> None:
    row_list = [int(r) for r in rows.split(",")]
    thread_list = [int(t) for t in threads.split(",")]
    shapes = model_shapes()
    rng = np.random.default_rng(0)
    weights = [(rng.integers(0, 256, k * n, dtype=np.uint8),
                rng.uniform(1e-3, 2e-2, k // 32 * n).astype(np.float32)) for k, n in shapes]
    gemms = (Gemm * len(shapes))(*(Gemm(k, n, w.ctypes.data, s.ctypes.data)
                                   for (k, n), (w, s) in zip(shapes, weights, strict=True)))
    x = rng.standard_normal(max(row_list) * max(k for k, _ in shapes)).astype(np.float32)
    evict = np.zeros(0 if hot else EVICT_BYTES, np.uint8)
    macs = sum(k * n for k, n in shapes)

    work = Path(tempfile.mkdtemp(prefix="q8bench-"))
    try:
        kernels = {"current": build(ROOT / "kernels" / "native", work / "current.so")}
        for i, other in enumerate(o for o in against.split(",") if o):
            native = Path(other) if Path(other).is_dir() else sources_at(other, work / str(i))
            kernels[other] = build(native, work / f"against{i}.so")
        samples: dict[tuple[int, int, str], list[float]] = {}
        names = list(kernels)
        for round_ in range(rounds):
            for m in row_list:
                for t in thread_list:
                    wait_for_idle()
                    # each round starts with another kernel: the first after a wait ran
                    # slower (clocks, caches), and a fixed order biased the comparison
                    shift = round_ % len(names)
                    for name in names[shift:] + names[:shift]:
                        lib = kernels[name]
                        times = np.zeros(reps)
                        if lib.q8_bench(gemms, len(shapes), m, x.ctypes.data, t, reps,
                                        times.ctypes.data, evict.ctypes.data, evict.size):
                            raise MemoryError("q8_bench: out of memory")
                        samples.setdefault((m, t, name), []).append(float(np.median(times)))
    finally:
        shutil.rmtree(work)

    results = []
    for (m, t, name), values in samples.items():
        ms = statistics.median(values)
        results.append({"rows": m, "threads": t, "kernel": name, "ms": ms,
                        "gmac_per_s": m * macs / ms * 1e-6, "rounds": values})
    others = list(kernels)[1:]
    lines = ["| rows | threads | " + " | ".join(f"{n} ms (GMAC/s)" for n in kernels)
             + "".join(f" | current / {o}" for o in others) + " |",
             "| --- | --- |" + " --- |" * (len(kernels) + len(others))]
    by = {(r["rows"], r["threads"], r["kernel"]): r for r in results}
    for m in row_list:
        for t in thread_list:
            cells = [f"{by[m, t, n]['ms']:.3f} ({by[m, t, n]['gmac_per_s']:.0f})" for n in kernels]
            cells += [f"{by[m, t, 'current']['ms'] / by[m, t, o]['ms']:.3f}" for o in others]
            lines.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
    state = "hot (no eviction)" if hot else f"weights evicted ({EVICT_BYTES >> 20} MB rewritten)"
    caption = (f"int8 GEMMs of models/pycoder-15m ({len(shapes)} GEMMs, {macs / 1e6:.1f} M MACs "
               f"a row) back to back, {state} before each pass; median over {rounds} rounds "
               f"of each round's median of {reps} passes"
               + "".join(f", alternating with `{o}`'s kernel" for o in others)
               + " (`python bench/bench_q8_gemm.py`)")
    save_results(ROOT / "bench" / "results", out, results, caption, "\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
