"""index_builder: encode a corpus offline into a OneGen index directory (Contract 2).

``python -m index_builder build --checkpoint CKPT --corpus corpus.jsonl --out INDEX``
reads the corpus (JSONL, OneGen db.jsonl, .txt/.md folders; gzip), optionally chunks
it by tokens, encodes every document with the checkpoint's model (``onegen_core.retrieval.encoder``:
document template + [RD], hidden state at [RD]) in length buckets, and writes ``index.faiss``,
``docstore.sqlite`` and ``manifest.json``. Builds are sharded, resumable and atomic,
and run on several ranks under ``torchrun``. ``update`` adds, replaces and deletes documents,
encoding only those, and publishes a new version of the directory (``index_builder.update``).
``info``, ``search`` and ``verify`` inspect the result. The library entry points are
``build_index(BuildConfig(...))`` and ``update_index(UpdateConfig(...))``.
"""

from .builder import BuildResult, build_index
from .config import BuildConfig
from .errors import BuildError, VerifyError
from .update import UpdateConfig, UpdateResult, update_index

__all__ = ["BuildConfig", "BuildError", "BuildResult", "UpdateConfig", "UpdateResult", "VerifyError", "build_index",
           "update_index"]
