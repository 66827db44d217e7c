"""Full training checkpoints in safetensors (never pickle), written atomically, with retention.

    step_000100/
      model.safetensors      weights and router biases, by parameter name
      optimizer.safetensors  AdamW moments and step counts (`state.<param name>.<field>`), torch RNG state
      state.json             step, tokens, data position, guard state, param groups, lineage

Whatever the parallelism (one process, DDP, FSDP2 shards), every process takes part in gathering the
full state (torch.distributed.checkpoint.state_dict) and rank 0 writes it, so a checkpoint can resume
under another process count or sharding and export directly. Every process reads it back (a shared file
system, as on a single machine or a cluster's shared storage). A checkpoint is written to `.tmp-step_N`
and renamed into place, so a crash mid-write leaves the previous checkpoint intact and no half-written
one that a restart could pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered onto rank 0's CPU
_LOAD = StateDictOptions(full_state_dict=True)  # every process takes its shard of the full tensors


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (collective: every process calls it; under FSDP2 only rank 0 gets them)."""
    return get_model_state_dict(model, options=_FULL)


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int, write: bool = True) -> Path:
    """Collective: every process gathers; the one with `write` (rank 0) writes."""
    weights, opt = full_model_state(model), get_optimizer_state_dict(model, optimizer, options=_FULL)
    final, tmp = folder / f"step_{step:06d}", folder / f".tmp-step_{step:06d}"
    if not write:
        return final
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    tensors = {f"state.{name}.{field}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
               for name, st in opt["state"].items() for field, v in st.items()}
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
    """Restore weights, optimizer and RNG from `path` (collective); returns the saved trainer state."""
    set_model_state_dict(model, load_file(str(path / "model.safetensors")), options=_LOAD)
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    state = json.loads((path / "state.json").read_text())
    per_param: dict[str, dict] = {}
    for key, value in tensors.items():
        name, field = key.removeprefix("state.").rsplit(".", 1)
        per_param.setdefault(name, {})[field] = value
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": state.pop("param_groups")},
                             options=_LOAD)
    return state
