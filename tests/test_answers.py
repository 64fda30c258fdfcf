"""Answer extraction on hand-made cases."""

from fractions import Fraction

import pytest

from unlock_export.evaluation.answers import extract_prediction, gold_answer, shows_steps, states_answer, to_fraction


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", 42),
    ("She pays $1,250 in total.", 1250),
    ("So 3 + 4 = 7 apples.\n#### 7", 7),
    ("x = 5, y = 6, so the total is 11", 11),
    ("The final answer is \\boxed{18}.", 18),
    ("\\boxed{\\frac{3}{4}} of the cake", Fraction(3, 4)),
    ("He ate 3/4 of the pie", Fraction(3, 4)),
    ("The temperature fell to -5 degrees", -5),
    ("It costs $2.50 each, so 4 cost $10.00.", 10),
    ("Answer: 12 apples, then he gave away 3 of them", 12),
    ("50%", 50),
    ("1,000,000 people", 1000000),
    ("no numbers here", None),
    ("", None),
])
def test_extract_prediction(text, expected):
    assert extract_prediction(text) == (None if expected is None else Fraction(expected))


@pytest.mark.parametrize("answer,expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72),
    ("#### 1,200", 1200),
    (18, 18),
    ("3.5", Fraction(7, 2)),
    ("-4", -4),
])
def test_gold_answer(answer, expected):
    assert gold_answer(answer) == Fraction(expected)


def test_to_fraction_rejects_junk():
    assert to_fraction("abc") is None and to_fraction("1/0") is None
    assert to_fraction("0.1") == Fraction(1, 10)  # exact: 0.1 never becomes 0.1000000000000000055


def test_shows_steps():
    assert shows_steps("48 / 2 = 24, and 48 + 24 = 72. The answer is 72.")
    assert shows_steps("First she has 5.\nThen she buys 3 more.\nSo she has 8.")
    assert not shows_steps(" 72")
    assert not shows_steps("The answer is 72.")


@pytest.mark.parametrize("text,expected", [
    ("48 / 2 = 24, so the answer is 72.", True),
    ("The final answer is \\boxed{18}.", True),
    ("So 3 + 4 = 7 apples.\n#### 7", True),
    ("Answer: 12", True),
    ("First she has 5. Then 3 more, so 8.", False),     # the last number, not a stated answer
    ("To solve this, we need to follow these steps:\n1. Find", False),
    ("", False),
])
def test_states_answer(text, expected):
    assert states_answer(text) is expected
