"""Training-step throughput of our DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

    .venv/bin/python benchmarks/model_speed.py --config configs/tiny.yaml [--batch 8 --seq 256 --steps 10]

Both models get the identical architecture (our config exported with `hf_config`, MTP off on our side
since transformers has no MTP training module), the same random batch, fp32, AdamW, and a full step
(forward, loss, backward, optimizer). Steps alternate between the two models so machine noise hits both
alike; the median step time gives tokens/s. transformers is measured with its default experts
implementation and with each other one it offers, and the ratio is taken against its fastest.
Results go to MLflow (experiment `v3flow-benchmarks`) and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from record import record

from flows.config import load_config
from v3flow.model.hf_format import hf_config
from v3flow.model.transformer import Transformer


def ours_step(model, opt, batch):
    out = model(batch[:, :-1], batch[:, 1:])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def hf_step(model, opt, batch):
    out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])  # transformers shifts labels itself
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def build_hf(cfg, experts_impl: str | None):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    conf = DeepseekV3Config(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")})
    model = DeepseekV3ForCausalLM(conf)
    if experts_impl:
        model.config._experts_implementation = experts_impl
    return model.train()


def time_steps(runners: dict, steps: int) -> dict[str, float]:
    times = {name: [] for name in runners}
    for _ in range(steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cfg = load_config(args.config).model.model_copy(update={"mtp_depth": 0})
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    impls = [None] + [k for k in ALL_EXPERTS_FUNCTIONS.valid_keys() if k not in ("eager",)]
    runners, ours = {}, Transformer(cfg)
    ours.init_weights()
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    runners["v3flow"] = lambda: ours_step(ours, opt, batch)
    for impl in impls:
        try:
            hf = build_hf(cfg, impl)
            hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
            hf_step(hf, hf_opt, batch)  # fails fast when an implementation does not run here
        except Exception as err:  # noqa: BLE001 - an optional kernel missing on this machine
            print(f"transformers experts={impl}: not available here ({type(err).__name__}: {err})"[:200])
            continue
        runners[f"transformers[{impl or 'default'}]"] = (lambda m=hf, o=hf_opt: hf_step(m, o, batch))
    time_steps(runners, 2)  # warm-up
    medians = time_steps(runners, args.steps)
    tokens = args.batch * args.seq
    tps = {name: tokens / s for name, s in medians.items()}
    best_hf = max((v, k) for k, v in tps.items() if k != "v3flow")
    default_hf = tps["transformers[default]"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    for name, v in tps.items():
        print(f"{name:34s} {v:10.0f} tokens/s   ({medians[name] * 1000:.0f} ms/step)")
    print(f"speed-up vs transformers default: {tps['v3flow'] / default_hf:.2f}x; "
          f"vs its fastest ({best_hf[1]}): {tps['v3flow'] / best_hf[0]:.2f}x  [{machine}, batch {args.batch}x{args.seq}]")

    summary = {"v3flow_tokens_s": tps["v3flow"], "transformers_default_tokens_s": default_hf,
               "transformers_best_tokens_s": best_hf[0], "ratio_vs_default": tps["v3flow"] / default_hf,
               "ratio_vs_best": tps["v3flow"] / best_hf[0]}
    record("model_speed", {**summary, **{f"tokens_s.{k}": v for k, v in tps.items()}},
           {"benchmark": "model_speed", "machine": machine},
           {"config": args.config, "batch": str(args.batch), "seq": str(args.seq), "best_transformers": best_hf[1]})

if __name__ == "__main__":
    main()
