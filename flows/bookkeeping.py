"""The pipeline run's MLflow parent run: what two pipeline runs are compared by, the model registry, and the
report card.

The parent run carries the whole config as params, every stage's headline metrics as `<stage>.<metric>`, its
key and seconds, which stages were reused or forced, the registry versions and the champion decision; its
report card is built from what MLflow holds, and shown in Prefect as the flow run's artifacts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.recipe import STAGES
from v3flow import registry, report_card, tracking
from v3flow.section import section_hash
from v3flow.stage import StageResult, Wiring


def card_layout(wires: Wiring) -> dict[str, report_card.StageView]:
    """What the report card shows of each stage, from its spec."""
    return {name: report_card.StageView(s.curves, s.report, tuple(wires.inputs[name])) for name, s in STAGES.items()}


class ParentRun:
    def __init__(self, cfg, wires: Wiring, order: list[str], forced: set[str], run_name: str, tags: dict[str, str]):
        self.cfg, self.wires, self.order = cfg, wires, order
        self.uri = tracking.tracking_uri(cfg.tracking.tracking_uri)
        self.registry, self.model = cfg.tracking.registry, registry.model_name(cfg.tracking.registry, cfg.name)
        self.versions: dict[str, str] = {}
        self.reused: set[str] = set()
        tags = {**tags, "v3flow.config_hash": section_hash(cfg), "v3flow.config": cfg.name,
                "v3flow.stages": ",".join(order), "v3flow.forced": ",".join(n for n in order if n in forced)}
        self.run_id = tracking.start_run(self.uri, cfg.tracking.experiment, run_name, tags,
                                         tracking.flatten(cfg.model_dump(mode="json")))
        tracking.log_text(self.uri, self.run_id, cfg.model_dump_json(indent=2), "config.json")

    def stage_done(self, name: str, result: StageResult, cached: bool, seconds: float) -> None:
        """Its headline metrics and seconds on the parent run; a model stage's model registered."""
        spec = STAGES[name]
        if cached:
            self.reused.add(name)
        headline = {m: result.metrics[m] for m in spec.headline_for(self.wires) if m in result.metrics}
        tracking.log_metrics(self.uri, self.run_id, {**{f"{name}.{m}": v for m, v in headline.items()},
                                                     f"{name}.seconds": seconds})
        if self.registry.enabled and spec.model and "hf" in result.outputs:
            version = registry.register(self.uri, self.model, name, result, headline, self.cfg.name)
            if version:
                self.versions[name] = version

    def finish(self, results: dict[str, StageResult]) -> None:
        decision = self._champion(results) if self.registry.enabled else None
        tracking.set_tags(self.uri, self.run_id, {
            "v3flow.reused": ",".join(n for n in self.order if n in self.reused),
            **{f"v3flow.{n}.key": r.key for n, r in results.items()},
            **{f"v3flow.{n}.model_version": f"{self.model}/{v}" for n, v in self.versions.items()},
            **({"v3flow.champion": decision} if decision else {})})
        tracking.end_run(self.uri, self.run_id)
        self._report_card()

    def fail(self, status: str) -> None:
        tracking.end_run(self.uri, self.run_id, status)

    def _champion(self, results: dict[str, StageResult]) -> str | None:
        """The champion decision on the evaluator's scores of the models it read (None when it did not run)."""
        cfg = self.registry
        evaluation = results.get(cfg.evaluator)
        if evaluation is None:
            return None
        metric = cfg.champion_metric
        candidates = [registry.Candidate(stage, self.versions[stage], evaluation.metrics[f"{role}.{metric}"])
                      for role, stage in self.wires.inputs[cfg.evaluator].items()
                      if stage in self.versions and f"{role}.{metric}" in evaluation.metrics]
        return registry.decide_champion(self.uri, self.model, candidates, metric, cfg.greater_is_better,
                                        f"{cfg.evaluator}:{evaluation.key}")

    def _report_card(self) -> None:
        """The report card on the parent run, and the flow run's Prefect artifacts: the card's tables with links to
        the MLflow parent run and its HTML page (with the figures)."""
        with tempfile.TemporaryDirectory() as tmp:
            card = report_card.publish(self.uri, self.run_id, Path(tmp), card_layout(self.wires))
        link = tracking.run_url(self.uri, self.run_id)
        create_markdown_artifact(
            markdown=f"[MLflow parent run]({link}), with the full report card (report_card.html, figures included) "
                     f"among its artifacts.\n\n{card.markdown(figures=False)}",
            key="report-card", description="The pipeline run's report card (tables; figures in MLflow)")
        create_link_artifact(link=link, link_text="MLflow: pipeline parent run", key="pipeline-mlflow")


def close_orphans(uri: str, experiment: str) -> None:
    """End as KILLED the MLflow runs left RUNNING by a pipeline whose process died without a word (SIGKILL, a lost
    node): their Prefect flow run has ended (Prefect marks it CRASHED), so nothing will ever end them."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    running = tracking.running_runs(uri, experiment)
    ended = set()
    with get_client(sync_client=True) as client:
        for flow_run_id in {r.data.tags.get("prefect.flow_run_id") for r in running} - {None, ""}:
            try:
                if client.read_flow_run(flow_run_id).state.is_final():
                    ended.add(flow_run_id)
            except ObjectNotFound:
                continue
    parents = {r.info.run_id for r in running if r.data.tags.get("prefect.flow_run_id") in ended}
    for run in running:
        if run.info.run_id in parents or run.data.tags.get(tracking.PARENT_TAG) in parents:
            tracking.set_tags(uri, run.info.run_id, {"v3flow.closed_by": "a later pipeline run: its flow run ended "
                                                     "without ending it (process killed)"})
            tracking.end_run(uri, run.info.run_id, "KILLED")
