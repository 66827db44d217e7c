"""Task modules: the synthetic arithmetic task (deterministic, held-out split disjoint and longer, scratchpads
that compute the right result) and GSM8K read from the shipped files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT
from v3flow.errors import DataError
from v3flow.tasks import build
from v3flow.tasks.arithmetic import Arithmetic, ArithmeticSettings, scratchpad, solve, spell
from v3flow.tasks.gsm8k import Gsm8kSettings
from v3flow.tasks.reasoning import respond

SETTINGS = ArithmeticSettings(min_digits=1, max_digits=3, test_extra_digits=1, train_size=3000, test_size=300, seed=7)


def test_arithmetic_is_deterministic_and_its_held_out_split_is_disjoint_and_longer():
    a, b = build(SETTINGS), build(SETTINGS)
    assert a.problems("train") == b.problems("train") and a.problems("test") == b.problems("test")
    assert build(SETTINGS.model_copy(update={"seed": 8})).problems("test") != a.problems("test")
    train = {p.question for p in a.problems("train")}
    assert not train & {p.question for p in a.problems("test")}
    assert max(len(str(Arithmetic.operands(p)[0])) for p in a.problems("train")) == 3
    assert {p.group for p in a.problems("test")} == {"1 digits", "2 digits", "3 digits", "4 digits"}
    # a bigger train split does not change the held-out problems
    more = build(SETTINGS.model_copy(update={"train_size": 4000}))
    assert more.problems("test") == a.problems("test")


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(["+", "-"]))
def test_the_scratchpad_computes_the_result(x, y, op):
    a, b = (max(x, y), min(x, y)) if op == "-" else (x, y)
    lines, result = solve(a, op, b)
    assert result == (a + b if op == "+" else a - b)
    assert len(lines) == max(len(str(a)), len(str(b)))
    check = scratchpad(a, op, b).splitlines()[-1]
    assert check.endswith(f"= {spell(a)}")  # the inverse operation gives back the first operand


def test_every_digit_is_its_own_token(tiny_tokenizer):
    task = build(SETTINGS)
    p = task.problems("train")[0]
    a, op, b = Arithmetic.operands(p)
    text = respond(scratchpad(a, op, b), p.answer)
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert all(len(piece.strip()) <= 1 for piece in pieces if any(c.isdigit() for c in piece))


def test_gsm8k_reads_the_shipped_files_and_names_a_bad_record(tmp_path):
    task = build(Gsm8kSettings(train_size=5), ROOT.joinpath)
    p = task.problems("train")[0]
    assert p.answer == "72" and p.solution.endswith("\\boxed{72}") and "<<" not in p.solution
    assert len(task.problems("train")) == 5 and len(task.problems("test")) == 1319
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "no marker"}\n')
    with pytest.raises(DataError, match="record 2 has no question, or no '#### <answer>' line"):
        build(Gsm8kSettings(train=str(bad))).problems("train")
    with pytest.raises(DataError, match="posttrain.task.train=.*missing.jsonl: no such file"):
        build(Gsm8kSettings(train=str(tmp_path / "missing.jsonl"))).problems("train")


def test_too_many_problems_for_the_digits_is_a_config_error():
    with pytest.raises(ValueError, match="train_size=500: too many distinct problems"):
        build(ArithmeticSettings(min_digits=1, max_digits=1, train_size=500)).problems("train")
    # room in principle, but the held-out split (drawn first) took most of the 1-digit problems
    with pytest.raises(ValueError, match="train_size=90: only .* left outside the 500 held-out ones"):
        build(ArithmeticSettings(min_digits=1, max_digits=1, test_extra_digits=1, train_size=90,
                                 test_size=500)).problems("train")
