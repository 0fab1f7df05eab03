"""Where models come from: the embedded default models by name, or a local Hugging Face model folder.

Nothing is downloaded: a Hugging Face hub id is refused with a message saying to download the folder
first and pass its path.
"""

from __future__ import annotations

from pathlib import Path

from traces.errors import UserError

MODELS_DIR = Path(__file__).resolve().parent / "models"
EMBEDDED_MODELS: dict[str, Path] = {
    "mini-qwen-moe": MODELS_DIR / "mini-qwen-moe",
    "mini-deepseek-moe": MODELS_DIR / "mini-deepseek-moe",
}


def resolve_model(model: str) -> Path:
    """The folder holding `model`'s config.json and weights: an embedded name or a local folder path."""
    if model in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[model]
        if not (folder / "config.json").is_file():
            raise UserError(f"embedded model {model} is missing at {folder}; run `make models` to train it")
        return folder
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"model folder {folder} has no config.json; pass a Hugging Face model folder")
        return folder
    raise UserError(
        f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local folder; "
        "hub ids cannot be downloaded here: download the model folder and pass its path"
    )
