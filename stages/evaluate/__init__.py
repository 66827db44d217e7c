"""Evaluation stage: every model of the chain (pretrained, both extension phases, SFT, GRPO) measured the same
way and set side by side in one table, at the end of the pipeline.

Measured here on each model, on the same validation sequences at the pretraining length: validation loss and
perplexity, expert balance (MaxVio per MoE layer) and MTP self-speculative acceptance. Gathered from the
evaluation stages that already scored the models they read (so nothing is decoded twice): the long-context
evaluation (passkey retrieval, loss in the longest position bucket) and the held-out task evaluation (greedy
accuracy, pass@k, format). A cell stays empty where a model was not scored by that evaluator.

`evaluation.models` adds any other model folder (an earlier run's export, a Hugging Face folder) to the same
table, measured the same way.

Input roles: one per model stage (`pretrain`, `extend_phase1`, ... : the role is the stage name), `val` (packed
sequences with a validation split), `long` (long_eval) and `tasks` (task_eval). Which of long_eval's and
task_eval's arms is which model comes from the pipeline's wiring (`long_arms`, `task_arms`).

    out_dir/models.json       one row per model: every measurement (an MLflow table)
    out_dir/val_batches.json  per model and validation batch: loss and tokens (an MLflow table)
    out_dir/mtp.json          per model: acceptance, its standard error, tokens per main pass
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from v3flow import training
from v3flow.errors import ConfigError
from v3flow.section import Section
from v3flow.stage import StageResult, StageSpec, Wiring

STAGE = "evaluate"
EVALUATORS = ("val", "long", "tasks")


class EvaluateSettings(Section):
    """The config's `evaluation` section."""

    val_batches: int = Field(8, gt=0, description="Validation batches scored per model.")
    micro_batch: int = Field(4, gt=0, description="Sequences per validation batch.")
    mtp_prompts: int = Field(16, ge=0, description="Prompts for MTP self-speculative acceptance (0: skip).")
    mtp_new_tokens: int = Field(32, gt=0, description="Tokens decoded per prompt for MTP acceptance.")
    models: dict[str, str] = Field(default_factory=dict, description="More models to measure beside the chain, "
                                   "name -> folder: a model stage's output, a Hugging Face folder or a checkpoint "
                                   "(same architecture and tokenizer as the config's). Part of the stage's key.")


class EvaluateConfig(EvaluateSettings):
    """The stage's section: the settings and which evaluator arm is which model."""

    long_arms: dict[str, str] = Field(default_factory=dict, description="long_eval arm -> model stage (wiring).")
    task_arms: dict[str, str] = Field(default_factory=dict, description="task_eval arm -> model stage (wiring).")
    document_mask: bool = Field(False, description="The validation loss attended within each document, as "
                                "pretraining was (pretrain.document_mask): every model scored the same way.")


def section(cfg, wiring: Wiring) -> EvaluateConfig:
    """The evaluation settings, and which arm of the evaluators it reads (roles `long`, `tasks`) is which model."""
    mine = wiring.inputs[STAGE]

    def arms(role: str) -> dict[str, str]:
        return {a: s for a, s in wiring.inputs.get(mine.get(role), {}).items() if s in wiring.models}

    return EvaluateConfig(**cfg.evaluation.model_dump(), long_arms=arms("long"), task_arms=arms("tasks"),
                          document_mask=cfg.pretrain.document_mask)


SPEC = StageSpec(
    STAGE, __name__, section, settings={"evaluation": EvaluateSettings},
    inputs=lambda earlier: {**{s.name: s.name for s in earlier if s.model}, "val": "pack", "long": "long_eval",
                            "tasks": "task_eval"},
    libraries=training.LIBRARIES,
    headline=lambda wiring: tuple(f"{m}.{k}" for m in wiring.models
                                  for k in ("val_loss", "mtp_acceptance_rate", "maxvio_mean", "accuracy")),
    report=("models",))

LONG_COLUMNS = ("passkey_exact_match", "passkey_top1", "passkey_rank")
TASK_COLUMNS = ("accuracy", "accuracy_stderr", "format_ok")


def fingerprint(cfg: EvaluateConfig, resolve) -> str:
    """The files of the extra models, when any: another model there is another evaluation."""
    from v3flow.cache import files_fingerprint

    return ",".join(f"{name}:{files_fingerprint(resolve(path))}" for name, path in sorted(cfg.models.items()))


def run(cfg: EvaluateConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    from v3flow.evaluation.language_model import loss_and_balance, mtp_acceptance
    from v3flow.training import artifact
    from v3flow.training.data import PackedSequences

    out_dir.mkdir(parents=True, exist_ok=True)
    val = PackedSequences(Path(inputs["val"].outputs["manifest"]), "val")
    folders = {role: Path(r.outputs["model"]) for role, r in inputs.items() if role not in EVALUATORS}
    clash = set(cfg.models) & set(folders)
    if clash:
        raise ConfigError(f"evaluation.models: {sorted(clash)} already name models of the chain; pick other names")
    folders.update({name: resolve(path) for name, path in cfg.models.items()})
    long = inputs["long"].metrics if "long" in inputs else {}
    tasks = inputs["tasks"].metrics if "tasks" in inputs else {}
    long_bucket = _longest_bucket(long)
    rows, batches, mtp_rows, metrics = [], [], [], {}
    for stage, folder in folders.items():
        model = artifact.load_model(folder)
        scored = loss_and_balance(model, val, cfg.val_batches, cfg.micro_batch, cfg.document_mask)
        m = dict(scored["metrics"])
        if cfg.mtp_prompts:
            m.update(mtp_acceptance(model, val, cfg.mtp_prompts, new_tokens=cfg.mtp_new_tokens))
        for arm, source in cfg.long_arms.items():
            if source == stage:
                m.update({f"long.{c}": long[f"{arm}.{c}"] for c in LONG_COLUMNS if f"{arm}.{c}" in long})
                if long_bucket and f"{arm}.loss.{long_bucket}" in long:
                    m[f"long.loss.{long_bucket}"] = long[f"{arm}.loss.{long_bucket}"]
        for arm, source in cfg.task_arms.items():
            if source == stage:
                m.update({k.removeprefix(f"{arm}."): v for k, v in tasks.items()
                          if k.startswith(f"{arm}.") and "gain_over" not in k})
        print(f"[{STAGE}] {stage}: val loss {m['val_loss']:.3f}, MaxVio {m.get('maxvio_mean', float('nan')):.2f}, "
              f"MTP acceptance {m.get('mtp_acceptance_rate', float('nan')):.2f}", flush=True)
        metrics.update({f"{stage}.{k}": float(v) for k, v in m.items()})
        rows.append({"model": stage, **{k: round(float(v), 5) for k, v in m.items()}})
        batches += [{"model": stage, **b} for b in scored["batches"]]
        mtp_rows.append({"model": stage, **{k: v for k, v in m.items() if k.startswith("mtp_")}})
    files = {name: out_dir / name for name in ("models.json", "val_batches.json", "mtp.json")}
    for name, records in (("models.json", rows), ("val_batches.json", batches), ("mtp.json", mtp_rows)):
        files[name].write_text(json.dumps(records, indent=2))
    result = StageResult(stage=STAGE, key=out_dir.name, out_dir=str(out_dir),
                         outputs={"models": str(files["models.json"])}, metrics=metrics,
                         artifacts=[str(files["models.json"])], tables={n: str(p) for n, p in files.items()})
    result.report_md = _report(rows, long_bucket, val.seq_len, cfg)
    return result


def _longest_bucket(long: dict[str, float]) -> str | None:
    buckets = {k.split(".loss.")[1] for k in long if ".loss." in k}
    return max(buckets, key=lambda b: int(b.split("-")[0])) if buckets else None


def _report(rows: list[dict], long_bucket: str | None, seq_len: int, cfg: EvaluateConfig) -> str:
    columns = [("val_loss", "val loss", "{:.3f}"), ("val_perplexity", "val ppl", "{:.1f}"),
               ("maxvio_mean", "MaxVio", "{:.2f}"), ("mtp_acceptance_rate", "MTP accept", "{:.2f}"),
               ("long.passkey_exact_match", "passkey", "{:.0%}"),
               (f"long.loss.{long_bucket}", f"loss {long_bucket}", "{:.3f}"),
               ("accuracy", "task accuracy", "{:.1%}"), ("format_ok", "format ok", "{:.0%}")]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + r["model"] + " | " + " | ".join(fmt.format(r[k]) if k in r else "" for k, _, fmt in columns)
              + " |" for r in rows]
    return "\n".join([
        "## Every model of the chain", "",
        (f"Validation loss, perplexity and MaxVio on the same {cfg.val_batches} x {cfg.micro_batch} validation "
        f"sequences of {seq_len} tokens; MTP acceptance from {cfg.mtp_prompts} prompts; passkey and long-position "
        "loss from the long-context evaluation, task accuracy from the held-out task evaluation (empty: not "
        "scored by that evaluator)."), "", *lines])
