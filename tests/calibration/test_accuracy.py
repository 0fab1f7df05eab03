"""`fatesim accuracy` on a tiny random Qwen2-MoE: the lossless path is exact, lossy paths are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibration.accuracy import measure_accuracy
from sim.cli import main
from traces.errors import UserError


@pytest.fixture(scope="module")
def result(tiny_model: tuple[Path, Path]) -> dict:
    folder, text = tiny_model
    return measure_accuracy(model=str(folder), text_path=text, max_tokens=200, generate_tokens=8,
                            num_prompts=2, prompt_tokens=16, window=64, budget="50%")


def test_lossless_matches_reference_exactly(result: dict) -> None:
    """The lossless path through realrun's record round trip agrees 100% with equal perplexity."""
    row = next(r for r in result["rows"] if r["variant"] == "lossless")
    assert row["greedy_agreement"] == 1.0
    assert row["perplexity"] == result["reference_perplexity"]


def test_lossy_variants_change_the_model(result: dict) -> None:
    """INT2 costs more perplexity than INT4, and both differ from the reference."""
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"lossless", "int4", "int2", "fate-hybrid", "speculate"}
    assert rows["int4"]["perplexity"] != result["reference_perplexity"]
    assert abs(rows["int2"]["perplexity_ratio"] - 1) > abs(rows["int4"]["perplexity_ratio"] - 1)
    assert rows["fate-hybrid"]["int2_rate"] == 0.3
    assert 0.0 <= rows["speculate"]["substituted_fraction"] <= 1.0
    for r in rows.values():
        assert r["perplexity"] > 1.0 and 0.0 <= r["greedy_agreement"] <= 1.0


def test_cli_json(tiny_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`fatesim accuracy --json` prints the result with one row per variant."""
    folder, text = tiny_model
    main(["accuracy", "--model", str(folder), "--text", str(text), "--json", "--max-tokens", "80",
          "--generate-tokens", "2", "--variants", "lossless,speculate"])
    out = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in out["rows"]] == ["lossless", "speculate"]
    assert out["rows"][0]["greedy_agreement"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-model", "--text", "TEXT"], "neither an embedded model"),
    (["--model", "MODEL", "--text", "/nonexistent.txt"], "no text file"),
    (["--model", "MODEL", "--text", "TEXT", "--generate-tokens", "0"], "generate-tokens"),
    (["--model", "MODEL", "--text", "TEXT", "--variants", "int3"], "unknown accuracy variant"),
])
def test_bad_input_exit_code_2(tiny_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                               args: list[str], message: str) -> None:
    """Unknown models, missing text and bad counts are one line and exit code 2."""
    folder, text = tiny_model
    args = [str(folder) if a == "MODEL" else str(text) if a == "TEXT" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["accuracy", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_too_short_text_is_refused(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(UserError, match="tokens"):
        measure_accuracy(model=str(tiny_model[0]), text_path=short)


def test_speculate_runs_on_realruns_engine_and_gives_the_model_back(tiny_model: tuple[Path, Path]) -> None:
    """The speculate variant is served by realrun's engine with real copies: at a 30% budget it substitutes
    (greedy agreement drops below 100%); afterwards the model's own experts are back, so a lossless run
    that follows still equals the reference exactly."""
    folder, text = tiny_model
    result = measure_accuracy(model=str(folder), text_path=text, max_tokens=200, generate_tokens=8,
                              num_prompts=2, prompt_tokens=16, window=64, budget="30%",
                              variants=("speculate", "lossless"))
    speculate, lossless = result["rows"]
    assert speculate["transfers"] == "realrun engine, RAM tier"
    assert speculate["substitutions"] > 0 and 0 < speculate["substituted_fraction"] < 1
    assert speculate["greedy_agreement"] < 1.0
    assert lossless["perplexity"] == result["reference_perplexity"] and lossless["greedy_agreement"] == 1.0
