"""Task modules: the synthetic arithmetic task (deterministic, held-out split disjoint, per difficulty and
longer, scratchpads that compute the right result in both layouts, few-shot judging in the task's own form) and
GSM8K read from the shipped files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT
from v3flow.errors import DataError
from v3flow.tasks import build
from v3flow.tasks.arithmetic import LAYOUTS, ArithmeticSettings, carries, solve
from v3flow.tasks.gsm8k import Gsm8kSettings
from v3flow.tasks.reasoning import respond

SETTINGS = ArithmeticSettings(min_digits=1, max_digits=3, test_extra_digits=1, train_size=3000, test_size=300, seed=7)


@pytest.mark.parametrize("layout", ["aligned", "columns"])
def test_arithmetic_is_deterministic_and_its_held_out_split_is_disjoint_per_difficulty_and_longer(layout):
    settings = SETTINGS.model_copy(update={"layout": layout})
    a, b = build(settings), build(settings)
    assert a.problems("train") == b.problems("train") and a.problems("test") == b.problems("test")
    assert build(settings.model_copy(update={"seed": 8})).problems("test") != a.problems("test")
    train = {p.question for p in a.problems("train")}
    assert not train & {p.question for p in a.problems("test")}
    assert max(p.level for p in a.problems("train")) == 3
    per_level = {d: sum(p.level == d for p in a.problems("test")) for d in (1, 2, 3, 4)}
    assert per_level == {1: 30, 2: 300, 3: 300, 4: 300}  # test_size each; 1-digit: a fifth of the 150 that exist
    assert [a.trained(p) for p in a.problems("test")] == [p.level <= 3 for p in a.problems("test")]
    for p in a.problems("test"):
        x, op, y = a.operands(p)
        assert p.group == f"{len(str(max(x, y)))} digits" and p.detail == f"{carries(x, op, y)} carries"
    # a bigger train split does not change the held-out problems
    more = build(settings.model_copy(update={"train_size": 4000}))
    assert more.problems("test") == a.problems("test")


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(["+", "-"]))
def test_the_columns_compute_the_result(x, y, op):
    a, b = (max(x, y), min(x, y)) if op == "-" else (x, y)
    columns, result = solve(a, op, b)
    assert result == (a + b if op == "+" else a - b)
    assert len(columns) == max(len(str(a)), len(str(b)))
    assert sum(c.digit * 10**i for i, c in enumerate(columns)) + 10 ** len(columns) * columns[-1].carry_out * (
        op == "+") == result
    check = LAYOUTS["columns"].lines(a, op, b)[-1]  # the inverse operation gives back the first operand
    assert check.endswith("= " + " ".join(str(a)))
    aligned = LAYOUTS["aligned"]
    assert len({len(line) for line in aligned.lines(a, op, b)}) == 1  # every column line the same length
    assert int(aligned.answer(a, op, b, result)) == result


def test_aligned_layout_writes_fixed_width_columns():
    task = build(ArithmeticSettings(max_digits=2, train_size=10, test_size=10))
    layout = LAYOUTS["aligned"]
    assert layout.question(7, "+", 85) == "What is 07+85?"
    assert layout.lines(47, "+", 85) == ["7+5+0=12", "4+8+1=13"] and layout.answer(47, "+", 85, 132) == "132"
    assert layout.lines(91, "-", 5) == ["1-5-0=16", "9-0-1=08"] and layout.answer(91, "-", 5, 86) == "86"
    assert layout.answer(34, "+", 28, 62) == "062" and task.equal("062", "62")
    assert task.extract("1 3 2") is None and task.extract("132") == "132"


@pytest.mark.parametrize("layout", ["aligned", "columns"])
def test_every_digit_is_its_own_token(layout, tiny_tokenizer, digit_tokenizer):
    tokenizer = digit_tokenizer if layout == "aligned" else tiny_tokenizer
    task = build(SETTINGS.model_copy(update={"layout": layout}))
    for p in task.problems("train")[:20]:
        text = respond("\n".join(task.layout.lines(*task.operands(p))), p.answer)
        pieces = [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert all(len(piece.strip()) <= 1 for piece in pieces if any(c.isdigit() for c in piece))


def test_a_few_shot_continuation_is_judged_in_the_tasks_own_form():
    task = build(SETTINGS)
    shots, p = task.problems("train")[:2], task.problems("test")[0]
    prompt = task.few_shot(p, shots)
    assert prompt.startswith(task.document(shots)) and prompt.endswith(f"\n\n{p.question}\n")
    right = task.judge_original(f"{p.solution}\n\nWhat is 1+1?\n1+1+0=02\nanswer: 02", p.answer)
    assert right.correct and right.format_ok
    wrong = task.judge_original(p.solution.replace(f"answer: {p.answer}", "answer: 9999"), p.answer)
    assert not wrong.correct and wrong.reason == "wrong_answer"
    assert task.judge_original("7+5+0=12\n", p.answer).reason == "unparsed_answer"  # never answered


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
    # room in principle (150 exist), but the held-out split (drawn first) took a fifth of them
    with pytest.raises(ValueError, match=r"train_size=70: .* \(120 are left outside the held-out ones"):
        build(ArithmeticSettings(min_digits=1, max_digits=1, test_extra_digits=1, train_size=70,
                                 test_size=500)).problems("train")
