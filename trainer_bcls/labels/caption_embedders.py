"""Caption embedders behind one small interface, used to compute continuous relevance labels.

Each embedder maps captions to L2-normalised rows ``e(c)`` so that ``cos(e(a), e(b)) = e(a) · e(b)``:

- :class:`SentenceEmbeddingRelevance`: any HF text encoder, pooled over the attention mask (mean by default),
  ``e(c) = pool(h(c)) / ||pool(h(c))||``; ``sentence-transformers/all-MiniLM-L6-v2`` is the recommended model.
- :class:`TfidfRelevance`: TF-IDF over word 1-4-grams fitted on the split's captions (no model). Rows are sparse
  (Flickr8k train: 30k captions × ~400k n-grams, ~1.5M non-zeros), so they stay a ``scipy.sparse.csr_matrix``.
- :class:`PrecomputedRelevance`: embeddings a user already has (``.npy`` or ``.safetensors`` key ``"embeddings"``),
  row ``k`` = caption id ``k`` of the split.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Union

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..data.errors import InvalidDataError

Embeddings = Union[np.ndarray, sp.csr_matrix]


def l2_normalize(x: Embeddings) -> Embeddings:
    """Row-wise ``x / ||x||`` (zero rows stay zero), float32."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms).astype(np.float32) @ x)
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


class CaptionEmbedder(ABC):
    """``embed(captions) -> [N, D]`` L2-normalised rows (dense float32 or sparse CSR).

    ``fit(captions)`` is called with all captions of the split first (a no-op unless the embedder is fitted, like
    TF-IDF). ``cache_key`` identifies the embedder's output for the on-disk cache; ``is_lookup`` embedders
    (precomputed) encode nothing and are never cached.
    """

    is_lookup: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    @abstractmethod
    def cache_key(self) -> str: ...

    def fit(self, captions: list[str]) -> CaptionEmbedder:
        return self

    @abstractmethod
    def embed(self, captions: list[str], show_progress_bar: bool = True) -> Embeddings: ...


class SentenceEmbeddingRelevance(CaptionEmbedder):
    """Sentence embeddings of any HF text encoder (``AutoModel``), pooled over the attention mask.

    ``mean``: ``Σ_t m_t h_t / Σ_t m_t`` (sentence-transformers' mean pooling), ``cls``: ``h_0``, ``max``: masked max.
    Throughput matches ``SentenceTransformer.encode``: captions are tokenised once, sorted by token length and
    batched (``batch_size``) so padding is minimal, under ``torch.inference_mode``.

    Args:
        model_name_or_path: a local folder or Hub id (``sentence-transformers/all-MiniLM-L6-v2`` recommended).
        max_length: truncation length; default the model's ``sentence_bert_config.json`` ``max_seq_length`` (as
            sentence-transformers), else ``min(tokenizer.model_max_length, 512)``.
        device: default CUDA when available, else CPU.
    """

    POOLINGS = ("mean", "cls", "max")

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = "sentence-transformers/all-MiniLM-L6-v2",
        pooling: str = "mean",
        batch_size: int = 32,
        max_length: int | None = None,
        device: str | torch.device | None = None,
    ):
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.model_name_or_path = str(model_name_or_path)
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._max_length = max_length
        self._tokenizer = None
        self._model = None

    def __getstate__(self):  # never pickle the model
        state = self.__dict__.copy()
        state["_tokenizer"] = state["_model"] = None
        return state

    def _local_dir(self) -> Path | None:
        path = Path(self.model_name_or_path).expanduser()
        return path if path.is_dir() else None

    @property
    def max_length(self) -> int:
        if self._max_length is None:
            config = self._sentence_bert_config()
            if config is not None and "max_seq_length" in config:
                self._max_length = int(config["max_seq_length"])
            else:
                self._max_length = min(int(self.tokenizer.model_max_length), 512)
        return self._max_length

    def _sentence_bert_config(self) -> dict | None:
        """The model's ``sentence_bert_config.json`` (local folder or Hub cache), if it has one."""
        local = self._local_dir()
        try:
            if local is not None:
                path = local / "sentence_bert_config.json"
            else:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(self.model_name_or_path, "sentence_bert_config.json"))
            return json.loads(path.read_text()) if path.is_file() else None
        except Exception:  # no such file, offline without a cached copy, ...
            return None

    @property
    def cache_key(self) -> str:
        parts = [f"sentence:{self.model_name_or_path}", self.pooling, str(self.max_length)]
        local = self._local_dir()
        if local is not None:  # a folder's weights can change under the same name: key on their size and mtime
            for weights in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")):
                stat = weights.stat()
                parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(parts)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModel

            self._model = AutoModel.from_pretrained(self.model_name_or_path).to(self.device).eval()
        return self._model

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)

    @torch.inference_mode()
    def embed(self, captions: list[str], show_progress_bar: bool = True) -> np.ndarray:
        tokenizer, model = self.tokenizer, self.model
        encoded = tokenizer(
            list(captions), truncation=True, max_length=self.max_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        order = np.argsort(-lengths, kind="stable")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = None
        for start in tqdm(
            range(0, len(order), self.batch_size), desc="Embedding captions", disable=not show_progress_bar
        ):
            idx = order[start : start + self.batch_size]
            width = int(lengths[idx].max())
            input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
            attention_mask = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                input_ids[r, : lengths[i]] = encoded[i]
                attention_mask[r, : lengths[i]] = 1
            input_ids_t = torch.from_numpy(input_ids).to(self.device)
            mask_t = torch.from_numpy(attention_mask).to(self.device)
            hidden = model(input_ids=input_ids_t, attention_mask=mask_t).last_hidden_state
            pooled = torch.nn.functional.normalize(self._pool(hidden, mask_t).float(), dim=-1).cpu().numpy()
            if out is None:
                out = np.empty((len(captions), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled
        if out is None:
            return np.zeros((0, int(getattr(model.config, "hidden_size", 0))), dtype=np.float32)
        return out


class TfidfRelevance(CaptionEmbedder):
    """TF-IDF of word n-grams (``ngram_range``), fitted on the split's captions; rows L2-normalised, sparse CSR.

    Defaults follow scikit-learn's ``TfidfVectorizer`` (lowercase, ``token_pattern`` of 2+ character words, smooth
    idf); ``max_features`` caps the vocabulary to the most frequent n-grams.
    """

    def __init__(self, ngram_range: tuple[int, int] = (1, 4), max_features: int | None = None, **vectorizer_kwargs):
        self.ngram_range = tuple(ngram_range)
        self.max_features = max_features
        self.vectorizer_kwargs = vectorizer_kwargs
        self._vectorizer = None

    @property
    def cache_key(self) -> str:
        return f"tfidf:{self.ngram_range}:{self.max_features}:{sorted(self.vectorizer_kwargs.items())}"

    def fit(self, captions: list[str]) -> TfidfRelevance:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vectorizer = TfidfVectorizer(
            ngram_range=self.ngram_range, max_features=self.max_features, dtype=np.float32, **self.vectorizer_kwargs
        ).fit(captions)
        return self

    def embed(self, captions: list[str], show_progress_bar: bool = True) -> sp.csr_matrix:
        if self._vectorizer is None:
            raise RuntimeError("TfidfRelevance.embed before fit: call fit(captions of the split) first")
        return l2_normalize(self._vectorizer.transform(captions))


class PrecomputedRelevance(CaptionEmbedder):
    """Embeddings the user already has: ``[N_captions, D]`` rows aligned to the split's caption ids.

    ``path``: ``.npy`` (loaded with ``allow_pickle=False``) or ``.safetensors`` (tensor ``key``, default
    ``"embeddings"``). Rows are L2-normalised here. A row count that differs from the split's caption count raises.
    """

    is_lookup = True

    def __init__(self, path: str | os.PathLike, key: str = "embeddings"):
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise FileNotFoundError(f"precomputed embeddings not found: {self.path}")

    @property
    def cache_key(self) -> str:
        stat = self.path.stat()
        return f"precomputed:{self.path.resolve()}:{self.key}:{stat.st_size}:{stat.st_mtime_ns}"

    def load(self) -> np.ndarray:
        if self.path.suffix == ".npy":
            array = np.load(self.path, allow_pickle=False)
        elif self.path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(self.path))
            if self.key not in tensors:
                raise InvalidDataError(f"{self.path}: no tensor {self.key!r}; tensors: {sorted(tensors)}")
            array = tensors[self.key]
        else:
            raise ValueError(f"{self.path}: expected a .npy or .safetensors file")
        if array.ndim != 2:
            raise InvalidDataError(f"{self.path}: expected a [N_captions, D] matrix, got shape {array.shape}")
        return array

    def embed(self, captions: list[str], show_progress_bar: bool = True) -> np.ndarray:
        array = self.load()
        if array.shape[0] != len(captions):
            raise InvalidDataError(
                f"{self.path} has {array.shape[0]} rows but the split has {len(captions)} captions: row k must be the "
                f"embedding of caption_id k (0..{len(captions) - 1})"
            )
        if not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise InvalidDataError(f"{self.path}: non-finite values in row {row} (caption_id {row})")
        return l2_normalize(array)


def caption_key(captions: list[str]) -> str:
    """Content hash of a split's captions in caption-id order (the dataset half of the cache key)."""
    h = hashlib.sha256()
    h.update(str(len(captions)).encode())
    for caption in captions:
        h.update(b"\x1e")
        h.update(caption.encode("utf-8"))
    return h.hexdigest()
