"""GRPO stage (report §5.2): the model of role `model` (the SFT model) trained with TRL's GRPOTrainer on the
task's training prompts (R1 form), rewarded by the task's rule-based rewards; the standard model artifact out.

    out_dir/prompts.parquet   the prompts (R1 form, with the gold answer the accuracy reward checks)
    out_dir/run.json, trainer/, trained/, metrics.jsonl, tokenizer/, checkpoints/final/, hf/, model.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from v3flow.section import Section, section_hash
from v3flow.stage import StageResult, chain_lineage
from v3flow.stages.grpo import trainer
from v3flow.stages.grpo.config import GrpoConfig
from v3flow.tasks import TaskConfig, build
from v3flow.training import launch as training
from v3flow.training import posttrain

STAGE = "grpo"
CURVES = {"reward": "reward", "reward_std": "reward_std", "accuracy": "rewards/accuracy_reward/mean",
          "format": "rewards/format_reward/mean", "overlong": "rewards/overlong_reward/mean",
          "completion_length": "completions/mean_length",
          "clipped_ratio": trainer.CLIPPED, "zero_std_groups": trainer.ZERO_STD, "kl": "kl"}


class GrpoStageConfig(Section):
    task: TaskConfig
    grpo: GrpoConfig


def run(cfg: GrpoStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    import datasets

    g, task = cfg.grpo, build(cfg.task, resolve)
    source = Path(inputs["model"].outputs["model"])
    lineage = chain_lineage(inputs, STAGE, out_dir.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = g.steps * g.prompts_per_step
    problems = task.problems("train")
    rows = [{"prompt": task.prompt(p, "r1"), "answer": p.answer, "problem_id": p.id}
            for p in (problems * (needed // len(problems) + 1))[:needed]]
    datasets.Dataset.from_list(rows).to_parquet(str(out_dir / "prompts.parquet"))
    posttrain.prepare(STAGE, source, out_dir, {"grpo": g.model_dump(mode="json"),
                                               "task": cfg.task.model_dump(mode="json"),
                                               "prompts": str(out_dir / "prompts.parquet")})
    started = time.time()
    training.launch(trainer.__name__, out_dir, g.num_processes, "torchrun", prefix=f"[{STAGE}]")
    wall = time.time() - started
    final = json.loads((out_dir / "final.json").read_text())
    posttrain.artifact_from_trained(STAGE, source, out_dir / posttrain.TRAINED_DIR, out_dir, lineage,
                                    data={"task": task.name, "config_hash": section_hash(cfg)},
                                    extra={"trained_with": "trl.GRPOTrainer", "reference_model": str(source)})
    steps = posttrain.read_metrics(out_dir)
    metrics = {"steps": final["steps"], "wall_time_s": wall, "s_per_step": wall / max(final["steps"], 1)}
    for name, key in CURVES.items():
        values = [r[key] for r in steps if key in r]
        if values:
            k = max(1, len(values) // 5)  # first and last fifth of the run
            metrics[f"{name}_first"], metrics[f"{name}_last"] = sum(values[:k]) / k, sum(values[-k:]) / k
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir),
        outputs={"model": str(out_dir), "hf": str(out_dir / "hf"), "metrics": str(out_dir / posttrain.METRICS)},
        metrics=metrics, params={"input_model": str(source)},
        artifacts=[str(out_dir / posttrain.METRICS), str(out_dir / "model.json")],
        datasets={"grpo-prompts": str(out_dir / "prompts.parquet")})
    table = [f"| {name} | {metrics.get(f'{name}_first', float('nan')):.3f} | "
             f"{metrics.get(f'{name}_last', float('nan')):.3f} |" for name in CURVES]
    result.report_md = "\n".join([
        "## GRPO (TRL GRPOTrainer)", "",
        (f"{final['steps']} steps x {g.prompts_per_step} prompts x G = {g.num_generations}; beta {g.beta:g}, epsilon "
         f"{g.epsilon:g}, loss {g.loss_type}, lr {g.lr:g}, rewards {g.rewards}; {wall:,.0f} s."), "",
        "| per step (mean of the first / last fifth) | first | last |", "|---|---|---|", *table,
        "", f"MTP: {posttrain.CARRIED['mtp']}. Router biases: {posttrain.CARRIED['router_biases']}."])
    return result
