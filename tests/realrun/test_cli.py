"""`fatesim realrun` end to end on a saved tiny model: JSON out, files written, one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.cli import main
from tests.realrun.conftest import NEW_TOKENS, PROMPTS, tiny_qwen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen")
    tiny_qwen().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def store_dir(tmp_path: Path, monkeypatch) -> Path:
    """Disk stores go to a temporary folder, not the user's cache."""
    folder = tmp_path / "stores"
    monkeypatch.setattr("realrun.session.STORE_DIR", folder)
    return folder


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"token_ids": p}) + "\n" for p in PROMPTS.token_ids))
    return path


def test_cli_json_timeline_and_trace(model_dir: Path, prompts_file: Path, tmp_path: Path, capsys) -> None:
    """--json prints replay's keys plus `generated`; --timeline and --trace-out files appear."""
    timeline, trace = tmp_path / "tl.json", tmp_path / "run.safetensors"
    main(["realrun", "--model", str(model_dir), "--prompts", str(prompts_file), "--policy", "fate",
          "--memory-budget", "50%", "--store", "disk", "--max-new-tokens", str(NEW_TOKENS), "--json",
          "--timeline", str(timeline), "--trace-out", str(trace)])
    result = json.loads(capsys.readouterr().out)
    assert result["policy"] == "fate" and len(result["generated"]) == len(PROMPTS.token_ids)
    assert all(len(g) == NEW_TOKENS for g in result["generated"])
    assert result["profile"] == "realrun-measured"
    assert timeline.exists() and trace.exists()


def test_cli_set_overrides_the_preset(model_dir: Path, prompts_file: Path, capsys) -> None:
    """--set works as in replay: fate with bf16 transfers is lossless and reports the overridden component."""
    main(["realrun", "--model", str(model_dir), "--prompts", str(prompts_file), "--policy", "fate",
          "--memory-budget", "50%", "--store", "ram", "--max-new-tokens", "2", "--set", "precision=bf16", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["policy_components"]["precision"] == "bf16"


def test_cli_summary(model_dir: Path, prompts_file: Path, capsys) -> None:
    """Without --json a short summary is printed."""
    main(["realrun", "--model", str(model_dir), "--prompts", str(prompts_file), "--policy", "lru",
          "--memory-budget", "60%", "--store", "ram", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "decode" in out and "hit rate" in out


@pytest.mark.parametrize("args, message", [
    (["--policy", "nope", "--memory-budget", "50%"], "unknown policy"),
    (["--policy", "lru", "--memory-budget", "2%"], "raise --memory-budget"),
    (["--policy", "lru", "--memory-budget", "lots"], "cannot read size"),
    (["--policy", "lru", "--memory-budget", "50%", "--set", "eviction=fifo"], "eviction=fifo"),
])
def test_cli_user_errors_are_one_line(model_dir: Path, prompts_file: Path, capsys, args, message) -> None:
    """Bad policy or budget: exit code 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as done:
        main(["realrun", "--model", str(model_dir), "--prompts", str(prompts_file), *args])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fatesim: error:") and message in err and "\n" not in err


def test_bf16_runs_write_no_second_copy(model_dir: Path, prompts_file: Path, store_dir: Path, capsys) -> None:
    """bf16 experts are read from the checkpoint itself: no store file appears."""
    main(["realrun", "--model", str(model_dir), "--prompts", str(prompts_file), "--policy", "lru",
          "--memory-budget", "50%", "--max-new-tokens", "2", "--json"])
    assert not list(store_dir.glob("experts-*.bin"))


def test_disk_store_is_built_once_and_reused(model_dir: Path, prompts_file: Path, store_dir: Path, capsys) -> None:
    """A second run on the same checkpoint and precisions reads the existing quantised store instead of
    rewriting it."""
    args = ["realrun", "--model", str(model_dir), "--prompts", str(prompts_file), "--policy", "lru",
            "--set", "precision=int4", "--memory-budget", "50%", "--max-new-tokens", "2", "--json"]
    main(args)
    (store,) = store_dir.glob("experts-*.bin")
    written = store.stat().st_mtime_ns
    main(args)
    assert list(store_dir.glob("experts-*.bin")) == [store] and store.stat().st_mtime_ns == written
    out, decoder = capsys.readouterr().out, json.JSONDecoder()
    first, end = decoder.raw_decode(out)
    second, _ = decoder.raw_decode(out[end:].lstrip())
    assert first["generated"] == second["generated"]
