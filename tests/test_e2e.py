"""End to end: the CLI runs the data flow through a real Prefect server, into a real MLflow server.

Checks the MLflow parent/child runs, params, metrics and artifacts, the Prefect flow run and its
artifacts, the cross-run cache, a rerun on a changed config, and a run started from a deployment the
way the Prefect UI starts one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import MICRO, ROOT

pytestmark = pytest.mark.e2e


def v3flow(env, *args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "v3flow.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_json(env, *args) -> dict:
    return parse(v3flow(env, "run", str(MICRO), "--json", *args).stdout)


def parse(out: str) -> dict:
    return json.loads(out[out.index("\n{") if not out.startswith("{") else 0:])


@pytest.fixture(scope="module")
def first_run(servers, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    return workdir, run_json(servers, "--set", f"workdir={workdir}")


def api(env) -> httpx.Client:
    return httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)


def test_mlflow_has_parent_and_child_runs(servers, first_run):
    _, result = first_run
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    child = client.get_run(result["data"]["mlflow_run_id"])
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.tags["v3flow.config"] == "micro" and parent.data.tags["prefect.flow_run_id"]
    assert len(parent.data.tags["git.commit"]) in (40, 7) or parent.data.tags["git.commit"] == "unknown"
    assert parent.data.params["data.minhash.bands"] == "14"
    assert child.data.params["minhash.bands"] == "14" and child.data.params["tokenizer_sha256"]
    m = child.data.metrics
    assert m["docs_read"] > 0 and m["near_duplicates_removed"] > 0 and m["tokens"] > 10_000
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "data")}
    assert {"data/tokens.json", "data/tokenizer.json", "data/clusters.json"} <= artifacts
    pack = client.get_run(result["pack"]["mlflow_run_id"])
    assert 0.99 < pack.data.metrics["packing_efficiency"] <= 1
    assert pack.data.params["input.corpus"] == f"data:{result['data']['key']}"
    assert "pack/manifest.json" in {a.path for a in client.list_artifacts(pack.info.run_id, "pack")}


def test_pretrain_stage_trains_logs_and_exports(servers, first_run):
    _, result = first_run
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["pretrain"]["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == client.get_run(result["data"]["mlflow_run_id"]).data.tags[
        "mlflow.parentRunId"]
    assert run.data.params["lineage.data_key"] == result["pack"]["key"]
    model = json.loads((Path(result["pretrain"]["out_dir"]) / "model.json").read_text())
    assert model["lineage"] == {s: result[s]["key"] for s in ("data", "pack", "pretrain")}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) >= 3 and history[-1].value < history[0].value
    for name in ("lr", "grad_norm", "tokens_per_s", "mfu", "maxvio_layer_0", "val_loss"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "pretrain/hf")}
    assert {"pretrain/hf/config.json", "pretrain/hf/tokenizer.json", "pretrain/hf/generation_config.json"} <= artifacts
    assert any(a.path.startswith("expert_loads") for a in client.list_artifacts(run.info.run_id))


def test_extension_phases_chain_from_pretraining_and_are_evaluated(servers, first_run):
    """data -> pretrain -> phase 1 -> phase 2, each phase packed at its length from the same corpus, then the
    four-arm long-context evaluation, all in MLflow (metrics, tables, figures)."""
    _, result = first_run
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    chain = [json.loads((Path(result[s]["out_dir"]) / "model.json").read_text()) for s in
             ("extend_phase1", "extend_phase2")]
    assert chain[0]["init_from"] == result["pretrain"]["out_dir"]
    assert chain[1]["init_from"] == result["extend_phase1"]["out_dir"]
    assert [m["model"]["max_seq_len"] for m in chain] == [256, 512] and all(m["model"]["yarn"] for m in chain)
    assert chain[1]["lineage"]["pack_phase2"] == result["pack_phase2"]["key"]
    hf = json.loads((Path(result["extend_phase2"]["out_dir"]) / "hf" / "config.json").read_text())
    rope = hf.get("rope_scaling") or hf["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 8 and rope["original_max_position_embeddings"] == 128
    phase = client.get_run(result["extend_phase2"]["mlflow_run_id"])
    for name in ("loss", "tokens_per_s", "maxvio_layer_0", "val_loss", "peak_memory_gb"):
        assert client.get_metric_history(phase.info.run_id, name), name
    run = client.get_run(result["long_eval"]["mlflow_run_id"])
    m = run.data.metrics
    assert {f"{arm}.short_val_loss" for arm in ("base", "base_yarn", "phase1", "phase2")} <= set(m)
    assert m["base.loss.0-128"] > 0 and m["passkey_prompts"] == 3
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "long_eval")}
    assert {"long_eval/positions.json", "long_eval/passkey.json", "long_eval/passkey_prompts.jsonl",
            "long_eval/loss_by_position.png", "long_eval/passkey_rank_phase2.png"} <= paths
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "long_eval/positions.json")).read_text())
    assert set(table["columns"]) >= {"arm", "bucket", "loss", "loss_context_cut", "context_gain"}


def test_post_training_chains_after_extension_and_is_in_mlflow(servers, first_run):
    """distill -> SFT -> GRPO from the extended model, then the held-out evaluation of every arm: the distilled
    data as an MLflow dataset input with its digest, GRPO's curves, the accuracy and per-sample tables."""
    _, result = first_run
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    distill = client.get_run(result["distill"]["mlflow_run_id"])
    inputs = {d.dataset.name: d.dataset for d in distill.inputs.dataset_inputs}
    assert {"distilled-sft", "teacher-samples"} <= set(inputs) and inputs["distilled-sft"].digest
    assert 0 < distill.data.metrics["acceptance_rate"] < 1
    sft = client.get_run(result["sft"]["mlflow_run_id"])
    assert "distilled-sft" in {d.dataset.name for d in sft.inputs.dataset_inputs}
    assert len(client.get_metric_history(sft.info.run_id, "loss")) >= 2
    grpo = client.get_run(result["grpo"]["mlflow_run_id"])
    for name in ("reward", "rewards/accuracy_reward/mean", "completions/mean_length", "completions/clipped_ratio",
                 "frac_reward_zero_std", "kl"):
        assert client.get_metric_history(grpo.info.run_id, name), name
    chain = json.loads((Path(result["grpo"]["out_dir"]) / "model.json").read_text())
    assert chain["init_from"] == result["sft"]["out_dir"] and chain["lineage"]["extend_phase2"]
    evaluation = client.get_run(result["task_eval"]["mlflow_run_id"])
    assert {"base.accuracy", "sft.accuracy", "grpo.accuracy", "grpo.pass_at_2"} <= set(evaluation.data.metrics)
    samples = json.loads(Path(client.download_artifacts(evaluation.info.run_id, "samples.json")).read_text())
    assert set(samples["columns"]) >= {"arm", "question", "response", "correct", "samples_correct"}


def test_prefect_flow_run_and_artifacts(servers, first_run):
    _, result = first_run
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    child = client.get_run(result["data"]["mlflow_run_id"])
    flow_run_id = client.get_run(child.data.tags["mlflow.parentRunId"]).data.tags["prefect.flow_run_id"]
    with api(servers) as c:
        assert c.get(f"/flow_runs/{flow_run_id}").json()["state"]["type"] == "COMPLETED"
        arts = c.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    by_key = {a["key"]: a for a in arts}
    assert "near duplicates removed" in by_key["data-report"]["data"]
    assert by_key["data-mlflow"]["type"] == "markdown" or "http" in by_key["data-mlflow"]["data"]


def test_unchanged_rerun_is_served_from_cache(servers, first_run):
    workdir, first = first_run
    started = time.monotonic()
    again = run_json(servers, "--set", f"workdir={workdir}")
    assert again["data"]["cached"] and again["data"]["key"] == first["data"]["key"]
    assert all(again[s]["cached"] and again[s]["key"] == first[s]["key"] for s in first)
    assert again["data"]["metrics"] == first["data"]["metrics"]
    assert time.monotonic() - started < 120  # generous: the point is that nothing was recomputed
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    cached_child = client.get_run(again["data"]["mlflow_run_id"] or first["data"]["mlflow_run_id"])
    assert cached_child.info.status == "FINISHED"


def test_changed_config_reruns_and_force_reruns(servers, first_run):
    workdir, first = first_run
    changed = run_json(servers, "--set", f"workdir={workdir}", "--set", "data.packing.fim_rate=0.2", "--stages",
                       "pretrain")
    assert changed["data"]["cached"] and changed["data"]["key"] == first["data"]["key"]  # not its section
    assert not changed["pack"]["cached"] and changed["pack"]["key"] != first["pack"]["key"]
    assert not changed["pretrain"]["cached"] and changed["pretrain"]["key"] != first["pretrain"]["key"]  # new data
    forced = run_json(servers, "--set", f"workdir={workdir}", "--force", "data")
    assert not forced["data"]["cached"] and forced["data"]["key"] == first["data"]["key"]
    assert forced["pack"]["cached"] and forced["pretrain"]["cached"]  # identical data: same keys, reused
    assert forced["data"]["metrics"]["tokens"] == first["data"]["metrics"]["tokens"]


def test_two_concurrent_runs_of_one_config_write_one_set_of_outputs(servers, tmp_path):
    """The second run waits on the stage key's lock, then reuses what the first wrote."""
    cmd = [sys.executable, "-m", "v3flow.cli", "run", str(MICRO), "--json", "--stages", "data",
           "--set", f"workdir={tmp_path}"]
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(cmd, env=servers, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(2)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    results = [parse(out)["data"] for out, _ in outs]
    assert results[0]["key"] == results[1]["key"] and sorted(r["cached"] for r in results) == [False, True]
    assert len(list(tmp_path.glob("data/*/result.json"))) == 1 and len(list(tmp_path.glob("data/*/"))) == 1


def test_bad_config_fails_before_any_run(servers):
    proc = subprocess.run([sys.executable, "-m", "v3flow.cli", "run", str(MICRO), "--set", "data.minhash.rowz=3"],
                          env=servers, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "data.minhash.rowz: unknown key" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "v3flow.cli", "run", str(MICRO), "--stages", "pretrian"],
                          env=servers, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "unknown stage(s) ['pretrian']" in proc.stderr


def test_deployment_run_from_the_api(servers, tmp_path):
    """What the UI's 'Run' button does: create a flow run of a served deployment and watch it finish."""
    serve = subprocess.Popen([sys.executable, "-m", "v3flow.cli", "serve"], env=servers, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with api(servers) as c:
            deployment = _wait_for(lambda: _deployment(c, "data", "v3flow"), 180)
            schedules = deployment["schedules"]
            assert [s["active"] for s in schedules] == [False]  # the nightly refresh ships paused
            params = {"request": {"config": str(MICRO), "overrides": [f"workdir={tmp_path}"], "force": False}}
            body = {"parameters": params, "idempotency_key": uuid.uuid4().hex}  # a retried POST runs once
            run = _wait_for(lambda: _ok(c.post(f"/deployments/{deployment['id']}/create_flow_run", json=body)), 30)
            state = _wait_for(lambda: _final_state(c, run["id"]), 420)
        assert state == "COMPLETED"
        assert list(tmp_path.glob("data/*/result.json"))
    finally:
        import os
        import signal

        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def test_an_active_schedule_creates_runs(servers):
    """Prefect's scheduler service turns an active schedule into scheduled flow runs (the UI's Upcoming tab).
    With SQLAlchemy 2.1 it failed every loop ("Can't evaluate bulk DML statement", visible only in the
    server log) and no scheduled run ever started; pyproject pins SQLAlchemy below 2.1."""
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()  # nothing runs during the test
    with api(servers) as c:
        flow_id = _ok(c.post("/flows/", json={"name": f"schedule-check-{uuid.uuid4().hex[:8]}"}))["id"]
        schedule = {"schedule": {"interval": 86400, "anchor_date": tomorrow, "timezone": "UTC"}, "active": True}
        deployment = _ok(c.post("/deployments/", json={"name": "nightly", "flow_id": flow_id,
                                                       "schedules": [schedule]}))
        query = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
        runs = _wait_for(lambda: _ok(c.post("/flow_runs/filter", json=query)), 90)
        c.delete(f"/deployments/{deployment['id']}")
    assert runs[0]["state"]["type"] == "SCHEDULED" and runs[0]["auto_scheduled"]


def _ok(r: httpx.Response) -> dict | None:
    """The JSON of a success; None (ask again) on a server error. Prefect 3.8's SQLite backend has known lock
    contention with a served runner's polling (PrefectHQ/prefect#23051), and creating this flow run failed
    once in a full-suite run with a response that had no id. Any other failure is the test's."""
    if r.status_code >= 500:
        return None
    assert r.is_success, (r.status_code, r.text)
    return r.json()


def _deployment(c: httpx.Client, flow: str, name: str) -> dict | None:
    r = c.get(f"/deployments/name/{flow}/{name}")
    return None if r.status_code == 404 else _ok(r)


def _final_state(c: httpx.Client, flow_run_id: str) -> str | None:
    run = _ok(c.get(f"/flow_runs/{flow_run_id}"))
    state = run and run["state"]["type"]
    return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def _wait_for(fn, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"gave up after {timeout_s}s")
