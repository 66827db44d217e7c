"""GRPO stage (report §5.2): the model of role `model` (the SFT model) trained with TRL's GRPOTrainer on the
task's training prompts (R1 form), rewarded by the task's rule-based rewards; the standard model artifact out.

    out_dir/prompts.parquet   the prompts (R1 form, with the gold answer the accuracy reward checks)
    out_dir/run.json, trainer/, trained/, metrics.jsonl, tokenizer/, checkpoints/final/, hf/, model.json
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.grpo import trainer
from stages.grpo.config import GrpoConfig, GrpoStageConfig, completions_cover_what_sft_teaches
from v3flow.errors import ConfigError
from v3flow.section import section_hash
from v3flow.stage import StageResult, StageSpec
from v3flow.tasks import TaskConfig, build
from v3flow.tasks.arithmetic import ArithmeticSettings
from v3flow.training import posttrain

STAGE = "grpo"
CURVES = {"reward": "reward", "reward_std": "reward_std", "accuracy": "rewards/accuracy_reward/mean",
          "format": "rewards/format_reward/mean", "overlong": "rewards/overlong_reward/mean",
          "completion_length": "completions/mean_length",
          "clipped_ratio": trainer.CLIPPED, "zero_std_groups": trainer.ZERO_STD, "kl": "kl"}
SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: GrpoStageConfig(task=cfg.posttrain.task, grpo=cfg.posttrain.grpo),
    settings={"posttrain.task": (TaskConfig, ArithmeticSettings), "posttrain.grpo": GrpoConfig},
    inputs={"model": "sft", "general": "pack"},
    libraries=(*posttrain.LIBRARIES, "math_verify"),
    headline=tuple(f"{m}_{end}" for m in ("reward", "accuracy", "format", "completion_length", "kl", "zero_std_groups")
                   for end in ("first", "last")),
    model=True, phase="posttrain", curves=("reward", CURVES["accuracy"], "kl"),
    checks=(completions_cover_what_sft_teaches,))


def select(g: GrpoConfig, task, problems: list, model_dir: Path, out_dir: Path) -> tuple[list, dict]:
    """Sample every one of the first `select_prompts` problems G times with the input model (our decoder, the
    rollouts' temperature and top-p) and keep those it sometimes but not always solves. Also measures how long
    its right answers are: an overlong penalty that starts before them would punish being right."""
    from transformers import AutoTokenizer

    from v3flow.evaluation.tasks import score
    from v3flow.training import artifact

    candidates = problems[: g.select_prompts]
    tokenizer = AutoTokenizer.from_pretrained(model_dir / artifact.read_manifest(model_dir)["hf"])
    scored = score(artifact.load_model(model_dir), tokenizer, task, candidates, g.num_generations, g.temperature,
                   g.top_p, g.max_completion_length, g.seed)
    kept = [p for p, r in zip(candidates, scored, strict=True) if 0 < r["samples_correct"] < g.num_generations]
    (out_dir / "selection.json").write_text(json.dumps(scored, indent=2))
    solved = sorted(r["tokens"] for r in scored if r["correct"])
    stats = {"selection.candidates": len(candidates), "selection.kept": len(kept),
             "selection.all_right": sum(r["samples_correct"] == g.num_generations for r in scored) / len(scored),
             "selection.all_wrong": sum(r["samples_correct"] == 0 for r in scored) / len(scored),
             "selection.pass_rate": sum(r["samples_correct"] for r in scored) / (len(scored) * g.num_generations),
             "selection.right_answer_tokens_p95": solved[int(0.95 * (len(solved) - 1))] if solved else 0}
    print(f"[{STAGE}] prompt selection: {len(kept)} of {len(candidates)} problems sometimes solved "
          f"({stats['selection.all_right']:.0%} always, {stats['selection.all_wrong']:.0%} never; pass rate "
          f"{stats['selection.pass_rate']:.1%})", flush=True)
    start = g.max_completion_length - g.overlong_buffer
    if "overlong" in g.rewards and stats["selection.right_answer_tokens_p95"] > start:
        raise ConfigError(f"posttrain.grpo: the overlong penalty starts at {start} tokens (max_completion_length - "
                          f"overlong_buffer) but 5% of the input model's right answers are longer "
                          f"({stats['selection.right_answer_tokens_p95']} tokens): it would punish right answers; "
                          "raise max_completion_length or lower overlong_buffer")
    if not kept:
        raise ConfigError(f"posttrain.grpo.select_prompts: none of {len(candidates)} problems has a pass rate "
                          f"strictly between 0 and 1 at temperature {g.temperature:g} (always right: "
                          f"{stats['selection.all_right']:.0%}, never: {stats['selection.all_wrong']:.0%}): GRPO "
                          "would have no signal; change the task's difficulty or the model")
    return kept, stats


def run(cfg: GrpoStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    import datasets

    g, task = cfg.grpo, build(cfg.task, resolve)
    source = inputs["model"].outputs["model"]
    lr, lr_from = posttrain.peak_lr(STAGE, g, Path(source))
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = g.steps * g.prompts_per_step
    problems, stats = task.problems("train"), {}
    if g.select_prompts:
        problems, stats = select(g, task, problems, Path(source), out_dir)
    rows = [{"prompt": task.prompt(p, "r1"), "answer": p.answer, "problem_id": p.id}
            for p in (problems * (needed // len(problems) + 1))[:needed]]
    prompts = out_dir / "prompts.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(prompts))
    final, wall, result = posttrain.train(
        STAGE, trainer.__name__, inputs, out_dir, cfg.model_copy(update={"grpo": g.model_copy(update={"lr": lr})}),
        str(prompts), g.num_processes, data={"task": task.name, "config_hash": section_hash(cfg)},
        extra={"trained_with": "trl.GRPOTrainer", "reference_model": source, "learning_rate": lr,
               "learning_rate_from": lr_from}, settings=g, seed=g.seed, mtp_data=inputs["general"].outputs["manifest"])
    steps = posttrain.read_metrics(out_dir)
    metrics = {"steps": final["steps"], "wall_time_s": wall, "s_per_step": wall / max(final["steps"], 1), "lr": lr}
    for name, key in CURVES.items():
        values = [r[key] for r in steps if key in r]
        if values:
            k = max(1, len(values) // 5)  # first and last fifth of the run
            metrics[f"{name}_first"], metrics[f"{name}_last"] = sum(values[:k]) / k, sum(values[-k:]) / k
    metrics.update({**stats, **posttrain.refit_metrics(out_dir)})
    result.metrics, result.datasets = metrics, {"grpo-prompts": str(prompts)}
    table = [f"| {name} | {metrics.get(f'{name}_first', float('nan')):.3f} | "
             f"{metrics.get(f'{name}_last', float('nan')):.3f} |" for name in CURVES]
    result.report_md = "\n".join([
        "## GRPO (TRL GRPOTrainer)", "",
        (f"{final['steps']} steps x {g.prompts_per_step} prompts x G = {g.num_generations}; beta {g.beta:g}, epsilon "
         f"{g.epsilon:g}, loss {g.loss_type}, lr {lr:g} ({lr_from}), rewards {g.rewards}; {wall:,.0f} s."), "",
        "| per step (mean of the first / last fifth) | first | last |", "|---|---|---|", *table,
        "", posttrain.carried_note(out_dir)])
    return result
