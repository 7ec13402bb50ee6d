"""Similarity between problems and skill-bank entries: sentence embeddings, or TF-IDF cosine.

The embedding retriever is used when ``sentence-transformers`` is installed and
its model is already on disk (no download is attempted). The fallback is a
TF-IDF cosine written here with the standard library rather than through
scikit-learn: it is a dozen lines, adds no dependency, and gives the same
numbers wherever it runs (the corpora are at most a few dozen entries, so
speed is not a concern). Documents are lower-cased word tokens
(``[a-z0-9_]+``); idf is smoothed as ``log((1 + N) / (1 + df)) + 1``
(scikit-learn's default), and vectors are L2-normalised.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Protocol, Sequence

_WORD = re.compile(r"[a-z0-9_]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def tfidf_cosine(queries: Sequence[str], docs: Sequence[str]) -> list[list[float]]:
    """Cosine similarities (len(queries) x len(docs)) of TF-IDF vectors fit on ``docs``.

    Query words absent from the documents carry no weight; an empty vector has
    similarity 0 with everything.
    """
    doc_words = [words(d) for d in docs]
    n = len(docs)
    df = Counter(w for ws in doc_words for w in set(ws))
    idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}

    def vec(ws: list[str]) -> dict[str, float]:
        tf = Counter(w for w in ws if w in idf)
        v = {w: c * idf[w] for w, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {w: x / norm for w, x in v.items()} if norm > 0 else {}

    dv = [vec(ws) for ws in doc_words]
    out = []
    for q in queries:
        qv = vec(words(q))
        out.append([sum(x * d.get(w, 0.0) for w, x in qv.items()) for d in dv])
    return out


class Similarity(Protocol):
    name: str

    def __call__(self, queries: Sequence[str], docs: Sequence[str]) -> list[list[float]]: ...


class TfidfSimilarity:
    name = "tfidf"

    def __call__(self, queries: Sequence[str], docs: Sequence[str]) -> list[list[float]]:
        return tfidf_cosine(queries, docs)


class EmbeddingSimilarity:
    """Cosine of sentence-transformers embeddings (normalised)."""

    name = "embedding"

    def __init__(self, model_name: str) -> None:
        from sentence_transformers import SentenceTransformer  # guarded by make_similarity

        self.model = SentenceTransformer(model_name, local_files_only=True)

    def __call__(self, queries: Sequence[str], docs: Sequence[str]) -> list[list[float]]:
        if not queries or not docs:
            return [[0.0] * len(docs) for _ in queries]
        q = self.model.encode(list(queries), normalize_embeddings=True, convert_to_tensor=True)
        d = self.model.encode(list(docs), normalize_embeddings=True, convert_to_tensor=True)
        return (q @ d.T).float().cpu().tolist()


def make_similarity(kind: str = "auto", model_name: str = "", log: Callable[[str], None] | None = None) -> Similarity:
    """The retriever's similarity: ``embedding``, ``tfidf``, or ``auto`` (embedding if usable, else tfidf)."""
    if kind == "tfidf":
        return TfidfSimilarity()
    try:
        return EmbeddingSimilarity(model_name)
    except Exception as e:  # not installed, or the model is not on disk
        if kind == "embedding":
            raise ValueError(f"sgsd.retriever=embedding: cannot load sentence-transformers model "
                             f"{model_name!r} ({type(e).__name__}: {e}); install sentence-transformers and the "
                             "model, or use --sgsd.retriever tfidf") from None
        if log is not None:
            log(f"sgsd: sentence embeddings unavailable ({type(e).__name__}); retrieving by TF-IDF cosine")
        return TfidfSimilarity()
