"""Deployments: start the pipeline or a single stage from the Prefect UI.

`v3flow serve` (or `make serve`) registers them with the Prefect server and keeps one process that runs
each flow run in its own subprocess; no work pool is needed on one machine. For a cluster, the same
flows deploy to a work pool with `prefect deploy` (see infra/README.md).

The request models become forms in the UI (config path, overrides, stages, force). The data stage ships
with a nightly refresh schedule that is paused; switch it on in the UI.
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron

from v3flow.flows.pipeline import data, extend, pipeline, posttrain, pretrain

DEPLOYMENT = "v3flow"
NIGHTLY = Cron("0 3 * * *", timezone="UTC", active=False, slug="nightly-data-refresh")


def deployments() -> list:
    common = {"name": DEPLOYMENT, "entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["v3flow"]}
    return [
        pipeline.to_deployment(description="The whole recipe, or chosen stages.", **common),
        data.to_deployment(description="Data preparation alone.", schedules=[NIGHTLY], **common),
        pretrain.to_deployment(description="Pretraining (with the data it needs).", **common),
        extend.to_deployment(description="Context extension, both YaRN phases and the long-context evaluation, from "
                             "the config's pretrained model.", **common),
        posttrain.to_deployment(description="Post-training: distillation, SFT, GRPO and the held-out task evaluation, "
                                "from the config's newest extended model (reused, or trained first).", **common),
    ]


def serve_deployments() -> None:
    serve(*deployments(), pause_on_shutdown=False)
