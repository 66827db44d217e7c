"""The model artifact: what every stage that produces a model writes, and how any stage loads one.

    <out_dir>/model.json         the manifest: stage, key, lineage (the key of every stage up the chain),
                                 data manifest and tokenizer hashes, context length, RoPE / YaRN settings,
                                 the architecture, and where the files below are (relative paths)
    <out_dir>/checkpoints/...    our full safetensors checkpoint (weights, router biases, optimizer: exact resume)
    <out_dir>/hf/                the Hugging Face DeepSeek-V3 folder (config.json with the rope parameters,
                                 safetensors, tokenizer, generation_config.json)

`load_model(path)` takes any of: a model artifact folder (model.json), one of our checkpoint folders
(step_N/ with model.safetensors beside a run.json two levels up), or a Hugging Face `deepseek_v3` folder
(config.json), so a training stage can start from a model another stage, another run or DeepSeek made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from v3flow.model.args import ModelConfig
from v3flow.model.transformer import Transformer

MODEL_FILE = "model.json"


def write_manifest(out_dir: Path, stage: str, model: ModelConfig, lineage: dict[str, str], data: dict,
                   checkpoint: Path, hf: Path | None, extra: dict | None = None) -> dict:
    """Write `out_dir/model.json`. `data` carries the training data's hashes (manifest_sha256,
    tokenizer_sha256, seq_len); `extra` what the stage wants to add (e.g. what happened to MTP)."""
    out_dir = Path(out_dir)
    rope = {"rope_theta": model.rope_theta, "qk_rope_head_dim": model.qk_rope_head_dim,
            "yarn": model.yarn.model_dump(mode="json") if model.yarn else None}
    body = {
        "stage": stage, "key": out_dir.name, "lineage": lineage, "data": data,
        "context_length": model.max_seq_len, "rope": rope, "model": model.model_dump(mode="json"),
        "checkpoint": Path(checkpoint).relative_to(out_dir).as_posix(),
        "hf": Path(hf).relative_to(out_dir).as_posix() if hf else None, **(extra or {}),
    }
    tmp = out_dir / f"{MODEL_FILE}.tmp"
    tmp.write_text(json.dumps(body, indent=2))
    tmp.replace(out_dir / MODEL_FILE)
    return body


def read_manifest(path: Path) -> dict | None:
    file = Path(path) / MODEL_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def document_masked(path: Path) -> bool:
    """Whether the model at `path` was trained attending within each packed document (pretrain.document_mask):
    what is trained or scored after it on packed text should attend the same way."""
    return bool((read_manifest(path) or {}).get("document_mask", False))


def pretraining_peak_lr(path: Path) -> float | None:
    """The peak learning rate of the pretraining that made the model at `path` (what post-training's relative
    learning rates are multiples of), where its model.json records it."""
    return (read_manifest(path) or {}).get("pretraining_peak_lr")


def model_config(path: Path) -> ModelConfig:
    """The architecture of the model at `path` (any form `load_model` takes), without loading weights."""
    path = Path(path)
    if (manifest := read_manifest(path)) is not None:
        return ModelConfig(**manifest["model"])
    if (path / "config.json").is_file():
        from v3flow.model.hf_format import config_from_hf

        return config_from_hf(json.loads((path / "config.json").read_text()))
    run = _checkpoint_run(path)
    if run is not None:
        return ModelConfig(**json.loads(run.read_text())["model"])
    raise FileNotFoundError(f"{path}: not a model (no {MODEL_FILE}, config.json or checkpoint)")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Our state dict (weights and router biases) of the model at `path`."""
    path = Path(path)
    if (manifest := read_manifest(path)) is not None:
        path = path / manifest["checkpoint"]
    if (path / "model.safetensors").is_file() and _checkpoint_run(path) is not None:
        return load_file(str(path / "model.safetensors"))
    if (path / "config.json").is_file():
        from v3flow.model.hf_format import import_hf

        return import_hf(path).state_dict()
    raise FileNotFoundError(f"{path}: not a model (no {MODEL_FILE}, config.json or checkpoint)")


def load_model(path: Path, cfg: ModelConfig | None = None) -> Transformer:
    """The model at `path`, built with `cfg` when given (e.g. the same weights with YaRN switched on)."""
    model = Transformer(cfg or model_config(path))
    model.load_state_dict(load_state(path))
    return model


def check_compatible(path: Path, cfg: ModelConfig, key: str) -> None:
    """Refuse to start from a model whose architecture differs from `cfg` in anything but the context length,
    the RoPE scaling and the init (what a later stage may change)."""
    have = model_config(path).model_dump(exclude={"max_seq_len", "yarn", "init_std"})
    want = cfg.model_dump(exclude={"max_seq_len", "yarn", "init_std"})
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        raise ValueError(f"{key}={path}: its architecture differs from the config's model section: "
                         + ", ".join(f"model.{k}: {a} there, {b} here" for k, (a, b) in diff.items()))


def _checkpoint_run(path: Path) -> Path | None:
    """run.json of the training run that wrote checkpoint folder `path` (<run>/checkpoints/step_N)."""
    run = Path(path).parent.parent / "run.json"
    return run if (Path(path) / "model.safetensors").is_file() and run.is_file() else None
