"""Build an engine's retrieval datastore from text (`leapc build --datastore`).

The source is ``"bundled"`` (the bundled model's own training corpus: the standard
library minus its held-out files, so benchmarks on held-out prompts stay honest) or a
list of files and directories (every UTF-8 file under a directory, recursively). Text is
tokenized with the engine's tokenizer, one document per file, without special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from leapc.ir.errors import InputError
from leapc.models import corpus
from leapc.models.loaders import BUNDLED
from leapc.runtime.datastore import SUFFIXES_FILE, TOKENS_FILE, Datastore
from leapc.runtime.manifest import DatastoreInfo, sha256_file
from leapc.stage import BuildState, Stage

DatastoreSource = str | Path | Sequence[str | Path]
DEPTH = 12  # sorted tokens per suffix: the longest n-gram plus continuation a query may use


def read_texts(source: DatastoreSource) -> tuple[str, list[str]]:
    """A description of the source and its documents."""
    if isinstance(source, str) and source == BUNDLED:
        return BUNDLED, [f.text for f in corpus.read_stdlib() if not f.held_out]
    paths = [Path(source)] if isinstance(source, str | Path) else [Path(p) for p in source]
    texts = [text for path in paths for text in _read(path)]
    if not texts:
        raise InputError(f"datastore source {', '.join(map(str, paths))} holds no UTF-8 text")
    return ", ".join(map(str, paths)), texts


def _read(path: Path) -> list[str]:
    if not path.exists():
        raise InputError(f"datastore source {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # binaries and unreadable files carry no text to retrieve
    return [t for t in texts if t]


def build_datastore(description: str, texts: list[str], tokenizer: Tokenizer, engine_dir: Path,
                    directory: str = "datastore") -> DatastoreInfo:
    """Tokenize ``texts`` (from `read_texts`), index them, save into ``engine_dir``."""
    documents = [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]
    store = Datastore.build(documents, DEPTH)
    store.save(engine_dir / directory)
    return DatastoreInfo(
        directory=directory, source=description, documents=len(documents),
        tokens=store.size - len(documents),
        depth=DEPTH,
        sha256={name: sha256_file(engine_dir / directory / name)
                for name in (TOKENS_FILE, SUFFIXES_FILE)})


def _datastore(state: BuildState) -> None:
    state.on_stage("datastore")
    state.update(datastore=build_datastore(*state.corpus, state.source.tokenizer, state.out))


DATASTORE = Stage("datastore", lambda o: int(o.datastore is not None), _datastore)
