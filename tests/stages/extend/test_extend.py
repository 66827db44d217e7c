"""Context extension stages: YaRN switched on explicitly, configs and input models checked before training, a
phase killed with SIGKILL resumed bit for bit, and the context-cut baseline of the long-context evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from flows.config import load_config
from flows.executor import run_offline
from flows.recipe import STAGES, wiring
from stages import extend
from stages.long_eval import windowed_losses
from tests.conftest import MICRO
from tests.stages.pretrain.conftest import losses
from tests.training import faults
from v3flow.errors import ConfigError
from v3flow.evaluation import long_context as lc
from v3flow.model.rope import inv_frequencies, rope_tables
from v3flow.model.transformer import Transformer
from v3flow.training.loop import CALLBACKS_ENV
from v3flow.training.train import TrainingError


@pytest.fixture(scope="module")
def chain(micro_workdir):
    """The micro pipeline up to the first extension phase (data, pack, pretrain, pack_phase1, extend_phase1)."""
    cfg = load_config(MICRO, [f"workdir={micro_workdir}"])
    return cfg, run_offline(cfg, ["extend_phase1"])


def test_the_pretraining_length_is_yarns_original_length():
    with pytest.raises(ConfigError, match="extension.yarn.original_seq_len=64 must equal the pretraining length "
                                          "data.packing.seq_len=128"):
        load_config(MICRO, ["extension.yarn.original_seq_len=64"])
    with pytest.raises(ConfigError, match="YaRN would not cover the target length"):
        load_config(MICRO, ["extension.yarn.factor=2"])
    with pytest.raises(ConfigError, match=r"phase1.seq_len \(1024\) < phase2.seq_len \(512\)"):
        load_config(MICRO, ["extension.phase1.seq_len=1024"])
    with pytest.raises(ConfigError, match="extension.phase2.batch_sequences must be a multiple"):
        load_config(MICRO, ["extension.micro_batch=2", "extension.phase2.batch_sequences=3"])


def test_yarn_is_switched_on_by_the_phase_not_by_the_length():
    """Even a phase at the pretraining length trains with YaRN: frequencies ramped, softmax scale x mscale^2
    (DeepSeek's code turns it on only when max_seq_len > original_seq_len, a known way to lose it)."""
    cfg = load_config(MICRO)
    ext = cfg.extension.model_copy(update={"phase1": cfg.extension.phase1.model_copy(update={"seq_len": 128})})
    phase = extend.phase_section(cfg.model, cfg.pretrain, ext.model_copy(), "phase1").model
    assert phase.yarn == cfg.extension.yarn and phase.max_seq_len == 128 == cfg.model.max_seq_len
    plain, yarn = inv_frequencies(cfg.model), inv_frequencies(phase)
    assert torch.equal(yarn[:1], plain[:1]) and torch.allclose(yarn[-1:], plain[-1:] / 8)  # fast kept, slow / s
    assert not torch.equal(rope_tables(cfg.model, 128)[0], rope_tables(phase, 128)[0])
    m = 0.1 * torch.log(torch.tensor(8.0)).item() + 1
    assert Transformer(phase).layers[0].attn.scale == pytest.approx(Transformer(cfg.model).layers[0].attn.scale * m**2)


def test_phases_are_cached_on_their_own():
    """Phase 2's settings are not in phase 1's key (changing phase 2 does not retrain phase 1)."""
    a, b = load_config(MICRO), load_config(MICRO, ["extension.phase2.steps=9"])
    def section(stage, cfg):
        return STAGES[stage].section(cfg, wiring(cfg)).hashable()

    assert section("extend_phase1", a) == section("extend_phase1", b)
    assert section("extend_phase2", a) != section("extend_phase2", b)


def test_an_input_model_that_does_not_fit_the_phase_is_refused(chain):
    cfg, results = chain
    phase1 = extend.phase_section(cfg.model, cfg.pretrain, cfg.extension, "phase1").model
    base = results["pretrain"].outputs["model"]
    wrong = phase1.model_copy(update={"yarn": phase1.yarn.model_copy(update={"original_seq_len": 64})})
    with pytest.raises(ConfigError, match="original_seq_len=64, but the input model .* was trained at 128 tokens"):
        extend.check_input(base, wrong)
    other = phase1.model_copy(update={"yarn": phase1.yarn.model_copy(update={"factor": 16.0})})
    with pytest.raises(ConfigError, match="factor: 8.0 there, 16.0 here"):
        extend.check_input(results["extend_phase1"].outputs["model"], other)
    extend.check_input(base, phase1)
    extend.check_input(results["extend_phase1"].outputs["model"], phase1)


def test_a_killed_phase_resumes_bit_for_bit(chain, tmp_path, monkeypatch):
    cfg, results = chain
    inputs = {"model": results["pretrain"], "data": results["pack_phase1"]}
    section = extend.phase_section(cfg.model, cfg.pretrain, cfg.extension, "phase1")
    straight = results["extend_phase1"]
    killed = tmp_path / "killed"
    monkeypatch.setenv(*faults.env(kill_at=3).popitem())  # after the step-2 checkpoint
    with pytest.raises(TrainingError, match="status -9"):
        extend.run(section, killed, inputs)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000002"]
    monkeypatch.delenv(CALLBACKS_ENV)
    resumed = extend.run(section, killed, inputs)
    a, b = losses(tmp_path.parent / straight.out_dir), losses(killed)
    assert a.keys() == b.keys() and len(a) == 4
    assert all(a[s]["loss"] == b[s]["loss"] and a[s].get("grad_norm") == b[s].get("grad_norm") for s in a)
    final = json.loads((killed / "final.json").read_text())
    assert final["steps"] == 4 and final["tokens"] == 4 * 2 * 256
    manifest = json.loads((killed / "model.json").read_text())
    assert manifest["stage"] == "extend_phase1" and manifest["phase"] == "phase1"
    assert resumed.metrics["seq_len"] == 256 and "maxvio_layer_0" in final


def test_context_cut_baseline():
    """A window as long as the document is the full-context pass; a short one equals scoring each token from
    the start of its window."""
    cfg = load_config(MICRO)
    torch.manual_seed(0)
    model = Transformer(cfg.model.model_copy(update={"max_seq_len": 512})).eval()
    model.init_weights()
    docs = [torch.randint(3, cfg.model.vocab_size, (300,)) for _ in range(2)]
    edges = [0, 64, 128, 256]
    full = lc.position_losses(model, docs, edges)
    assert windowed_losses(model, docs, edges, 256) == pytest.approx({b: v["loss"] for b, v in full.items()})
    cut = windowed_losses(model, docs, edges, 64)  # windows [0, 64), [32, 96), ...: token p > 63 from 32*(p//32 - 1)
    with torch.no_grad():
        direct = [torch.nn.functional.cross_entropy(model(d[32 * (p // 32 - 1): p + 1][None])[0, -1:], d[p + 1: p + 2])
                  for d in docs for p in range(128, 256)]
    assert cut["128-256"] == pytest.approx(float(torch.stack(direct).mean()), rel=1e-5)


def test_the_phase_export_gives_transformers_our_logits_past_the_original_length(chain):
    """The extension stage's Hugging Face folder (rope_scaling: yarn) in transformers, on 256 tokens where
    pretraining saw 128."""
    import transformers

    from v3flow.training import artifact

    _, results = chain
    out = results["extend_phase1"].outputs
    ours = artifact.load_model(out["model"]).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out["hf"], dtype=torch.float32).eval()
    assert theirs.config.rope_scaling["rope_type"] == "yarn"
    tokens = torch.randint(3, ours.cfg.vocab_size, (1, 256))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4


def test_a_phase_batch_the_processes_cannot_share_is_refused(chain, tmp_path):
    """The trainer rounds a batch to whole micro-batches per process; a phase's batch is the recipe's, so it
    must divide exactly (the 671B config's 480 sequences on 2048 data-parallel ranks would not)."""
    cfg, results = chain
    section = extend.phase_section(cfg.model, cfg.pretrain.model_copy(update={"num_processes": 4}), cfg.extension,
                                   "phase1")
    with pytest.raises(ConfigError, match=r"batch_sequences=2 is not a multiple of .* = 1 x 4"):
        extend.run(section, tmp_path, {"model": results["pretrain"], "data": results["pack_phase1"]})
    assert not (tmp_path / "run.json").exists()  # refused before anything was written
