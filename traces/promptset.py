"""Prompt sets: the text prompts a recording runs, from a JSON-lines or plain-text file.

Two file forms are accepted:
- JSON lines (`.jsonl`, or any file whose first non-blank line starts with `{`): one object per line with a
  string field `"text"` (other fields such as `"id"` and `"kind"` are kept for people, ignored here), or,
  for models without a tokenizer, every line with a `"token_ids"` list of integers (`prompt_token_ids`);
- plain text: every non-blank line is one prompt.

`traces/prompts/default.jsonl` is the default set (written for fatesim, varied kinds: questions,
instructions, code, story openings, lists, facts, dialogue...).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from traces.errors import UserError

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "default.jsonl"


def _read(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; pass a .jsonl or .txt file with one prompt per line")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_prompts(path: Path) -> list[str]:
    """The prompts of `path`, in file order; UserError if the file is missing, malformed or has none."""
    path = Path(path)
    text = _read(path)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path} holds no prompts; put one prompt per line (or JSON lines with \"text\")")
    is_jsonl = path.suffix == ".jsonl" or lines[0][1].lstrip().startswith("{")
    if not is_jsonl:
        return [line for _, line in lines]
    prompts: list[str] = []
    for n, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"prompt file {path} line {n} is not valid JSON ({err.msg}); "
                            "write one JSON object per line") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise UserError(f"prompt file {path} line {n} lacks a string field \"text\"")
        if not item["text"].strip():
            raise UserError(f"prompt file {path} line {n} has an empty \"text\"")
        prompts.append(item["text"])
    return prompts


def prompt_token_ids(path: Path, tokenizer: Any) -> list[list[int]]:
    """The prompts of `path` as token ids: JSON lines that all carry `"token_ids"` are taken as given (a model
    folder without a tokenizer), anything else is text tokenized by `tokenizer` (None: UserError)."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(_read(path).splitlines(), start=1) if line.strip()]
    items = []
    for _, line in lines:
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError:
            items = []
            break
    if items and all(isinstance(item, dict) and "token_ids" in item for item in items):
        ids = []
        for (n, _), item in zip(lines, items, strict=True):
            tokens = item["token_ids"]
            if (not isinstance(tokens, list) or not tokens
                    or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
                raise UserError(f"prompt file {path} line {n}: \"token_ids\" must be a non-empty list of "
                                "non-negative integers")
            ids.append(list(tokens))
        return ids
    texts = load_prompts(path)
    if tokenizer is None:
        raise UserError(f"{path} holds text prompts but the model has no tokenizer; give JSON lines "
                        "{\"token_ids\": [...]} instead")
    ids = [list(tokenizer(text)["input_ids"]) for text in texts]
    for n, prompt in enumerate(ids):
        if not prompt:
            raise UserError(f"prompt {n} of {path} tokenizes to nothing; remove it from the prompt file")
    return ids


def prompts_identity(path: Path) -> dict[str, str]:
    """{"name": file name without suffix, "sha256": hex digest of the file's bytes} for trace headers."""
    path = Path(path)
    _read(path)
    return {"name": path.stem, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
