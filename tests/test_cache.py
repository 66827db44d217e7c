"""Stage keys cover config, upstream, inputs, code and libraries; a miss is explained; results are portable;
one writer per key."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from flows.config import load_config
from flows.executor import dry_run
from flows.recipe import STAGES, wiring
from tests.conftest import ROOT
from v3flow import cache
from v3flow.stage import StageResult


def scratch_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    for name in ("v3flow", "stages", "flows", "configs", "data/datasets", "data/mixtures"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def keys(copy: Path) -> dict[str, str]:
    cfg = load_config(copy / "configs" / "micro.yaml", [f"workdir={copy / 'work'}"])
    return {r["stage"]: r["key"] for r in dry_run(list(STAGES), wiring(cfg), cfg, cache.in_checkout(copy))}


def touch(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")


def test_code_edits_change_their_stage_and_downstream_keys_and_docs_do_not(tmp_path):
    copy = scratch_copy(tmp_path)
    base = keys(copy)
    assert base == keys(copy)  # stable
    for unrelated in ("README.md", "v3flow/model/MODEL.md", "tests/test_cache.py", "v3flow/tracking.py",
                      "v3flow/servers.py", "flows/serve.py", "stages/data/__main__.py"):
        touch(copy / unrelated)
    assert keys(copy) == base

    touch(copy / "v3flow/model/moe.py")  # the model: pretraining and what follows it
    after_moe = keys(copy)
    assert after_moe["data"] == base["data"] and after_moe["pretrain"] != base["pretrain"]

    touch(copy / "v3flow/training/optim.py")  # shared training code, imported by the trainer
    after_optim = keys(copy)
    assert after_optim["pretrain"] != after_moe["pretrain"]

    touch(copy / "stages/data/quality.py")  # the data stage: it and everything downstream
    after_data = keys(copy)
    assert after_data["data"] != after_optim["data"] and after_data["pretrain"] != after_optim["pretrain"]


def test_the_checkout_and_the_installed_package_hash_the_same_code():
    for spec in STAGES.values():
        assert cache.code_hashes(spec.module) == cache.code_hashes(spec.module, cache.in_checkout(ROOT))
    pretrain = cache.code_hashes("stages.pretrain")
    assert {"v3flow.model.moe", "v3flow.model.fp8", "v3flow.training.checkpoint"} <= pretrain.keys()
    assert not any(m.startswith(("v3flow.tracking", "v3flow.servers")) for m in pretrain)
    assert not any(m.startswith("stages.pretrain") for m in cache.code_hashes("stages.data"))


def test_a_miss_is_explained():
    before = cache.KeyParts("data", {"minhash": {"bands": 14}}, {"up": "a"}, "f1", {"m.x": "1", "m.y": "2"},
                            {"torch": "2.13.0"})
    now = cache.KeyParts("data", {"minhash": {"bands": 10}}, {"up": "b"}, "f2", {"m.x": "1", "m.z": "3"},
                         {"torch": "2.14.0"})
    assert cache.explain(now, before) == [
        "config minhash.bands: 14 -> 10", "code m.y: removed", "code m.z: added", "library torch: 2.13.0 -> 2.14.0",
        "upstream up: a -> b", "input files changed (names, sizes or modification times)"]
    assert now.key() != before.key() and cache.explain(before, before) == []


def test_result_paths_survive_moving_the_workdir(tmp_path):
    stage_dir = tmp_path / "a" / "data" / "k"
    (stage_dir / "packed").mkdir(parents=True)
    StageResult("data", "k", str(stage_dir), outputs={"packed": str(stage_dir / "packed")},
                artifacts=[str(stage_dir / "packed")]).save()
    assert '"packed": "packed"' in (stage_dir / "result.json").read_text()
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = StageResult.load(tmp_path / "b" / "data" / "k")
    assert moved.out_dir == str((tmp_path / "b" / "data" / "k").resolve())
    assert Path(moved.outputs["packed"]).is_dir() and Path(moved.artifacts[0]).is_dir()


def test_one_writer_per_key(tmp_path):
    out = tmp_path / "stage" / "key"
    events, waited = [], []

    def writer(name: str) -> None:
        with cache.exclusive(out, lambda: waited.append(name)):
            events.append(f"{name} in")
            time.sleep(0.3)
            events.append(f"{name} out")

    threads = [threading.Thread(target=writer, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert events == ["a in", "a out", "b in", "b out"] and waited == ["b"]
