"""`fatesim accuracy` on a tiny random Qwen2-MoE: the lossless path is exact, lossy paths are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calibration.accuracy import measure_accuracy
from sim.cli import main
from traces.errors import UserError

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 8
        + "Expert offloading moves weights between memory tiers while the model keeps generating text. " * 8)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-layer Qwen2-MoE with 8 experts top-2 and a byte-level BPE tokenizer, saved as bf16."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=64, shared_expert_intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=512, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # random init is tiny; larger weights make routing and outputs input-dependent
        for p in model.parameters():
            p.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    text = folder / "heldout.txt"
    text.write_text(TEXT)
    return folder, text


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
    (["--model", "no-such-model", "--text", "TEXT"], "no model folder"),
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
