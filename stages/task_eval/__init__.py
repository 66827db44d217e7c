"""Task evaluation stage: held-out accuracy of every model of the post-training chain, scored the same way
(v3flow/evaluation/tasks.py): greedy accuracy with its standard error, pass@k from n seeded samples, accuracy
by problem group, and the gain of each arm over the previous one on the same problems (paired standard error).

Arms (input roles, in chain order; each gain is over the arm before): `base` (the model before post-training),
`sft`, `grpo` by default.

    out_dir/accuracy.json   one row per arm (an MLflow table)
    out_dir/samples.json    every problem x arm: question, gold, greedy response, verdict, sampled successes
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from v3flow import training
from v3flow.section import Section
from v3flow.stage import StageResult, StageSpec
from v3flow.tasks import TaskConfig, build
from v3flow.tasks.arithmetic import ArithmeticSettings

STAGE = "task_eval"


class TaskEvalSettings(Section):
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    problems: int = Field(500, gt=0, description="Held-out problems (the first N of the task's test split).")
    samples: int = Field(8, ge=0, description="Sampled responses per problem for pass@k (0: greedy only).")
    ks: list[int] = Field(default_factory=lambda: [1, 8], description="pass@k reported for these k (<= samples).")
    temperature: float = Field(0.6, gt=0, description="Sampling temperature (R1's evaluation: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="R1's evaluation: 0.95.")
    max_new_tokens: int = Field(32768, gt=0, description="Generation limit; a response cut there is wrong.")
    seed: int = 0
    batch_size: int = Field(64, gt=0, description="Sequences decoded together.")


class TaskEvalStageConfig(Section):
    task: TaskConfig
    eval: TaskEvalSettings


SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: TaskEvalStageConfig(task=cfg.posttrain.task, eval=cfg.posttrain.eval),
    settings={"posttrain.task": (TaskConfig, ArithmeticSettings), "posttrain.eval": TaskEvalSettings},
    inputs={"base": "extend_phase2", "sft": "sft", "grpo": "grpo"},
    libraries=(*training.LIBRARIES, "tokenizers", "math_verify"),
    headline=("base.accuracy", "sft.accuracy", "grpo.accuracy", "sft.pass_at_4", "grpo.pass_at_4",
              "sft.gain_over_base", "grpo.gain_over_sft", "grpo.gain_over_sft_stderr"),
    phase="posttrain", report=("accuracy",))


def paired_gain(before: list[dict], after: list[dict]) -> tuple[float, float]:
    """Mean per-problem difference in greedy correctness, and its standard error."""
    d = [float(b["correct"]) - float(a["correct"]) for a, b in zip(before, after, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def run(cfg: TaskEvalStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    from transformers import AutoTokenizer

    from v3flow.evaluation.tasks import score, summary
    from v3flow.training import artifact

    e, task = cfg.eval, build(cfg.task, resolve)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = task.problems("test")[: e.problems]
    arms = list(inputs)  # in chain order
    records, rows, metrics = {}, [], {}
    for arm in arms:
        source = Path(inputs[arm].outputs["model"])
        tokenizer = AutoTokenizer.from_pretrained(source / artifact.read_manifest(source)["hf"])
        model = artifact.load_model(source)
        records[arm] = score(model, tokenizer, task, problems, e.samples, e.temperature, e.top_p, e.max_new_tokens,
                             e.seed, e.batch_size)
        s = summary(records[arm], [k for k in e.ks if k <= e.samples])
        print(f"[{STAGE}] {arm}: accuracy {s['accuracy']:.1%} +- {s['accuracy_stderr']:.1%}", flush=True)
        metrics.update({f"{arm}.{k}": v for k, v in s.items()})
        rows.append({"arm": arm, **{k: round(v, 4) for k, v in s.items()}})
    for before, after in itertools.pairwise(arms):
        gain, se = paired_gain(records[before], records[after])
        metrics[f"{after}.gain_over_{before}"], metrics[f"{after}.gain_over_{before}_stderr"] = gain, se
        rows[arms.index(after)][f"gain_over_{before}"] = f"{gain:+.4f} +- {se:.4f}"
    (out_dir / "accuracy.json").write_text(json.dumps(rows, indent=2))
    samples = [{"arm": arm, **r} for arm in arms for r in records[arm]]
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=2))
    ks = [k for k in e.ks if k <= e.samples]
    header = "| model | greedy accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " | format ok | truncated | tokens |"
    lines = [f"| {r['arm']} | {r['accuracy']:.1%} +- {r['accuracy_stderr']:.1%} | "
             + " | ".join(f"{r[f'pass_at_{k}']:.1%}" for k in ks) + f" | {r['format_ok']:.0%} | {r['truncated']:.0%} | "
             f"{r['mean_tokens']:.0f} |" for r in rows]
    gains = [f"- {a} over {b}: {metrics[f'{a}.gain_over_{b}']:+.1%} +- {metrics[f'{a}.gain_over_{b}_stderr']:.1%} "
             "(paired)" for b, a in itertools.pairwise(arms)]
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir), outputs={"accuracy": str(out_dir / "accuracy.json")},
        metrics=metrics, artifacts=[str(out_dir / "accuracy.json")],
        tables={"accuracy.json": str(out_dir / "accuracy.json"), "samples.json": str(out_dir / "samples.json")})
    result.report_md = "\n".join([
        f"## Held-out {task.name} accuracy", "",
        (f"{len(problems)} held-out problems; greedy, and pass@k from {e.samples} samples at temperature "
         f"{e.temperature:g}, top-p {e.top_p:g} (seed {e.seed})."), "",
        header, "|---|---|" + "---|" * len(ks) + "---|---|---|", *lines, "", *gains])
    return result
