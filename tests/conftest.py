import os
import pathlib
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors
# (tests/kernels/test_triton_*.py). Triton reads TRITON_INTERPRET when it is first imported
# (triton.language builds its own helpers then), and the imports below already import it:
# transformers imports torch._dynamo, which imports triton. Importing torch does not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from engines import require_bundled, require_stories, tiny_source  # noqa: E402

import leapc  # noqa: E402
from leapc.models import corpus  # noqa: E402
from leapc.models.loaders import (  # noqa: E402
    BUNDLED_DRAFT,
    BUNDLED_DRAFT_DIR,
    load_source,
    save_first_layers,
)

STORIES_CORPUS = "\n".join([
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "One day, Tom went to the park with his mom. He saw a big dog and a red ball.",
    "The sun was shining and the birds were singing. Lily and Tom played all day.",
] * 4)


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    """``engine_dir(key, backend)`` -> an engine directory built once per session.

    ``key`` is ``"stories"`` (../shared, skipped if absent; its draft model is its own
    first four of five layers; its datastore a few stories), ``"bundled"`` (with the
    bundled draft model when its weights exist; its datastore two stdlib packages, not the
    whole corpus, to build fast), or ``"tiny-<family>"`` (a random tiny model taking id
    prompts, max-seq 256).
    """
    built = {}

    def get(key: str, backend: str = "ort"):
        if (key, backend) not in built:
            out = tmp_path_factory.mktemp(f"{key}-{backend}")
            draft = datastore = None
            if key == "stories":
                model, max_seq = load_source(require_stories()), None
                draft = save_first_layers(model, 4, tmp_path_factory.mktemp("stories-draft"))
                datastore = tmp_path_factory.mktemp("stories-datastore") / "stories.txt"
                datastore.write_text(STORIES_CORPUS)
            elif key == "bundled":
                require_bundled()
                model, max_seq = "bundled", None
                draft = BUNDLED_DRAFT if (BUNDLED_DRAFT_DIR / "model.safetensors").exists() else None
                datastore = [corpus.stdlib_root() / "json", corpus.stdlib_root() / "email"]
            else:
                model, max_seq = tiny_source(key.removeprefix("tiny-")), 256
            built[key, backend] = leapc.build(model, out, backend, max_seq=max_seq,
                                              draft_model=draft, datastore=datastore)
        return built[key, backend]

    return get
