"""What the FP8 recipe costs on this machine: a training step with FP8 GEMMs against the same step in FP32.

    .venv/bin/python benchmarks/fp8_overhead.py --config configs/tiny.yaml [--steps 20] [--repeats 2]

On a CPU the FP8 GEMMs are emulated (exact E4M3 values, FP32 products), so this is the price of the demo's
default precision; the target is at most 1.5x an FP32 step. Runs alternate between the two precisions so
that machine noise hits both alike; each is the median tokens/s of its 5-step windows (pretrain_speed.py),
and the ratio is FP32 tokens/s over FP8 tokens/s, from the best run of each. Logged to MLflow (experiment
`v3flow-benchmarks`) and benchmarks/results/ unless --no-record.
"""

from __future__ import annotations

import argparse

from pretrain_speed import data_outputs, machine_name, measure

from flows.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--no-record", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    args.manifest = args.tokenizer = None
    cfgs = {p: load_config(args.config, [*args.set, f"pretrain.precision={p}"]) for p in ("fp32", "fp8")}
    data = data_outputs(cfgs["fp32"], args)
    best: dict[str, dict] = {}
    for i in range(args.repeats):
        for name, cfg in cfgs.items():
            r = measure(cfg, data, args.steps)
            print(f"repeat {i + 1} {name:4s}: {r['tokens_per_s']:,.0f} tokens/s ({r['autocast']} outside FP8 GEMMs)",
                  flush=True)
            if r["tokens_per_s"] > best.get(name, {}).get("tokens_per_s", 0):
                best[name] = r
    ratio = best["fp32"]["tokens_per_s"] / best["fp8"]["tokens_per_s"]
    machine = machine_name()
    print(f"\nFP8 step / FP32 step = {ratio:.2f}x ({best['fp8']['tokens_per_s']:,.0f} vs "
          f"{best['fp32']['tokens_per_s']:,.0f} tokens/s; FP8 with {best['fp8']['autocast']} elsewhere; {machine})")
    summary = {"fp8_step_over_fp32": ratio, "fp8_tokens_per_s": best["fp8"]["tokens_per_s"],
               "fp32_tokens_per_s": best["fp32"]["tokens_per_s"]}
    if not args.no_record:
        from record import record

        record(f"fp8_overhead_{cfgs['fp8'].name}", summary,
               {"benchmark": "fp8_overhead", "machine": machine, "autocast": best["fp8"]["autocast"]},
               {"config": args.config, "steps": str(args.steps), "repeats": str(args.repeats)})


if __name__ == "__main__":
    main()
