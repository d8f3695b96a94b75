"""Device-machine stand-in for the PyPI package: the same all-MiniLM-L6-v2, carried as an fp16 copy."""

from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parents[2] / "minilm-fp16"  # .gpu/minilm-fp16
