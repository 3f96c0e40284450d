"""Official VQAv2 accuracy: hand-computed values, normalisation, the identical-answers quirk, and the
leave-one-out averaging over the annotators (GT-Vision-Lab/VQA vqaEval.py)."""

import pytest

from mmskip.evaluation.vqa_metric import normalize_answer, vqa_accuracy, vqa_scores


def _answers(matching: int, answer: str = "cat", other: str = "dog") -> list[str]:
    """Ten annotator answers, `matching` of which are `answer`."""
    return [answer] * matching + [other] * (10 - matching)


# With m of 10 annotators matching: the m matching ones each see m - 1 others, the 10 - m
# others each see m, so acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10:
# m=1: (0 + 9/3)/10 = 0.3; m=2: (2/3 + 16/3)/10 = 0.6; m=3: (2 + 7)/10 = 0.9; m=4: 10/10 = 1.
@pytest.mark.parametrize(
    ("matching", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)],
)
def test_partial_credit_follows_leave_one_out_formula(matching, expected):
    assert vqa_accuracy("cat", _answers(matching)) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_averaging_after_normalisation():
    # Normalised: 2, 2, 2, 3, 3, 3, 4, 4, 4, 3. Three annotators agreeing give 0.9 (a plain
    # min(matches / 3, 1) would give 1.0), four give 1.0.
    answers = ["Two", "2", "two.", "3", "3", "three", "4", "four", "4", "3"]
    assert vqa_accuracy("2", answers) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("four", answers) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("Three", answers) == 1.0
    assert vqa_accuracy("five", answers) == 0.0


def test_leave_one_out_with_five_annotators_is_not_min_of_matches_over_three():
    # 2 of 5 match: each matching one sees 1 other (1/3), each of the 3 others sees 2 (2/3):
    # (2 * 1/3 + 3 * 2/3) / 5 = 8/15, where min(2/3, 1) would give 2/3.
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "cow", "owl"]) == pytest.approx(8 / 15, abs=1e-12)


def test_all_ten_matching_gives_full_credit():
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0


def test_fewer_annotators_use_the_same_formula():
    # 3 answers, 1 match: the matching one sees 0 others, the two others see 1 -> (0 + 2/3)/3.
    assert vqa_accuracy("cat", ["cat", "dog", "cow"]) == pytest.approx(2 / 9, abs=1e-12)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two dogs!", "2 dogs"),       # case, number word, "!" not next to a space -> space
        ("none", "0"),
        ("yes.", "yes"),               # period not before a digit is dropped
        ("3.5", "3.5"),                # decimal point kept
        ("1,000", "1000"),             # comma between digits: all punctuation stripped
        ("red, white", "red white"),   # punctuation next to a space is stripped
        ("t-shirt", "t shirt"),        # otherwise replaced by a space
        ("The Cat", "cat"),            # articles dropped
        ("an apple", "apple"),
        ("a", ""),
        ("dont", "don't"),             # contractions
        ("Isnt", "isn't"),
        ("don't", "don't"),            # apostrophes are not punctuation
        ("  on\tthe\ntable  ", "on table"),
        ("Ten dogs", "10 dogs"),       # number words up to ten only, whole words only
        ("eleven", "eleven"),
        ("someone", "someone"),
        ("another one", "another 1"),  # "an" is dropped as a word, not as a prefix
        ("no", "no"),                  # only "none" means 0
        ("3.", "3"),                   # a period at the end goes even after a digit
        ("1,000 dogs!", "1000 dogs"),  # comma between digits: "!" stripped too, not spaced
        ("x ,y", "x y"),
        ("a/b", "b"),                  # "/" -> space, then "a" is an article
        ("youre", "you're"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_normalisation_applies_when_annotators_disagree():
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy("The dog.", ["dog"] * 9 + ["a dog"]) == 1.0
    dont_know = vqa_accuracy("dont know", ["don't know"] * 2 + ["no"] * 8)
    assert dont_know == pytest.approx(0.6, abs=1e-12)


def test_identical_answers_skip_normalisation():
    # Official quirk: ten identical answers -> only whitespace cleanup, exact comparison.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # One dissenting annotator switches normalisation on for the whole question.
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0


def test_empty_answers_raise_naming_the_count():
    with pytest.raises(ValueError, match="got 0"):
        vqa_accuracy("yes", [])


def test_single_string_answers_rejected():
    with pytest.raises(ValueError, match="single string 'yes'"):
        vqa_accuracy("yes", "yes")


def test_vqa_scores_aggregates_per_question_type():
    items = [
        {"prediction": "red", "answers": _answers(4, "red", "blue"), "question_type": "color"},
        {"prediction": "red", "answers": _answers(1, "red", "blue"), "question_type": "color"},
        {"prediction": "2", "answers": _answers(2, "two", "3"), "question_type": "count"},
    ]
    scores = vqa_scores(items)
    assert scores["num_examples"] == 3
    assert scores["accuracy"] == pytest.approx((1.0 + 0.3 + 0.6) / 3, abs=1e-12)
    assert scores["per_question_type"] == {
        "color": pytest.approx(0.65, abs=1e-12),
        "count": pytest.approx(0.6, abs=1e-12),
    }
    assert type(scores["accuracy"]) is float
    assert all(type(value) is float for value in scores["per_question_type"].values())


def test_vqa_scores_overall_is_mean_over_questions_not_types():
    items = [{"prediction": "a", "answers": ["a"] * 10, "question_type": "x"}] * 3
    items += [{"prediction": "b", "answers": ["a"] * 10, "question_type": "y"}]
    scores = vqa_scores(items)
    assert scores["accuracy"] == 0.75
    assert scores["per_question_type"] == {"x": 1.0, "y": 0.0}


def test_vqa_scores_rejects_empty_and_malformed_items():
    with pytest.raises(ValueError, match="got 0"):
        vqa_scores([])
    with pytest.raises(ValueError, match=r"item 0 lacks key\(s\) \['question_type'\]"):
        vqa_scores([{"prediction": "a", "answers": ["a"] * 10}])
