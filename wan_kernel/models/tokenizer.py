"""Tokenizers for the T5 text encoder: the real umt5 one (transformers) and a built-in byte one.

The real one is ``google/umt5-xxl`` (a folder with ``tokenizer.json``/``spiece.model``; the
official Wan2.1 release ships it as ``google/umt5-xxl/``). It is loaded from a local folder or
the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) nothing is
downloaded. ``builtin:bytes`` is a deterministic tokenizer that needs no file, for demos and
tests with tiny encoders: UTF-8 byte ``b`` -> id ``b + 2``, pad 0, ``</s>`` 1 (T5's pad/eos ids).

Both are called like a transformers tokenizer::

    batch = tok(["a cat"], padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    batch["input_ids"], batch["attention_mask"]   # [B, 512] int64 each
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from wan_kernel.errors import InputError, WeightsError

DEFAULT_TOKENIZER = "google/umt5-xxl"
BUILTIN_PREFIX = "builtin:"


def clean_prompt(text: str) -> str:
    """The official ``clean="whitespace"`` cleaning: fix text, unescape HTML twice, collapse whitespace.

    The official code first runs ``ftfy.fix_text`` (repairs mojibake); it is applied when ftfy is
    installed. Without it ordinary text cleans identically (ftfy only changes broken encodings
    and a few odd unicode forms).
    """
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TokenBatch(dict):
    """``input_ids`` and ``attention_mask``, as keys or attributes (like transformers' BatchEncoding)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ByteTokenizer:
    """A file-free tokenizer: UTF-8 bytes -> ids ``2..257``, pad ``0``, ``</s>`` ``1``.

    Follows the T5 conventions the Wan pipeline relies on: ``</s>`` after the text (kept when
    truncating), padding on the right, mask 1 on text + ``</s>``.
    """

    name = "builtin:bytes"
    pad_token_id = 0
    eos_token_id = 1
    offset = 2
    vocab_size = 258

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids`` (pad and ``</s>`` dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = "pt",
        **unused,
    ) -> TokenBatch:
        """Tokenise one text or a batch.

        :param padding: ``"max_length"`` pads to ``max_length``; ``True``/``"longest"`` to the longest.
        :param truncation: cut to ``max_length`` ids (the last one stays ``</s>``).
        :returns: ``input_ids`` and ``attention_mask``, int64 ``[B, L]`` tensors (lists if
            ``return_tensors`` is None).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise InputError("the tokenizer takes a string or a list of strings")
        if (padding == "max_length" or truncation) and max_length is None:
            raise InputError("max_length is needed for padding='max_length' or truncation")
        rows = []
        for t in texts:
            ids = self.encode(t, add_special_tokens=add_special_tokens)
            if truncation and len(ids) > max_length:
                ids = ids[: max_length - 1] + [self.eos_token_id] if add_special_tokens else ids[:max_length]
            rows.append(ids)
        if padding == "max_length":
            width = max_length
        elif padding is True or padding == "longest":
            width = max(len(r) for r in rows)
        else:
            width = None
        if width is not None:
            masks = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        else:
            masks = [[1] * len(r) for r in rows]
        if return_tensors is None:
            return TokenBatch(input_ids=rows, attention_mask=masks)
        if return_tensors != "pt":
            raise InputError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        if len({len(r) for r in rows}) > 1:
            raise InputError("texts of different lengths need padding=True or padding='max_length'")
        return TokenBatch(
            input_ids=torch.tensor(rows, dtype=torch.long),
            attention_mask=torch.tensor(masks, dtype=torch.long),
        )


BUILTIN_TOKENIZERS = {"bytes": ByteTokenizer}


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _how_to_provide(name: str) -> str:
    return (
        f"Download the tokenizer folder {name} once "
        f"(e.g. `hf download {name} --local-dir umt5-xxl-tokenizer`; the official Wan2.1 release "
        "also ships it as google/umt5-xxl/) and pass its path with --t5_tokenizer PATH, "
        "or put it in the Hugging Face cache. For a demo without downloads use --t5_tokenizer builtin:bytes "
        "(only with a tiny test encoder)."
    )


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_TOKENIZER):
    """The tokenizer for the T5 encoder.

    :param name_or_path: a local tokenizer folder, a Hugging Face hub id (default
        ``google/umt5-xxl``, from the cache when offline), or ``builtin:bytes``.
    :raises WeightsError: when the tokenizer cannot be found, with how to provide it.
    """
    name = os.fspath(name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        kind = name[len(BUILTIN_PREFIX) :]
        if kind not in BUILTIN_TOKENIZERS:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_TOKENIZERS)
            raise InputError(f"unknown built-in tokenizer {name!r}; known: {known}")
        return BUILTIN_TOKENIZERS[kind]()
    path = Path(name).expanduser()
    local = path.exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
        raise WeightsError(f"tokenizer folder not found: {path}. {_how_to_provide(DEFAULT_TOKENIZER)}")
    from transformers import AutoTokenizer

    offline = _offline()
    try:
        return AutoTokenizer.from_pretrained(str(path) if local else name, local_files_only=offline or local)
    except Exception as exc:  # hub, network, missing-file and parse errors all mean "not available here"
        if local:
            where = f"the folder {path}"
        elif offline:
            where = f"{name!r} (offline mode: only the local cache is used)"
        else:
            where = f"{name!r} (not in the cache and not downloadable)"
        reason = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
        guidance = _how_to_provide(DEFAULT_TOKENIZER if local else name)
        raise WeightsError(f"could not load the T5 tokenizer from {where}: {reason}. {guidance}") from exc
