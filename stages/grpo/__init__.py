"""GRPO stage (report §5.2): the model of role `model` (the SFT model) trained with TRL's GRPOTrainer on the
task's training prompts (R1 form), rewarded by the task's rule-based rewards; the standard model artifact out.

    out_dir/prompts.parquet   the prompts (R1 form, with the gold answer the accuracy reward checks)
    out_dir/run.json, trainer/, trained/, metrics.jsonl, tokenizer/, checkpoints/final/, hf/, model.json
"""

from __future__ import annotations

from pathlib import Path

from stages.grpo import trainer
from stages.grpo.config import GrpoConfig, GrpoStageConfig
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
    inputs={"model": "sft"},
    libraries=(*posttrain.LIBRARIES, "math_verify"),
    headline=tuple(f"{m}_{end}" for m in ("reward", "accuracy", "format", "completion_length", "kl", "zero_std_groups")
                   for end in ("first", "last")),
    model=True, phase="posttrain", curves=("reward", CURVES["accuracy"], "kl"))


def run(cfg: GrpoStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    import datasets

    g, task = cfg.grpo, build(cfg.task, resolve)
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = g.steps * g.prompts_per_step
    problems = task.problems("train")
    rows = [{"prompt": task.prompt(p, "r1"), "answer": p.answer, "problem_id": p.id}
            for p in (problems * (needed // len(problems) + 1))[:needed]]
    prompts = out_dir / "prompts.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(prompts))
    source = inputs["model"].outputs["model"]
    final, wall, result = posttrain.train(
        STAGE, trainer.__name__, inputs, out_dir, cfg, str(prompts), g.num_processes,
        data={"task": task.name, "config_hash": section_hash(cfg)},
        extra={"trained_with": "trl.GRPOTrainer", "reference_model": source})
    steps = posttrain.read_metrics(out_dir)
    metrics = {"steps": final["steps"], "wall_time_s": wall, "s_per_step": wall / max(final["steps"], 1)}
    for name, key in CURVES.items():
        values = [r[key] for r in steps if key in r]
        if values:
            k = max(1, len(values) // 5)  # first and last fifth of the run
            metrics[f"{name}_first"], metrics[f"{name}_last"] = sum(values[:k]) / k, sum(values[-k:]) / k
    result.metrics, result.datasets = metrics, {"grpo-prompts": str(prompts)}
    table = [f"| {name} | {metrics.get(f'{name}_first', float('nan')):.3f} | "
             f"{metrics.get(f'{name}_last', float('nan')):.3f} |" for name in CURVES]
    result.report_md = "\n".join([
        "## GRPO (TRL GRPOTrainer)", "",
        (f"{final['steps']} steps x {g.prompts_per_step} prompts x G = {g.num_generations}; beta {g.beta:g}, epsilon "
         f"{g.epsilon:g}, loss {g.loss_type}, lr {g.lr:g}, rewards {g.rewards}; {wall:,.0f} s."), "",
        "| per step (mean of the first / last fifth) | first | last |", "|---|---|---|", *table,
        "", posttrain.CARRIED_NOTE])
    return result
