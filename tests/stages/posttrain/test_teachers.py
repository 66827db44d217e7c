"""Teachers of the distillation stage against real generators: an OpenAI-compatible server (`transformers
serve`, started here, serving a model the micro pipeline exported) and transformers' generation on a local
folder. A generation that stopped half-way resumes without asking the teacher again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from flows.config import load_config
from flows.executor import run_offline
from stages import distill
from stages.distill.config import HFTeacher, OpenAITeacher
from tests.conftest import MICRO, free_port


@pytest.fixture(scope="module")
def student(micro_workdir):
    cfg = load_config(MICRO, [f"workdir={micro_workdir}"])
    return cfg, run_offline(cfg, ["sft"])["sft"]


def _distill(cfg, teacher, out_dir: Path, model):
    section = distill.DistillStageConfig(task=cfg.posttrain.task, distill=cfg.posttrain.distill.model_copy(
        update={"teacher": teacher, "problems": 3, "samples_per_problem": 2, "max_tokens": 24}))
    return distill.run(section, out_dir, {"model": model})


def test_the_openai_teacher_distills_from_a_real_local_server(student, tmp_path):
    cfg, model = student
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--device", "cpu", model.outputs["hf"]],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(1)
        teacher = OpenAITeacher(base_url=f"http://127.0.0.1:{port}/v1", model=model.outputs["hf"], concurrency=2,
                                timeout_s=120, retries=1)
        result = _distill(cfg, teacher, tmp_path / "openai", model)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    samples = pd.read_parquet(result.outputs["samples"])
    assert len(samples) == 6 and set(samples["finish_reason"]) <= {"stop", "length"}
    # the server's text arrives (its sampling is unseeded: a reply may also be empty, an EOS first, and is then
    # recorded with its rejection reason like any other)
    assert samples["response"].str.len().gt(0).sum() >= 4 and samples["reason"].notna().all()
    assert (samples.loc[samples["response"] == "", "reason"] != "accepted").all()
    # the server is gone: a rerun in the same folder finds every sample generated and asks nobody
    again = _distill(cfg, teacher, tmp_path / "openai", model)
    assert pd.read_parquet(again.outputs["samples"])["response"].tolist() == samples["response"].tolist()


def test_the_hf_teacher_samples_with_transformers(student, tmp_path):
    cfg, model = student
    result = _distill(cfg, HFTeacher(path=model.outputs["hf"], batch_size=4), tmp_path / "hf", model)
    samples = pd.read_parquet(result.outputs["samples"])
    assert len(samples) == 6 and samples["tokens"].le(24).all()
    assert result.metrics["samples"] == 6


@pytest.mark.parametrize("layout", ["aligned", "columns"])
def test_the_oracle_writes_the_tasks_layout_and_its_mistakes(layout):
    """Right traces verify; a slip caught by R1's "wait" still answers right, an uncaught one answers wrongly; a
    format mistake or rambling is what rejection sampling must catch."""
    import random

    from stages.distill.config import OracleTeacher
    from stages.distill.teachers import Oracle
    from v3flow.tasks import build
    from v3flow.tasks.arithmetic import ArithmeticSettings

    task = build(ArithmeticSettings(layout=layout, max_digits=3, train_size=300, test_size=10))
    seen = set()
    for teacher, expect in ((OracleTeacher(error_rate=0.0), {"correct"}),
                            (OracleTeacher(error_rate=1.0, self_correct=1.0), {"caught", "format", "ramble"}),
                            (OracleTeacher(error_rate=1.0, self_correct=0.0), {"wrong", "format", "ramble"})):
        oracle = Oracle(teacher, task, 10_000, str.split, " ".join)
        kinds = set()
        for i, p in enumerate(task.problems("train")[:60]):
            text = oracle.respond(p, random.Random(i))
            verdict = task.judge(text, p.answer)
            if not verdict.format_ok:
                kinds.add("format")
            elif text.count("\n") > 20:
                kinds.add("ramble")
            elif "wait, " in text:
                assert verdict.correct
                kinds.add("caught")
            else:
                kinds.add("correct" if verdict.correct else "wrong")
        assert kinds == expect, (teacher, kinds)
        seen |= kinds
    assert seen == {"correct", "caught", "wrong", "format", "ramble"}
