"""Run by test_fsdp_checkpoint.py under torchrun (2 gloo processes): a micro model sharded with FSDP2
(torch fully_shard per block, as accelerate's FSDP2 config does on GPUs) takes a step, is checkpointed,
loaded into a differently initialised sharded copy, and both take one more step."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from flows.config import load_config
from tests.conftest import MICRO
from v3flow.model.transformer import Block, Transformer
from v3flow.training import checkpoint
from v3flow.training.optim import AdamW


def sharded(model: Transformer, mesh) -> Transformer:
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def step(model, opt, tokens) -> None:
    out = model(tokens[:, :-1], tokens[:, 1:], mtp_weight=0.3, balance_alpha=1e-4)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = load_config(MICRO).model
    torch.manual_seed(0)
    reference = Transformer(cfg)
    reference.init_weights()
    model = sharded(copy.deepcopy(reference), mesh)
    opt_kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    ref_opt, opt = AdamW(reference.parameters(), **opt_kw), AdamW(model.parameters(), **opt_kw)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    step(reference, ref_opt, tokens)  # one process, unsharded, the same batch
    step(model, opt, tokens)
    path = checkpoint.save(out, 1, model, opt, {"note": "fsdp"}, keep=1, write=dist.get_rank() == 0)
    dist.barrier()

    torch.manual_seed(99)
    other = Transformer(cfg)
    other.init_weights()
    resumed = sharded(other, mesh)
    resumed_opt = AdamW(resumed.parameters(), **opt_kw)
    state = checkpoint.load(path, resumed, resumed_opt)
    step(model, opt, tokens)
    step(resumed, resumed_opt, tokens)
    a, b = checkpoint.full_model_state(model), checkpoint.full_model_state(resumed)
    if dist.get_rank() == 0:
        from safetensors.torch import load_file

        saved = load_file(str(path / "model.safetensors"))
        ref = reference.state_dict()
        report = {
            "state_note": state.get("note"),
            "keys_match": sorted(saved) == sorted(ref),
            "max_diff_vs_one_process": max(float((saved[k] - ref[k]).abs().max()) for k in ref),
            "resumed_bit_exact": all(torch.equal(a[k], b[k]) for k in a),
        }
        (out / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
