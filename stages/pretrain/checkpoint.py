"""Full training checkpoints in safetensors (never pickle), written atomically, with retention.

    step_000100/
      model.safetensors      weights and router biases
      optimizer.safetensors  AdamW moments and step counts, torch RNG state
      state.json             step, tokens, data position, guard state, param-group hyperparameters, lineage

A checkpoint is written to `.tmp-step_N` and renamed into place, so a crash mid-write leaves the previous
checkpoint intact and no half-written one that a restart could pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / f"step_{step:06d}", folder / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"state.{i}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
               for i, st in opt["state"].items() for name, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": opt["param_groups"]},
                                               indent=2))
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest(folder: Path) -> Path | None:
    found = sorted(Path(folder).glob("step_*")) if Path(folder).is_dir() else []
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from `path`; returns the saved trainer state."""
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    state = json.loads((path / "state.json").read_text())
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state
