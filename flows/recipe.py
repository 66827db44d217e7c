"""The recipe: DeepSeek-V3's stages in order, each declared once in its own module (stages/<name>: its config
section, inputs by role, libraries, headline metrics, report-card blocks), and how their inputs are wired.

Adding a stage is its module and one line here; the pipeline config, the Prefect forms and deployments, the
report card and the registry follow from this list.
"""

from __future__ import annotations

from stages import data, distill, evaluate, extend, grpo, long_eval, pack, pretrain, sft, task_eval
from v3flow.errors import ConfigError
from v3flow.stage import StageSpec, Wiring

PHASE_PACKING = ("train_tokens", "train_long_share_upsampled")

RECIPE: list[StageSpec] = [
    data.SPEC,
    pack.SPEC,
    pretrain.SPEC,
    pack.spec("pack_phase1", extend.packing("phase1"), PHASE_PACKING, phase="extend"),
    extend.spec("phase1", start="pretrain"),
    pack.spec("pack_phase2", extend.packing("phase2"), PHASE_PACKING, phase="extend"),
    extend.spec("phase2", start="extend_phase1"),
    long_eval.SPEC,
    distill.SPEC,
    sft.SPEC,
    grpo.SPEC,
    task_eval.SPEC,
    evaluate.SPEC,
]

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in RECIPE}
MODEL_STAGES = tuple(spec.name for spec in RECIPE if spec.model)
PHASES = {phase: tuple(s.name for s in RECIPE if s.phase == phase) for phase in dict.fromkeys(s.phase for s in RECIPE)
          if phase}


def wiring(cfg=None) -> Wiring:
    """Which stage fills each input role of each stage: the stages' defaults, changed by the config's `inputs`
    (e.g. `inputs: {sft: {model: pretrain}}` when context extension is off). A role can only be filled by an
    earlier stage."""
    order = list(STAGES)
    wires = {spec.name: spec.default_inputs(RECIPE[:i]) for i, spec in enumerate(RECIPE)}
    for stage, roles in (cfg.inputs if cfg else {}).items():
        if stage not in STAGES:
            raise ConfigError(f"config key inputs.{stage}: no such stage; the pipeline has {order}")
        for role, provider in roles.items():
            if role not in wires[stage]:
                raise ConfigError(f"config key inputs.{stage}.{role}: stage {stage} has no input {role!r} "
                                  f"(its inputs: {list(wires[stage])})")
            earlier = order[:order.index(stage)]
            if provider not in earlier:
                raise ConfigError(f"config key inputs.{stage}.{role}={provider!r}: must be one of the stages before "
                                  f"{stage}: {earlier}")
            wires[stage][role] = provider
    return Wiring(wires, MODEL_STAGES)


def plan(stages: list[str], wires: Wiring | None = None) -> list[str]:
    """Chosen stages plus the stages that fill their inputs, in pipeline order."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the pipeline has {list(STAGES)}")
    inputs = (wires or wiring()).inputs
    wanted: set[str] = set()

    def need(name: str) -> None:
        wanted.add(name)
        for up in inputs[name].values():
            need(up)

    for name in stages or list(STAGES):
        need(name)
    return [name for name in STAGES if name in wanted]
