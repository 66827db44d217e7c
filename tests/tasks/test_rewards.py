"""The R1 format parser and the rule-based rewards, on literal strings: each known reward hack earns nothing."""

from __future__ import annotations

import pytest

from v3flow.tasks import build
from v3flow.tasks.arithmetic import ArithmeticSettings
from v3flow.tasks.gsm8k import Gsm8kSettings
from v3flow.tasks.reasoning import EMPTY_ANSWER, NO_THINK, NOT_FIRST, SEVERAL, UNCLOSED, parse
from v3flow.tasks.rewards import accuracy_reward, bind, format_reward

ARITH = build(ArithmeticSettings(layout="columns", max_digits=2, train_size=100, test_size=10))  # spaced digits
MATH = build(Gsm8kSettings())
GOOD = "<think>\n7 + 5 = 1 2\n4 + 8 + 1 = 1 3\n</think>\n1 3 2"


def acc(task, text: str, gold: str) -> float:
    return accuracy_reward([text], answer=[gold], task=task)[0]


def test_a_right_answer_in_the_format_earns_both_rewards():
    assert acc(ARITH, GOOD, "1 3 2") == 1.0 and format_reward([GOOD]) == [1.0]
    assert acc(ARITH, "  <think>x</think>\n 1 3  2 ", "1 3 2") == 1.0  # whitespace is not the answer
    assert acc(MATH, "<think>48 / 2 = 24, 48 + 24 = 72</think>\nSo \\boxed{72}.", "72") == 1.0
    assert acc(MATH, "<think>a</think>\\boxed{72.0}", "72") == 1.0  # math-verify: the same number


@pytest.mark.parametrize("text, error", [
    ("1 3 2", NO_THINK),
    ("The answer: <think>x</think>1 3 2", NOT_FIRST),
    ("<think>a</think><think>b</think>1 3 2", SEVERAL),  # open-r1 PR #418
    ("<think>a</think>1 3 2</think>", SEVERAL),
    ("<think>a 1 3 2", UNCLOSED),
    ("<think>1 3 2</think>", EMPTY_ANSWER),  # the answer hidden in the reasoning
    ("<think></think>1 3 2", "empty_reasoning"),  # Soup #814: an empty think block scored 1.0
])
def test_format_hacks_earn_nothing(text, error):
    assert parse(text).error == error
    assert format_reward([text]) == [0.0] and acc(ARITH, text, "1 3 2") == 0.0


@pytest.mark.parametrize("answer", ["1 3 2 1", "1 3 2 or 1 3 3", "1 3", "it is 1 3 2", "1 3 2 .", "132 1 3 2", ""])
def test_an_answer_that_merely_contains_the_gold_earns_nothing(answer):
    """Substring matching rewarded answers listing guesses (Visual-RFT #176): only the whole answer counts."""
    assert acc(ARITH, f"<think>r</think>{answer}", "1 3 2") == 0.0


@pytest.mark.parametrize("answer", ["\\boxed{72} or \\boxed{73}", "\\boxed{}", "72", "\\boxed{7}2", "\\boxed{720}"])
def test_gsm8k_needs_exactly_one_box_holding_the_number(answer):
    assert acc(MATH, f"<think>r</think>{answer}", "72") == 0.0


def test_rewards_are_bound_by_name_and_read_conversational_completions():
    funcs = bind(["accuracy", "format"], ARITH)
    assert [f.__name__ for f in funcs] == ["accuracy_reward", "format_reward"]
    completions = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": "1 3 2"}]]
    assert funcs[0](completions, answer=["1 3 2", "1 3 2"]) == [1.0, 0.0]
    assert funcs[1](completions, answer=["1 3 2", "1 3 2"]) == [1.0, 0.0]
