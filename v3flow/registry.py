"""The MLflow model registry, as the pipeline keeps it: one registered model per config (`v3flow-tiny`), a version
per model artifact (a model stage's Hugging Face folder, logged by the run that made it), an alias per stage
(`pretrain`, `sft`, ...) that follows the newest model of that stage, and `champion`.

A version is found again by its stage key, so a stage reused from the cache keeps its version (and gets its
alias back) instead of registering the same files twice. Its tags say where it comes from: the stage, the key,
the chain of keys down to the data (`lineage.<stage>`), the config and the stage's headline metrics; its run
link opens the producing run, whose params name the results it read.

The champion is decided on one metric of the evaluation stage, which scores each model it reads by role
(`<role>.<metric>`, e.g. `grpo.accuracy`): the best model of the run is promoted only if it beats the current
champion, and the comparison and the decision are written on the version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import Field

from v3flow import tracking
from v3flow.section import Section
from v3flow.stage import StageResult

STAGE_KEY_TAG = "v3flow.stage_key"


class RegistryConfig(Section):
    enabled: bool = True
    model_name: str | None = Field(None, description="Registered model name; default v3flow-<config name>.")
    evaluator: str = Field("evaluate", description="The stage whose per-model scores decide the champion.")
    champion_metric: str = Field("accuracy", description="The evaluator's per-model metric (`<role>.<metric>`) "
                                 "that decides the champion, e.g. accuracy or pass_at_4.")
    greater_is_better: bool = True


def model_name(cfg: RegistryConfig, config_name: str) -> str:
    return cfg.model_name or f"v3flow-{config_name}"


def register(uri: str, name: str, stage: str, result: StageResult, metrics: dict[str, float],
             config_name: str) -> str | None:
    """The version holding `stage`'s model (registered now unless it already is); sets the stage's alias to it.
    None when the producing run is not on this tracking server (a workdir made elsewhere)."""
    stage_key = f"{stage}:{result.key}"
    version = tracking.model_version_with_tag(uri, name, STAGE_KEY_TAG, stage_key)
    if version is None:
        source = tracking.artifact_uri(uri, result.mlflow_run_id, f"{stage}/hf")
        if source is None:
            return None
        tags = {"v3flow.stage": stage, STAGE_KEY_TAG: stage_key, "v3flow.config": config_name,
                "lineage": json.dumps(result.lineage), **{f"lineage.{s}": k for s, k in result.lineage.items()},
                **{f"metric.{m}": f"{v:.6g}" for m, v in metrics.items()}}
        version = tracking.register_model_version(
            uri, name, source, result.mlflow_run_id, tags,
            description=f"The {stage} model of config {config_name} (stage key {result.key}): Hugging Face format, "
                        f"written by run {result.mlflow_run_id}.")
    tracking.set_model_alias(uri, name, stage, version.version)
    return str(version.version)


@dataclass(frozen=True)
class Candidate:
    stage: str
    version: str
    value: float


def decide_champion(uri: str, name: str, candidates: list[Candidate], metric: str, greater_is_better: bool,
                    evaluation: str) -> str:
    """Promote the best candidate to `champion` if it beats the current one; returns the decision, which is also
    written on the best candidate's version (and every candidate gets its score as a tag)."""
    if not candidates:
        return "no evaluated model: champion unchanged"
    sign = 1 if greater_is_better else -1
    best = max(candidates, key=lambda c: sign * c.value)  # ties: the earliest stage, the least post-trained
    for c in candidates:
        tracking.set_model_version_tags(uri, name, c.version, {f"eval.{metric}": f"{c.value:.6g}",
                                                               "eval.source": evaluation})
    current = tracking.model_version_by_alias(uri, name, "champion")
    held = float(current.tags[f"eval.{metric}"]) if current and f"eval.{metric}" in current.tags else None
    if current and str(current.version) == best.version:
        decision = f"v{best.version} ({best.stage}) stays champion: {metric} {best.value:.4g}"
    elif held is None or sign * best.value > sign * held:
        against = f"over v{current.version} ({held:.4g})" if held is not None else "(no champion before)"
        decision = f"v{best.version} ({best.stage}) promoted to champion: {metric} {best.value:.4g} {against}"
        tracking.set_model_alias(uri, name, "champion", best.version)
    else:
        decision = (f"v{best.version} ({best.stage}) not promoted: {metric} {best.value:.4g} does not beat champion "
                    f"v{current.version} ({held:.4g})")
    tracking.set_model_version_tags(uri, name, best.version, {"champion.decision": decision})
    return decision
