"""The tokenizer a GGUF file describes, converted once by transformers and then kept on disk.

transformers builds a fast tokenizer from the file's `tokenizer.ggml.*` metadata (byte-level BPE
with the pre-tokenizer `tokenizer.ggml.pre` names, e.g. Qwen2's; SentencePiece-style for Gemma;
a BOS token prepended when `tokenizer.ggml.add_bos_token` says so). Converting means parsing the
file's metadata again, which for a 262k-entry vocabulary takes tens of seconds; the result is a
plain tokenizer.json, so it is saved under ~/.cache/scalellm/tokenizers, keyed by the file's path,
size and modification time, and later loads read that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from scalellm.engine.loader.model_config import ModelLoadError

CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "scalellm", "tokenizers")


def load_gguf_tokenizer(path: str, chat_template: str | None):
    """A transformers fast tokenizer for the GGUF at `path`, carrying `chat_template` (the file's)."""
    cache_dir = _cache_dir(path)
    tokenizer = _load_cached(cache_dir)
    if tokenizer is None:
        tokenizer = _convert(path)
        if chat_template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = chat_template
        _save(tokenizer, cache_dir)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer


def _convert(path: str):
    from transformers import AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot convert
        raise ModelLoadError(f"cannot build a tokenizer from {path}: {exc}") from None


def _cache_dir(path: str) -> str:
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return os.path.join(CACHE_ROOT, hashlib.sha256(key).hexdigest()[:24])


def _load_cached(cache_dir: str):
    if not os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cache_dir, trust_remote_code=False)
    except Exception:  # a damaged cache entry: convert again
        return None


def _save(tokenizer, cache_dir: str) -> None:
    """Write to a temporary directory, then rename: a reader never sees half a tokenizer."""
    staging = None
    try:
        os.makedirs(CACHE_ROOT, exist_ok=True)
        staging = tempfile.mkdtemp(dir=CACHE_ROOT)
        tokenizer.save_pretrained(staging)
        os.replace(staging, cache_dir)
    except OSError:  # read-only home, or another process won the rename: the cache is only a speed-up
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
