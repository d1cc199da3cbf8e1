"""Shared fixtures, and the test tiers.

Tiers: ``make test`` runs every test (CI); ``make test-fast`` runs
``-m "not slow and not aoti and not install"`` for daily work. The markers
(registered in pyproject.toml; ``--strict-markers``):

* ``slow``: builds or runs an engine of the bundled model or of stories260K, or a tiny
  engine of a family other than Llama (tiny Llama ORT / eager engines, built once a session
  in a few seconds, are the fast tier's); trains (heads, adapters, the base recipe);
  sweeps (``auto`` exit layers, skip sets, trees); or takes more than ~5 s otherwise.
* ``shared``: needs ``../shared/models/stories260K`` (those tests skip without it).
* ``aoti``: compiles AOTInductor packages. ``install``: creates a venv and pip-installs.
  Both are also ``slow`` (added automatically).

Most markers are added here, by rule, in ``pytest_collection_modifyitems``:

1. Fixtures: a test using a fixture of ``FIXTURE_MARKS`` (directly or through another
   fixture) gets its markers: the heads / exit / skip engines train, so they are ``slow``;
   a fixture named ``stories`` is stories260K (the engine or the model), so ``shared``.
2. Parameters: a test parametrized (directly or through a fixture's params) with the value
   ``"bundled"`` or ``"stories"`` is ``slow`` when it uses an engine fixture
   (``ENGINE_FIXTURES``, or ``request`` to get one by name), and ``"stories"`` is ``shared``.

Everything else is marked by hand: ``pytestmark`` for whole files, ``pytest.param(...,
marks=...)`` for slow cases of a parametrization (``families.family_params``), a decorator
on single tests. The engine fixtures check the hand marks as they hand out an engine: a
test that gets a bundled, stories260K, non-Llama tiny or aoti engine without the marker
that says so fails, naming the marker (so a test cannot slip into the fast tier unseen).
"""

import os
import pathlib
import signal
import sys
from collections import Counter

import pytest
import torch
from filelock import FileLock

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors
# (tests/kernels/test_triton_*.py). Triton reads TRITON_INTERPRET when it is first imported
# (triton.language builds its own helpers then), and the imports below already import it:
# transformers imports torch._dynamo, which imports triton. Importing torch does not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs two pytest-xdist workers on this machine's two cores: each runs its
# programs (ORT's pool via LEAPC_THREADS, torch's) on one thread instead of fighting for both.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("LEAPC_THREADS", "1")
    torch.set_num_threads(1)
    # xdist workers ignore SIGINT, and an ignored signal stays ignored in every process
    # they start: the tests that Ctrl-C a `leapc` process need it delivered.
    signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from engines import EXIT_LAYERS, SKIP_SETS, require_bundled, require_stories, tiny_source  # noqa: E402

import leapc  # noqa: E402
from leapc import measure  # noqa: E402
from leapc.early_exit import AdapterOptions  # noqa: E402
from leapc.models import corpus  # noqa: E402
from leapc.models.loaders import (  # noqa: E402
    BUNDLED_DRAFT,
    BUNDLED_DRAFT_DIR,
    load_source,
    save_first_layers,
)
from leapc.models.train_adapter import AdapterTraining  # noqa: E402

ENGINE_FIXTURES = {"engine_dir", "heads_engine_dir", "exit_engine_dir", "skip_engine_dir"}
FIXTURE_MARKS = {
    "heads_engine_dir": ("slow",),  # trains heads (tiny, stories) or builds the bundled model
    "exit_engine_dir": ("slow",),  # trains a Kangaroo adapter and sweeps its stop
    "skip_engine_dir": ("slow",),
    "stories": ("shared",),
}
PARAM_MARKS = {"bundled": ("slow",), "stories": ("slow", "shared")}


def pytest_collection_modifyitems(items):
    _mark_by_rule(items)
    _schedule(items)


def _mark_by_rule(items) -> None:
    for item in items:
        fixtures = set(item.fixturenames)
        wanted = {m for name in fixtures & set(FIXTURE_MARKS) for m in FIXTURE_MARKS[name]}
        callspec = getattr(item, "callspec", None)
        values = {v for v in callspec.params.values() if isinstance(v, str)} if callspec else set()
        uses_engine = bool(fixtures & ENGINE_FIXTURES) or "request" in _arguments(item)
        for value in values & set(PARAM_MARKS):
            wanted |= {m for m in PARAM_MARKS[value] if m != "slow" or uses_engine}
        if item.get_closest_marker("aoti") or item.get_closest_marker("install"):
            wanted.add("slow")
        for name in sorted(wanted - {m.name for m in item.iter_markers()}):
            item.add_marker(name)


# `make test` runs `--dist loadfile --no-loadscope-reorder`, with the scheduler below: each
# file is one work unit of a worker (module fixtures are built once), except the files of a
# SHARED_ENGINE_GROUPS entry, which are one unit together: they are the only users of session
# engines that take minutes to build. Apart, both workers asked for such an engine at once
# and one sat idle on the file lock while the other built it. (Not `--dist loadgroup` with
# xdist_group marks: with pytest 9 xdist 3.8 no longer sees the marks and hands out single
# tests.)
SHARED_ENGINE_GROUPS = {
    # the bundled model's heads, early-exit and layer-skip engines
    "bundled-self-drafting": ("runtime/test_early_exit.py", "runtime/test_heads_policies.py",
                              "runtime/test_healing.py", "runtime/test_layer_skip.py",
                              "runtime/test_recorded_outputs.py"),
}
# The longest units (`--durations=0` of `make test`, summed per unit), longest first: they
# are handed out first, so the workers finish together instead of one running a long file
# handed out last while the other idles. The other units follow, most tests first (xdist's
# own order).
LONGEST_FIRST = (
    "bundled-self-drafting", "runtime/test_more_families.py", "cli/test_build_output.py",
    "runtime/test_greedy_equivalence.py", "runtime/test_quantization.py",
    "runtime/test_draft_model.py", "passes/test_unroll_draft_chain.py", "runtime/test_aoti.py",
    "runtime/test_policy_sampling.py", "runtime/test_context_limit.py",
    "runtime/test_diffusion_bundled.py", "runtime/test_batching.py",
    "runtime/test_edge_install.py",
)


def work_unit(nodeid: str) -> str:
    """The work unit of a test: its file (relative to tests/), or its SHARED_ENGINE_GROUPS
    group."""
    path = nodeid.split("::", 1)[0].removeprefix("tests/")
    return next((g for g, files in SHARED_ENGINE_GROUPS.items() if path in files), path)


def _schedule(items) -> None:
    """On an xdist worker, order the tests by work unit as LONGEST_FIRST says (the tests of a
    unit keep their order): the controller hands the units out in that order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    units = [work_unit(item.nodeid) for item in items]
    sizes, first = Counter(units), {}
    for index, unit in enumerate(units):
        first.setdefault(unit, index)
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    order = sorted(range(len(items)), key=lambda i: (
        rank.get(units[i], len(rank)), -sizes[units[i]], first[units[i]], i))
    items[:] = [items[i] for i in order]


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` by `work_unit` instead of by file."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class WorkUnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)


def _arguments(item) -> set[str]:
    function = getattr(item, "function", None)
    return set(function.__code__.co_varnames[: function.__code__.co_argcount]) if function \
        else set()


_running: list = [None]  # the test being set up or run, for check_marks


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running[0] = item


def check_marks(key: str, backend: str = "ort") -> None:
    """Fail the running test if it gets the engine of ``key`` on ``backend`` without the
    markers that engine needs (see the module docstring)."""
    item = _running[0]
    if item is None:
        return
    needed = set()
    if key in ("bundled", "stories") or (key.startswith("tiny-") and key != "tiny-llama"):
        needed.add("slow")
    if key == "stories":
        needed.add("shared")
    if backend == "aoti":
        needed.add("aoti")
    missing = sorted(needed - {m.name for m in item.iter_markers()})
    if missing:
        pytest.fail(f"{item.nodeid} uses the {key} {backend} engine: mark it "
                    f"{' and '.join(missing)} (tests/conftest.py says when)", pytrace=False)


# Enough training for an adapter whose drafts are sometimes accepted, sometimes not.
QUICK_ADAPTER = AdapterTraining(steps=6, sequences=8, eval_sequences=2, context=64)

STORIES_CORPUS = "\n".join([
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "One day, Tom went to the park with his mom. He saw a big dog and a red ball.",
    "The sun was shining and the birds were singing. Lily and Tom played all day.",
] * 4)


@pytest.fixture(scope="session", autouse=True)
def short_build_measurements():
    """Build-time sweeps (exit layer, skip set, Kangaroo's stop) measure less: the tests
    check what a sweep keeps and where it goes, not its numbers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(measure.MEASURE, "prompts", 2)
        patch.setitem(measure.MEASURE, "new_tokens", 32)
        patch.setitem(measure.MEASURE, "repeats", 1)
        yield


def shared_root(tmp_path_factory) -> pathlib.Path:
    """A directory every pytest-xdist worker of this run sees (the session's temp root
    without xdist)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the directory the workers' temp roots share
    (root / "shared").mkdir(exist_ok=True)
    return root / "shared"


def build_once(tmp_path_factory, name: str, build, lock: str | None = None) -> pathlib.Path:
    """The engine ``build(path)`` writes, built by the first worker that asks for ``name``
    (under a file lock, ``lock`` or ``name``); the others, and later asks, find it built."""
    root = shared_root(tmp_path_factory)
    out = root / name
    with FileLock(root / f"{lock or name}.lock"):
        if not (out / "manifest.json").exists():
            build(out)
    return out


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    """``engine_dir(key, backend, quantize="none")`` -> an engine directory built once per
    run.

    ``key`` is ``"stories"`` (../shared, skipped if absent; its draft model is its own
    first four of five layers; its datastore a few stories), ``"bundled"`` (with the
    bundled draft model when its weights exist; its datastore two stdlib packages, not the
    whole corpus, to build fast), or ``"tiny-<family>"`` (a random tiny model taking id
    prompts, max-seq 256).
    """

    def build(key: str, backend: str, quantize: str, out: pathlib.Path) -> None:
        draft = datastore = None
        if key == "stories":
            model, max_seq = load_source(require_stories()), None
            draft = save_first_layers(model, 4, tmp_path_factory.mktemp("stories-draft"))
            datastore = tmp_path_factory.mktemp("stories-datastore") / "stories.txt"
            datastore.write_text(STORIES_CORPUS)
        elif key == "bundled":
            model, max_seq = "bundled", None
            draft = BUNDLED_DRAFT if (BUNDLED_DRAFT_DIR / "model.safetensors").exists() else None
            datastore = [corpus.stdlib_root() / "json", corpus.stdlib_root() / "email"]
        else:
            model, max_seq = tiny_source(key.removeprefix("tiny-")), 256
        leapc.build(model, out, backend, max_seq=max_seq, draft_model=draft,
                    datastore=datastore, quantize=quantize)

    def get(key: str, backend: str = "ort", quantize: str = "none") -> pathlib.Path:
        _check_engine(key, backend)
        name = f"{key}-{backend}" + ("" if quantize == "none" else f"-{quantize}")
        return build_once(tmp_path_factory, name, lambda out: build(key, backend, quantize, out))

    return get


def _check_engine(key: str, backend: str) -> None:
    """Skip or fail the running test before an engine of ``key`` is built for it."""
    check_marks(key, backend)
    if key == "stories":
        require_stories()
    elif key == "bundled":
        require_bundled()


@pytest.fixture(scope="session")
def heads_engine_dir(tmp_path_factory):
    """``heads_engine_dir(key, kind, placement="program", backend="ort")`` -> an engine
    with decoding heads, built once per run: ``"bundled"`` with the heads it ships,
    ``"stories"`` and ``"tiny-llama"`` with heads the recipe trains in a few steps (on
    ``STORIES_CORPUS`` and on random id text)."""
    from tokenizers import pre_tokenizers

    from leapc.heads import HeadsOptions
    from leapc.ir.head_spec import HeadKind, HeadPlacement

    def build(key: str, kind: str, placement: str, backend: str, out: pathlib.Path) -> None:
        text, max_seq, count = tmp_path_factory.mktemp("heads-text") / "text.txt", None, 3
        if key == "bundled":
            model, text, count = "bundled", None, 4
        elif key == "stories":
            model = load_source(require_stories())
            text.write_text(STORIES_CORPUS * 8)
        else:
            model, max_seq = tiny_source(key.removeprefix("tiny-")), 256
            model.tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            text.write_text(" ".join(str(3 + (i * 7919) % 250) for i in range(4000)))
        options = HeadsOptions(count=count, kind=HeadKind(kind), train_text=text,
                               placement=HeadPlacement(placement), training_steps=15,
                               training_sequences=16, training_context=64)
        leapc.build(model, out, backend, max_seq=max_seq, heads=options)

    def get(key: str, kind: str, placement: str = "program", backend: str = "ort"):
        _check_engine(key, backend)
        return build_once(tmp_path_factory, f"{key}-{kind}-{placement}-{backend}",
                          lambda out: build(key, kind, placement, backend, out))

    return get


def _self_spec_engines(tmp_path_factory, kind: str, **options_of_key):
    """``get(key, backend="ort")`` building ``leapc.build(model of key, ..., option=value of
    key)`` once per run (the early-exit and layer-skip engines). The engines of one key
    are built under one lock: both backends' builds may share an input (an adapter)."""

    def build(key: str, backend: str, out: pathlib.Path) -> None:
        if key == "stories":
            model, max_seq = load_source(require_stories()), None
        elif key == "bundled":
            model, max_seq = "bundled", None
        else:
            model, max_seq = tiny_source(key.removeprefix("tiny-")), 256
        options = {name: values[key] for name, values in options_of_key.items()}
        leapc.build(model, out, backend, max_seq=max_seq, **options)

    def get(key: str, backend: str = "ort"):
        _check_engine(key, backend)
        return build_once(tmp_path_factory, f"{key}-{kind}-{backend}",
                          lambda out: build(key, backend, out), lock=f"{key}-{kind}")

    return get


@pytest.fixture(scope="session")
def exit_engine_dir(tmp_path_factory):
    """``exit_engine_dir(key, backend="ort")`` -> an engine with an early exit at
    ``EXIT_LAYERS[key]`` and a briefly trained Kangaroo adapter there (policies early-exit
    and kangaroo), built once per run; both backends of a key share the adapter."""
    root = shared_root(tmp_path_factory)
    for key in EXIT_LAYERS:
        (root / f"adapter-{key}").mkdir(exist_ok=True)
    adapters = {key: AdapterOptions(root / f"adapter-{key}", QUICK_ADAPTER) for key in EXIT_LAYERS}
    return _self_spec_engines(tmp_path_factory, "exit", exit_layer=EXIT_LAYERS,
                              adapter=adapters)


@pytest.fixture(scope="session")
def skip_engine_dir(tmp_path_factory):
    """``skip_engine_dir(key, backend="ort")`` -> an engine with a layer-skip draft bypassing
    ``SKIP_SETS[key]`` (policy layer-skip), built once per session."""
    return _self_spec_engines(tmp_path_factory, "skip", skip=SKIP_SETS)
