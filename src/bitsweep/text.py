"""Evaluation and calibration text, and the token windows every runner is scored on.

Evaluation and calibration text never overlap: importance matrices and static calibration see only the
calibration text. Token windows are made once, by the reference tokenizer, and every backend is fed those
same ids (never its own re-tokenisation of the text), so perplexity and KL divergence compare like with like.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bitsweep.errors import ConfigError

if TYPE_CHECKING:
    from bitsweep.config import TextConfig

log = logging.getLogger(__name__)


def pydoc_texts(calib_fraction: float) -> tuple[str, str]:
    """Split Python's own documentation topics into (eval, calibration) text.

    Topics are sorted by name and every k-th goes to calibration, so both halves cover the same kind of prose
    and the split is the same on every machine with the same Python version.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    every = max(2, round(1 / calib_fraction))
    calib = [topics[n] for i, n in enumerate(names) if i % every == every - 1]
    evals = [topics[n] for i, n in enumerate(names) if i % every != every - 1]
    return "\n\n".join(evals), "\n\n".join(calib)


def wikitext2_texts() -> tuple[str, str]:
    """wikitext-2 raw: test split for evaluation, train split for calibration (needs the hub)."""
    from datasets import load_dataset

    def joined(split: str) -> str:
        return "".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])

    return joined("test"), joined("train")


def load_texts(cfg: TextConfig) -> tuple[str, str]:
    if cfg.source == "pydoc":
        return pydoc_texts(cfg.calib_fraction)
    if cfg.source == "wikitext2":
        return wikitext2_texts()
    return Path(cfg.path).read_text(), Path(cfg.calib_path).read_text()


def write_texts(cfg: TextConfig, eval_out: str | Path, calib_out: str | Path) -> dict[str, object]:
    eval_text, calib_text = load_texts(cfg)
    for path, text in ((eval_out, eval_text), (calib_out, calib_text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return {
        "eval_chars": len(eval_text),
        "calib_chars": len(calib_text),
        "eval_sha256": hashlib.sha256(eval_text.encode()).hexdigest(),
        "calib_sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
    }


@dataclass(frozen=True)
class Windows:
    """Token windows: ``ids`` is (n_windows, n_ctx) int32; every runner scores exactly these."""

    ids: np.ndarray
    text_sha256: str
    tokenizer: str
    decoded_sha256: tuple[str, ...]  # sha256 of the reference tokenizer's bytes for each window
    # The text each window scores (its tokens 1..n-1, decoded): bytes and words (lm-eval's count,
    # len(re.split(r"\s+", text))), for the word- and byte-normalised protocol.
    scored_bytes: tuple[int, ...] = ()
    scored_words: tuple[int, ...] = ()
    bos: int = -1  # the BOS id written over token 0 of every window, or -1 (the vocabulary adds none)

    @property
    def n_windows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.ids.shape[1])

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.ids, dtype=np.int32).tobytes()).hexdigest()

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            ids=self.ids.astype(np.int32),
            text_sha256=self.text_sha256,
            tokenizer=self.tokenizer,
            decoded_sha256=np.array(self.decoded_sha256),
            scored_bytes=np.array(self.scored_bytes, dtype=np.int64),
            scored_words=np.array(self.scored_words, dtype=np.int64),
            bos=self.bos,
        )

    @classmethod
    def load(cls, path: str | Path) -> Windows:
        with np.load(path) as data:
            return cls(
                data["ids"],
                str(data["text_sha256"]),
                str(data["tokenizer"]),
                tuple(map(str, data["decoded_sha256"])),
                tuple(map(int, data["scored_bytes"])),
                tuple(map(int, data["scored_words"])),
                int(data["bos"]),
            )


def make_windows(ids: list[int] | np.ndarray, n_ctx: int, n_windows: int) -> np.ndarray:
    """Cut a token stream into ``n_windows`` consecutive, non-overlapping windows of ``n_ctx`` tokens."""
    ids = np.asarray(ids, dtype=np.int32)
    available = len(ids) // n_ctx
    if available < 1:
        raise ConfigError(f"eval text has {len(ids)} tokens: too short for one window of n_ctx={n_ctx}")
    if available < n_windows:
        raise ConfigError(
            f"eval text has {len(ids)} tokens = {available} windows of {n_ctx}; asked for n_windows={n_windows}"
        )
    return ids[: n_windows * n_ctx].reshape(n_windows, n_ctx)


def added_bos(tokenizer) -> int:
    """The BOS id this tokenizer puts in front of a text, or -1 when its vocabulary adds none (SmolLM2)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and ids and ids[0] == bos else -1


def count_words(text: str) -> int:
    r"""Words as lm-eval's perplexity tasks count them (wikitext: ``len(re.split(r"\s+", doc))``)."""
    return len(re.split(r"\s+", text))


def tokenize_windows(model_dir: str | Path, text_path: str | Path, n_ctx: int, n_windows: int) -> Windows:
    """Tokenize the eval text with the reference (Hugging Face) tokenizer, without special tokens.

    For a vocabulary that adds BOS, token 0 of every window becomes BOS, as llama-perplexity does with each
    chunk (so both score the same ids); every runtime is fed these ids either way.
    """
    from transformers import AutoTokenizer

    text = Path(text_path).read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # split_special_tokens: literal "<filename>" in prose is text, not a control token.
    encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    ids = make_windows(encoded["input_ids"], n_ctx, n_windows).copy()
    bos = added_bos(tokenizer)
    if bos >= 0:
        ids[:, 0] = bos

    def decode(w: np.ndarray) -> str:
        return tokenizer.decode(w.tolist(), clean_up_tokenization_spaces=False)

    scored = [decode(w[1:]) for w in ids]
    return Windows(
        ids=ids,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        tokenizer=type(tokenizer).__name__,
        decoded_sha256=tuple(hashlib.sha256(decode(w).encode()).hexdigest() for w in ids),
        scored_bytes=tuple(len(t.encode()) for t in scored),
        scored_words=tuple(count_words(t) for t in scored),
        bos=bos,
    )


def fast_tokenizer(folder: str | Path):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None when it has none (a slow,
    sentencepiece-only tokenizer).

    That file is the backend transformers' fast tokenizer saved and wraps: its ``decode(ids,
    skip_special_tokens=False)`` is ``PreTrainedTokenizerFast.decode`` without clean-up, and with
    ``encode_special_tokens`` set its ``encode(text, add_special_tokens=False)`` gives the ids of
    ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)`` (tests/test_architectures.py checks
    both on every architecture). Importing transformers' tokenizers costs ~6 s per workflow job; this, 0.03 s.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def text_ids(tokenizer_dir: str | Path, text: str) -> list[int]:
    """The ids of ``text`` without added special tokens, control-token strings in it read as plain text."""
    fast = fast_tokenizer(tokenizer_dir)
    if fast is not None:
        fast.encode_special_tokens = True
        return fast.encode(text, add_special_tokens=False).ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def calibration_windows(
    tokenizer_dir: str | Path, text_path: str | Path, n_ctx: int, n_samples: int
) -> np.ndarray:
    """Up to ``n_samples`` windows of ``n_ctx`` tokens of the calibration text (never the evaluation text)."""
    ids = text_ids(tokenizer_dir, Path(text_path).read_text())
    return make_windows(ids, n_ctx, min(n_samples, len(ids) // n_ctx))
