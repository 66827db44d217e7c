"""Config validation: every bad config is rejected before work starts, with file, line and key."""

from __future__ import annotations

import textwrap

import pytest

from flows.config import load_config
from tests.conftest import MICRO, TINY
from v3flow.cli import main
from v3flow.errors import ConfigError
from v3flow.section import section_hash


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


BASE = f"base: {TINY}\nname: t\n"


def test_shipped_configs_validate():
    for path in (MICRO, TINY, TINY.with_name("tiny-reasoning.yaml")):
        cfg = load_config(path)
        assert cfg.data.sources[0].kind == "stdlib"
    assert load_config(MICRO).data.packing.seq_len < load_config(TINY).data.packing.seq_len


def test_more_training_problems_than_the_digits_allow_is_refused_before_any_work():
    """It once surfaced only when the data stage drew the problems, after the run had started (tiny's corpus asked
    for 10,000 of the 6,985 that can be drawn)."""
    with pytest.raises(ConfigError, match=r"posttrain.task.train_size=9000: too many distinct problems .* 6,985"):
        load_config(TINY, ["posttrain.task.train_size=9000"])


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, BASE + "data:\n  minhash:\n    bandz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.minhash.bandz: unknown key" in str(err.value)
    assert "line 5" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_value(tmp_path):
    path = write(tmp_path, BASE + "data:\n  packing:\n    seq_len: long\n")
    with pytest.raises(ConfigError, match=r"data.packing.seq_len: .*integer.*got 'long'.*line 5"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("data.filters.min_chars=2000000", "min_chars=2000000 must be below max_chars"),
    ("data.executor.kind=slurm", "needs slurm.partition"),
    ("data.tokenizer.vocab_size=300", "vocab_size=300 leaves no room for merges"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.minhash.bands=0", "data.minhash.bands"),
    ("data.sources.0.kind=jsonl", "needs a `path`"),
    ("pretrain.launcher=accelerate", "needs pretrain.accelerate_config"),
    ("pretrain.precision=fp4", r"pretrain.precision: .*'fp8', 'bf16' or 'fp32'"),
])
def test_impossible_combinations(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_missing_accelerate_config_file_is_named():
    with pytest.raises(ConfigError, match=r"pretrain.accelerate_config='configs/accelerate/nope.yaml': no such file"):
        load_config(TINY, ["pretrain.launcher=accelerate", "pretrain.accelerate_config=configs/accelerate/nope.yaml"])
    cfg = load_config(TINY, ["pretrain.launcher=accelerate", "pretrain.accelerate_config=configs/accelerate/ddp.yaml"])
    assert cfg.resolve(cfg.pretrain.accelerate_config).is_file()


def test_overrides_parse_yaml_values_and_index_lists():
    cfg = load_config(TINY, ["data.minhash.bands=20", "data.packing.fim_rate=0.25",
                             "data.sources.0.include=[json/*]", "data.exact_dedup=false"])
    assert cfg.data.minhash.bands == 20 and cfg.data.packing.fim_rate == 0.25
    assert cfg.data.sources[0].include == ["json/*"] and cfg.data.exact_dedup is False
    with pytest.raises(ConfigError, match="not an index"):
        load_config(TINY, ["data.sources.5.name=x"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(TINY, ["data.minhash.bands"])


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "name: t\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_base_cycle_and_unknown_dataset(tmp_path):
    write(tmp_path, "base: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="dataset='nope'"):
        load_config(TINY, ["data.sources.0.dataset=nope"])


def test_section_hash_is_stable_and_ignores_where_it_runs():
    a, b = load_config(TINY), load_config(TINY)
    assert section_hash(a.data) == section_hash(b.data)
    moved = load_config(TINY, ["data.executor.workers=16", "data.executor.kind=slurm",
                               "data.executor.slurm.partition=cpu"])
    assert section_hash(moved.data) == section_hash(a.data)
    assert section_hash(load_config(TINY, ["data.minhash.bands=20"]).data) != section_hash(a.data)
    assert section_hash(load_config(TINY, ["data.executor.tasks=4"]).data) != section_hash(a.data)


def test_cli_validate_exit_codes(capsys):
    assert main(["validate", str(TINY)]) == 0
    assert main(["validate", str(TINY), "--set", "data.minhash.threshold=0.8"]) == 2
    assert "data.minhash.threshold: unknown key" in capsys.readouterr().err


def test_task_documents_shorter_than_the_filter_are_refused():
    """One worked problem a document is ~32-45 characters: the quality filter would quarantine every one."""
    with pytest.raises(ConfigError, match=r"data.sources.1 \(arithmetic\): a document of per_document=1 .* "
                                          r"below data.filters.min_chars=200"):
        load_config(TINY, ["data.sources.1.per_document=1"])
    load_config(TINY, ["data.sources.1.per_document=1", "data.filters.min_chars=30"])
