"""Deployments: start the pipeline, a phase or a single stage from the Prefect UI.

`v3flow serve` (or `make serve`) registers them with the Prefect server and keeps one process that runs
each flow run in its own subprocess; no work pool is needed on one machine. For a cluster, the same
flows deploy to a work pool with `prefect deploy` (see infra/README.md).

    pipeline/whole-recipe           the recipe, or the stages chosen in its form
    extend/yarn-two-phases          context extension and its evaluation
    posttrain/distill-sft-grpo      post-training and the held-out task evaluation
    stage/<stage>                   one stage (e.g. stage/sft), on the newest outputs before it

Shipped automation, all of it editable in the UI: a nightly data refresh and a nightly SFT rerun on the newest
extended model (both paused: switch them on in the deployment's schedules), and a trigger that starts context
extension when a run of stage/pretrain completes, with the same config and overrides.

Restarting `serve` keeps what was set in the UI: a deployment that exists keeps its schedules (active or
paused, added or edited there) and its paused state; a shipped schedule is only added when no schedule with
its slug exists.
"""

from __future__ import annotations

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from flows.pipeline import RunRequest, extend, pipeline, posttrain, stage
from flows.recipe import STAGES

NIGHTLY_DATA = Cron("0 3 * * *", timezone="UTC", active=False, slug="nightly-data-refresh")
NIGHTLY_SFT = Cron("0 4 * * *", timezone="UTC", active=False, slug="nightly-sft-on-newest-base")


def _upstream_request(force: bool = False) -> dict:
    """The parameters of a triggered run: the config and overrides of the run that triggered it (Prefect renders
    the templates from the triggering flow run; a form leaves out the fields it kept at their defaults)."""
    def jinja(template: str) -> dict:
        return {"__prefect_kind": "jinja", "template": template}

    request = "flow_run.parameters['request']"
    default = RunRequest.model_fields["config"].default
    return {"config": jinja(f"{{{{ {request}.get('config', '{default}') }}}}"),
            "overrides": {"__prefect_kind": "json", "value": jinja(f"{{{{ {request}.get('overrides', []) | tojson }}}}")},
            "force": force}


def deployments() -> list[RunnerDeployment]:
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["v3flow"]}
    after_pretrain = DeploymentEventTrigger(
        name="extend when pretraining completes", expect={"prefect.flow-run.Completed"},
        match_related={"prefect.resource.role": "deployment", "prefect.resource.name": "pretrain"},
        parameters={"request": _upstream_request()})
    return [
        pipeline.to_deployment(name="whole-recipe", description="The whole recipe, or the stages chosen in the form.",
                               **common),
        extend.to_deployment(name="yarn-two-phases", description="Context extension (both YaRN phases) and the long-"
                             "context evaluation, from the config's newest pretrained model. Starts by itself when a "
                             "run of stage/pretrain completes.", triggers=[after_pretrain], **common),
        posttrain.to_deployment(name="distill-sft-grpo", description="Post-training: distillation, SFT, GRPO and the "
                                "held-out task evaluation, from the config's newest extended model.", **common),
        *[stage.to_deployment(name=name, description=f"The {name} stage alone, on the newest outputs of the stages "
                              "it needs (reused when unchanged, run first otherwise).",
                              parameters={"request": {"stage": name}},
                              schedules={"data": [NIGHTLY_DATA], "sft": [NIGHTLY_SFT]}.get(name, []), **common)
          for name in STAGES],
    ]


def keep_ui_state(deployment: RunnerDeployment) -> RunnerDeployment:
    """`deployment` with the schedules and paused state the server holds for it, so that registering it again
    changes neither (Prefect replaces a deployment's schedules with the ones registered). Shipped schedules
    are added only where no schedule has their slug."""
    with get_client(sync_client=True) as client:
        try:
            current = client.read_deployment_by_name(deployment.full_name)
        except ObjectNotFound:
            return deployment
    held = [DeploymentScheduleCreate(schedule=s.schedule, active=s.active, parameters=s.parameters, slug=s.slug)
            for s in current.schedules]
    slugs = {s.slug for s in current.schedules if s.slug}
    deployment.schedules = held + [s for s in deployment.schedules or [] if s.slug not in slugs]
    deployment.paused = current.paused
    return deployment


def serve_deployments() -> None:
    serve(*[keep_ui_state(d) for d in deployments()], pause_on_shutdown=False)
