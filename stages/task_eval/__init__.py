"""Task evaluation stage: held-out accuracy of every model of the post-training chain, scored the same way
(v3flow/evaluation/tasks.py): greedy accuracy with its standard error, pass@k from n seeded samples, accuracy
by difficulty and by detail (arithmetic: carries), and the gain of each arm over the previous one on the same
problems (paired standard error). The headline is the held-out problems at the trained difficulties; harder
ones are reported apart.

Arms (input roles, in chain order; each gain is over the arm before): `base` (the model before post-training),
`sft`, `grpo` by default. Every arm is scored in the R1 form; the arms in `own_format` (the base model) also
few-shot in the format of their pretraining corpus, as the report scores base models, and that is their
accuracy: a base model is not judged in a format it never saw.

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
    problems: int = Field(1000, gt=0, description="Held-out problems per trained difficulty (the first N of each).")
    harder_problems: int = Field(250, ge=0, description="Held-out problems per harder difficulty (reported apart, "
                                 "never in the headline or the gains).")
    shots: int = Field(4, ge=0, description="Worked training problems before the question in the few-shot form; 0: "
                       "the question alone (a model pretrained with document_mask on one-problem documents never "
                       "saw two problems in one context).")
    own_format: list[str] = Field(default_factory=lambda: ["base"], description="Arms scored few-shot too, with "
                                  "that as their accuracy (base models: the report scores them few-shot).")
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


def paired_gain(before: list[dict], after: list[dict], sampled: bool = False) -> tuple[float, float]:
    """Mean per-problem difference in greedy correctness (`sampled`: in the share of sampled responses that are
    right, R1's pass@1), and its standard error."""
    def right(r: dict) -> float:
        return r["samples_correct"] / r["samples"] if sampled else float(r["correct"])

    d = [right(b) - right(a) for a, b in zip(before, after, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def run(cfg: TaskEvalStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    from transformers import AutoTokenizer

    from v3flow.evaluation.tasks import score, summary
    from v3flow.training import artifact

    e, task = cfg.eval, build(cfg.task, resolve)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_group: dict[str, list] = {}
    for p in task.problems("test"):
        per_group.setdefault(p.group, []).append(p)
    quota = {g: e.problems if task.trained(group[0]) else e.harder_problems for g, group in per_group.items()}
    problems = [p for g, group in per_group.items() for p in group[: quota[g]]]
    shots = task.problems("train")[: e.shots]
    arms = list(inputs)  # in chain order
    ks = [k for k in e.ks if k <= e.samples]
    records, rows, metrics = {}, [], {}
    for arm in arms:
        source = Path(inputs[arm].outputs["model"])
        tokenizer = AutoTokenizer.from_pretrained(source / artifact.read_manifest(source)["hf"])
        model = artifact.load_model(source)
        forms = ["few_shot", "r1"] if arm in e.own_format else ["r1"]
        for form in forms:  # the other form is shown beside, greedy only
            samples = e.samples if form == forms[0] else 0
            scored = score(model, tokenizer, task, problems, samples, e.temperature, e.top_p, e.max_new_tokens,
                           e.seed, e.batch_size, form, shots)
            s = summary(scored, ks)
            print(f"[{STAGE}] {arm} ({form}): accuracy {s['accuracy']:.1%} +- {s['accuracy_stderr']:.1%} on "
                  f"{s['problems']} problems", flush=True)
            if form == forms[0]:  # the arm's own format: its accuracy
                records[arm] = scored
                metrics.update({f"{arm}.{k}": v for k, v in s.items()})
            else:
                metrics.update({f"{arm}.{form}.{k}": v for k, v in s.items()})
            rows.append({"arm": arm, "form": form, **{k: round(v, 4) for k, v in s.items()}})
    for before, after in itertools.pairwise(arms):
        pair = [[r for r in records[arm] if r["trained"]] for arm in (before, after)]
        gain, se = paired_gain(*pair)
        metrics[f"{after}.gain_over_{before}"], metrics[f"{after}.gain_over_{before}_stderr"] = gain, se
        if e.samples:
            sampled, sampled_se = paired_gain(*pair, sampled=True)
            metrics[f"{after}.sampled_gain_over_{before}"] = sampled
            metrics[f"{after}.sampled_gain_over_{before}_stderr"] = sampled_se
        for row in rows:
            if row["arm"] == after:
                row[f"gain_over_{before}"] = f"{gain:+.4f} +- {se:.4f}"
    (out_dir / "accuracy.json").write_text(json.dumps(rows, indent=2))
    samples = [{"arm": arm, **r} for arm in arms for r in records[arm]]
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=2))
    header = ("| model | form | greedy accuracy | " + " | ".join(f"pass@{k}" for k in ks)
              + " | harder | format ok | truncated | tokens |")
    lines = [f"| {r['arm']} | {r['form']} | {r['accuracy']:.1%} +- {r['accuracy_stderr']:.1%} | "
             + " | ".join(f"{r[f'pass_at_{k}']:.1%}" if f"pass_at_{k}" in r else "-" for k in ks)
             + f" | {r.get('accuracy_harder', float('nan')):.1%} | {r['format_ok']:.0%} | {r['truncated']:.0%} | "
             f"{r['mean_tokens']:.0f} |" for r in rows]
    gains = [f"- {a} over {b}: greedy {metrics[f'{a}.gain_over_{b}']:+.1%} +- "
             f"{metrics[f'{a}.gain_over_{b}_stderr']:.1%}"
             + (f", sampled pass@1 {metrics[f'{a}.sampled_gain_over_{b}']:+.1%} +- "
                f"{metrics[f'{a}.sampled_gain_over_{b}_stderr']:.1%}" if e.samples else "")
             + " (paired)" for b, a in itertools.pairwise(arms)]
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir), outputs={"accuracy": str(out_dir / "accuracy.json")},
        metrics=metrics, artifacts=[str(out_dir / "accuracy.json")],
        tables={"accuracy.json": str(out_dir / "accuracy.json"), "samples.json": str(out_dir / "samples.json")})
    result.report_md = "\n".join([
        f"## Held-out {task.name} accuracy", "",
        (f"{sum(r['trained'] for r in records[arms[0]])} held-out problems at the trained difficulties (the "
         f"headline; harder: {sum(not r['trained'] for r in records[arms[0]])} more, apart); greedy, and pass@k from "
         f"{e.samples} samples at temperature {e.temperature:g}, top-p {e.top_p:g} (seed {e.seed}). Few-shot: "
         f"{e.shots} worked training problems in the corpus's format, then the question."), "",
        header, "|---|---|---|" + "---|" * len(ks) + "---|---|---|---|", *lines, "", *gains])
    return result
