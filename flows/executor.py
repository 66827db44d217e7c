"""The one cache protocol, without Prefect: the Prefect runner, offline runs, tests and benchmarks all execute a
stage through `execute_stage`.

Caching is Marin-style rather than Prefect's result cache: a stage's output folder is `<workdir>/<stage>/<key>`,
where the key hashes the stage's config section, its upstream stages' keys, a fingerprint of its input files,
its code and its libraries' versions (v3flow/cache.py). A folder holding `result.json` is a finished stage, so
the cache survives restarts of the Prefect server and disappears with the files it describes. Two runs that
reach one key never write at once: the second waits for the first and reuses its result.

What happens around a stage (an MLflow child run, Prefect artifacts) is an `Observer`'s; the default observes
nothing.
"""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from flows.recipe import STAGES, plan, wiring
from v3flow import cache
from v3flow.stage import RESULT_FILE, StageResult, StageSpec, Wiring, chain_lineage


def key_parts(spec: StageSpec, cfg, wires: Wiring, upstream: dict[str, str],
              locate: cache.Locate = cache.installed) -> cache.KeyParts:
    """What the stage's key hashes, given the key of the result that fills each of its input roles."""
    section = spec.section(cfg, wires)
    fingerprint = getattr(spec.runner(), "fingerprint", None)
    return cache.KeyParts(
        stage=spec.name, config=section.hashable(), upstream=dict(upstream),
        inputs=fingerprint(section, cfg.resolve) if fingerprint else "",
        code=cache.code_hashes(spec.module, locate), libraries=cache.library_versions(spec.libraries))


def stage_key(spec: StageSpec, cfg, inputs: dict[str, StageResult], wires: Wiring | None = None) -> str:
    """The key of `spec` given the results that fill its input roles."""
    return key_parts(spec, cfg, wires or wiring(cfg), {role: r.key for role, r in inputs.items()}).key()


def dry_run(names: list[str], wires: Wiring, cfg, locate: cache.Locate = cache.installed) -> list[dict]:
    """Per stage in order: its key, whether it is cached, and for a miss what changed since it last ran."""
    keys: dict[str, str] = {}
    out = []
    for name in names:
        parts = key_parts(STAGES[name], cfg, wires, {role: keys[s] for role, s in wires.inputs[name].items()}, locate)
        key = keys[name] = parts.key()
        stage_dir = cfg.workdir_path() / name
        cached = (stage_dir / key / RESULT_FILE).is_file()
        last = None if cached else cache.last_finished(stage_dir, RESULT_FILE)
        before = cache.KeyParts.load(last) if last else None
        changes = cache.explain(parts, before) if before else []
        out.append({"stage": name, "key": key, "cached": cached, "out_dir": str(stage_dir / key),
                    "last_run": str(last) if last else None, "changes": changes})
    return out


class Observer:
    """What happens around a stage's execution; every hook is optional."""

    def waiting(self, out_dir: Path) -> None:
        """Another run holds the key's lock."""

    def reused(self, result: StageResult) -> None:
        """The stage's outputs were in the cache."""

    def running(self, out_dir: Path) -> AbstractContextManager:
        """Around the stage's own code; an exception raised there passes through it."""
        return nullcontext()

    def finished(self, result: StageResult) -> None:
        """The stage ran; its result is complete but not yet saved (result.json marks the folder finished)."""

    def saved(self, result: StageResult) -> None:
        """The stage's folder is finished."""


def execute_stage(spec: StageSpec, cfg, wires: Wiring, inputs: dict[str, StageResult], force: bool = False,
                  observer: Observer | None = None) -> tuple[StageResult, bool]:
    """Run (or reuse) one stage; `inputs` maps each of its roles to the result that fills it. Returns the
    result and whether it came from the cache."""
    observer = observer or Observer()
    parts = key_parts(spec, cfg, wires, {role: r.key for role, r in inputs.items()})
    key = parts.key()
    out_dir = cfg.workdir_path() / spec.name / key
    with cache.exclusive(out_dir, lambda: observer.waiting(out_dir)):
        cached = None if force else StageResult.load(out_dir)
        if cached is not None:
            observer.reused(cached)
            return cached, True
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with observer.running(out_dir):
            result = spec.runner().run(spec.section(cfg, wires), out_dir, inputs=inputs, resolve=cfg.resolve)
        result.key = key
        result.lineage = chain_lineage(inputs, spec.name, key)
        observer.finished(result)
        parts.save(out_dir)
        result.save()  # last: result.json marks the folder finished
        observer.saved(result)
        return result, False


def run_offline(cfg, stages: list[str], force: bool = False) -> dict[str, StageResult]:
    """The chosen stages and their upstream, reused from the cache or run, without Prefect or MLflow (for
    benchmarks and tests). Same keys, folders and lock as a flow run, so either reuses the other's outputs."""
    results: dict[str, StageResult] = {}
    wires = wiring(cfg)
    for name in plan(stages, wires):
        inputs = {role: results[s] for role, s in wires.inputs[name].items()}
        results[name], _ = execute_stage(STAGES[name], cfg, wires, inputs, force and name in stages)
    return results
