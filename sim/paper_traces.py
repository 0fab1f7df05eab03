"""Traces for reproducing the papers: the embedded models on prompts of an exact token count, cached.

`paper_trace("qwen1.5-moe-a2.7b", 512)` records the embedded model with that routing structure
(`PAPER_MODELS`) on `num_prompts` prompts of exactly 512 tokens each (consecutive, non-overlapping windows
of the default prompt set's text, joined by newlines) plus `decode_tokens` greedy decode tokens, with
look-ahead logits (depth 2), and returns the trace's path. Traces are cached under `$FATESIM_CACHE`
(default `~/.cache/fatesim`) in `reproduce/`, keyed by the SHA-256 of everything that shapes them: the
model's files, the prompt file, the counts, and the torch and transformers versions. A second call with
the same inputs reads the cached file (recording takes seconds to a minute on 2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from traces.atomic import atomic_output
from traces.errors import UserError
from traces.format import read_trace
from traces.modelzoo import resolve_model
from traces.promptset import DEFAULT_PROMPTS, load_prompts

PAPER_MODELS = {"qwen1.5-moe-a2.7b": "mini-qwen-moe", "deepseek-moe-16b": "mini-deepseek-moe"}
"""The paper's model -> the embedded model with its routing structure (layers, experts, top-k)."""

LOOKAHEAD = 2
"""Depth of the recorded look-ahead logits (Fate's cross-layer gate needs 1)."""

KEY_VERSION = "fatesim-reproduce-trace-v1"
"""Bumped when the way traces are built changes, so old cache entries are not reused."""


def cache_dir() -> Path:
    """Where reproduction traces are cached: `$FATESIM_CACHE/reproduce` (default ~/.cache/fatesim)."""
    root = os.environ.get("FATESIM_CACHE") or str(Path.home() / ".cache" / "fatesim")
    return Path(root) / "reproduce"


def exact_prompts(tokenizer, prompt_tokens: int, count: int, text: str) -> list[str]:
    """`count` prompts of exactly `prompt_tokens` tokens: consecutive windows of `text`'s tokens, decoded.

    Each window must tokenize back to exactly `prompt_tokens` ids (checked); UserError when the text is
    too short or a window does not round-trip.
    """
    ids = tokenizer(text)["input_ids"]
    if len(ids) < prompt_tokens * count:
        raise UserError(f"the prompt text has {len(ids)} tokens, fewer than {count} prompts of {prompt_tokens}; "
                        "use fewer or shorter prompts")
    prompts = []
    for n in range(count):
        window = ids[n * prompt_tokens:(n + 1) * prompt_tokens]
        prompt = tokenizer.decode(window)
        got = len(tokenizer(prompt)["input_ids"])
        if got != prompt_tokens:
            raise UserError(f"prompt window {n} of {prompt_tokens} tokens re-tokenizes to {got}; cannot build "
                            "exact-length prompts from this text")
        prompts.append(prompt)
    return prompts


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trace_key(model: str, prompt_tokens: int, num_prompts: int, decode_tokens: int) -> str:
    """SHA-256 (hex) of everything a reproduction trace depends on."""
    import torch
    import transformers

    folder = resolve_model(model)
    parts = {
        "version": KEY_VERSION, "model": model, "prompt_tokens": prompt_tokens, "num_prompts": num_prompts,
        "decode_tokens": decode_tokens, "lookahead": LOOKAHEAD, "torch": torch.__version__,
        "transformers": transformers.__version__, "prompts": _file_digest(DEFAULT_PROMPTS),
        "files": {p.name: _file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_one_thread() -> Iterator[None]:
    """Record with one torch thread (as `make trace` does: faster than oversubscribed threads here) and
    without transformers' progress bars and warnings (the caller reports progress)."""
    import torch
    from transformers.utils import logging as hf_logging

    saved, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices, per forward
            yield
    finally:
        torch.set_num_threads(saved)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def paper_trace(paper_model: str, prompt_tokens: int, *, num_prompts: int = 4, decode_tokens: int = 32,
                progress=None) -> Path:
    """The cached trace of `paper_model`'s embedded stand-in on exact-length prompts (recorded if missing).

    `progress(message)` is told when a trace is recorded rather than read from the cache.
    """
    from traces.recorder import record_trace

    if paper_model not in PAPER_MODELS:
        raise UserError(f"no embedded model stands in for {paper_model!r}; known: {', '.join(PAPER_MODELS)}")
    if prompt_tokens < 1 or num_prompts < 1 or decode_tokens < 0:
        raise UserError("prompt_tokens and num_prompts must be >= 1 and decode_tokens >= 0")
    model = PAPER_MODELS[paper_model]
    key = trace_key(model, prompt_tokens, num_prompts, decode_tokens)
    folder = cache_dir()
    out = folder / f"{model}-p{prompt_tokens}x{num_prompts}-d{decode_tokens}-{key[:16]}.safetensors"
    if out.exists():
        return out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the trace cache {folder}: {error.strerror}; set FATESIM_CACHE") from None
    if progress:
        progress(f"recording {model}: {num_prompts} prompts of {prompt_tokens} tokens + {decode_tokens} decoded "
                 f"-> {out}")
    from transformers import AutoTokenizer

    with _quiet_one_thread():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        prompts = exact_prompts(tokenizer, prompt_tokens, num_prompts, "\n".join(load_prompts(DEFAULT_PROMPTS)))
    prompt_file = folder / f"prompts-{model}-p{prompt_tokens}x{num_prompts}-{key[:16]}.jsonl"
    with atomic_output(prompt_file) as tmp:
        tmp.write_text("".join(json.dumps({"id": f"window-{n}", "text": p}) + "\n" for n, p in enumerate(prompts)))
    with _quiet_one_thread():
        trace = record_trace(model, prompt_file, out, max_new_tokens=decode_tokens, lookahead=LOOKAHEAD,
                             progress=False)
    lengths = {int((trace.seq_ids[trace.is_prefill.astype(bool)] == s).sum()) for s in range(num_prompts)}
    if lengths != {prompt_tokens}:
        out.unlink(missing_ok=True)
        raise UserError(f"recorded prompts of {sorted(lengths)} tokens, not {prompt_tokens}")
    return out


def load_paper_trace(paper_model: str, prompt_tokens: int, **kwargs):
    """`paper_trace`, read (a `traces.format.Trace`)."""
    return read_trace(paper_trace(paper_model, prompt_tokens, **kwargs))
