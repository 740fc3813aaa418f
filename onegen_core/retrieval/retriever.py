"""Retrievers: a small protocol, an exact torch-matmul backend and a FAISS backend.

Both take a batch of L2-normalised query vectors [n, d] (every sequence that hit a
query RET token in one engine step) and return, per query, the top-k hits by inner
product, with the document's id, title and text (text is needed for insertion; the
engine strips it from traces unless the request asked for passages).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..formats.index_store import Document, IndexStore, import_faiss


@dataclass
class RetrievalHit:
    """One document a search found for one query."""

    doc_id: str
    score: float
    vector_id: int = -1
    title: str | None = None
    text: str | None = None  # only when the request asked for passages
    metadata: dict[str, Any] | None = None


class Retriever(Protocol):
    dim: int

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> list[list[RetrievalHit]]: ...

    def __len__(self) -> int: ...


def _hits(scores: np.ndarray, ids: np.ndarray, docs_for: Callable[[list[int]], list[Document | None]]) -> list[list[RetrievalHit]]:
    out: list[list[RetrievalHit]] = []
    for srow, irow in zip(scores, ids, strict=True):
        valid = [(float(s), int(i)) for s, i in zip(srow, irow, strict=True) if i >= 0]
        docs = docs_for([i for _, i in valid])
        out.append([
            RetrievalHit(doc_id=d.id, score=s, vector_id=i, title=d.title, text=d.text, metadata=d.metadata)
            for (s, i), d in zip(valid, docs, strict=True) if d is not None
        ])
    return out


class TorchRetriever:
    """Exact search by one matmul on the model's device (small corpora, tests, GPU-resident indexes)."""

    def __init__(self, vectors: torch.Tensor | np.ndarray, documents: list[Document], device: str | torch.device = "cpu"):
        v = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(np.asarray(vectors, dtype=np.float32))
        if v.ndim != 2 or v.shape[0] != len(documents):
            raise ValueError(f"need [n, d] vectors for n documents; got {tuple(v.shape)} for {len(documents)}")
        self.vectors = v.float().to(device)
        self.documents = documents
        self.dim = v.shape[1]

    @classmethod
    def from_index(cls, store: IndexStore, device: str | torch.device = "cpu") -> TorchRetriever:
        """Load every vector of an index dir onto ``device`` (flat indexes: exact, same scores as FAISS)."""
        n = store.index.ntotal
        vecs = store.index.reconstruct_n(0, n)
        docs = store.docstore.get(list(range(n)))
        return cls(vecs, [d for d in docs if d is not None], device)

    def __len__(self) -> int:
        return len(self.documents)

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> list[list[RetrievalHit]]:
        q = torch.as_tensor(queries).float().to(self.vectors.device)
        k = min(k, len(self.documents))
        if k == 0:
            return [[] for _ in range(q.shape[0])]
        scores, ids = (q @ self.vectors.T).topk(k, dim=-1)  # [n, k]
        return _hits(scores.cpu().numpy(), ids.cpu().numpy(), lambda ii: [self.documents[i] for i in ii])


class FaissRetriever:
    """Search an index directory's ``index.faiss`` (CPU, or GPU with faiss-gpu); documents from its docstore."""

    def __init__(self, store: IndexStore, *, nprobe: int | None = None, ef_search: int | None = None,
                 use_gpu: bool = False):
        self.store = store
        self.index = store.index
        self.dim = store.manifest.dim
        faiss = import_faiss()
        if nprobe is not None or ef_search is not None:
            ps = faiss.ParameterSpace()
            if nprobe is not None:
                ps.set_index_parameter(self.index, "nprobe", nprobe)
            if ef_search is not None:
                ps.set_index_parameter(self.index, "efSearch", ef_search)
        if use_gpu:
            if not hasattr(faiss, "StandardGpuResources"):
                raise ImportError("FAISS GPU search needs the GPU build: pip install 'onegen[gpu]'")
            self._res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._res, int(os.environ.get("ONEGEN_FAISS_GPU", "0")), self.index)

    def __len__(self) -> int:
        return self.store.manifest.count

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> list[list[RetrievalHit]]:
        q = queries.detach().float().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in range(q.shape[0])]
        scores, ids = self.index.search(q, k)
        return _hits(scores, ids, self.store.docstore.get)


def make_retriever(store: IndexStore, choice: str, device: torch.device) -> Retriever:
    """The retriever for an index dir: ``torch`` (exact matmul on ``device``), ``faiss``, or ``auto`` (torch for a
    flat index on a GPU, where one matmul beats a CPU search; FAISS otherwise)."""
    if choice not in ("auto", "faiss", "torch"):
        raise ValueError(f"retriever must be auto, faiss or torch, got {choice!r}")
    flat = store.manifest.factory.replace("IDMap,", "") == "Flat"
    if choice == "torch" or (choice == "auto" and flat and device.type == "cuda"):
        return TorchRetriever.from_index(store, device=device)
    return FaissRetriever(store)
