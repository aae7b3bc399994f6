"""The GSM8K reward on GSM8K-style problems: the answer formats GSM8K's `#### N` lines take, the
last-number fallback, and completions going through a real tokenizer."""

from __future__ import annotations

from decimal import Decimal

import pytest

from areal_core.tasks import get_dataset, get_reward
from areal_core.tasks.gsm8k import extract_answer, format_number, reference_answer

from .gsm8k_files import write_jsonl

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
           "May. How many clips did Natalia sell altogether in April and May?",
           "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
           "altogether in April and May.\n#### 72")
WENG = ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10")
JANET = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
         "muffins for her friends every day with four. She sells the remainder at the farmers' market "
         "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
         "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
         "day at the farmer's market.\n#### 18")
ROBE = ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
        "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 "
        "bolts of fabric\n#### 3")
JOSH = ("Josh decides to try flipping a house. He buys a house for $80,000 and then puts in $50,000 in "
        "repairs. This increased the value of the house by 150%. How much profit did he make?",
        "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
        "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value "
        "of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
        "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000")
JAMES = ("James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
         "He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 pages every "
         "week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624")
FREEZER = ("The temperature in a freezer was 5 degrees Celsius at noon. By midnight it had dropped by 12 "
           "degrees. What was the temperature at midnight, in degrees Celsius?",
           "The temperature at midnight was 5 - 12 = <<5-12=-7>>-7 degrees.\n#### -7")
PENS = ("A pen costs $1.75. Maria buys 2 pens. How many dollars does she spend?",
        "Maria spends 2 * 1.75 = $<<2*1.75=3.5>>3.5 on pens.\n#### 3.5")
FARM = ("A farm sells 1,250 liters of milk a day for 6 days and keeps none. How many liters does it sell?",
        "It sells 1,250 * 6 = <<1250*6=7500>>7,500 liters.\n#### 7,500")
CHEESE = ("A block of cheese weighs 2 pounds and is cut into 4 equal slices. How many pounds does each slice weigh?",
          "Each slice weighs 2 / 4 = <<2/4=0.5>>0.5 pounds.\n#### 0.5")

# (question and answer, completion, last_number_fallback, expected reward, what it shows)
CASES = [
    (NATALIA, "In May she sold 48 / 2 = 24 clips.\nAltogether: 48 + 24 = 72 clips.\n#### 72", True, 1.0,
     "the plain GSM8K format"),
    (WENG, "Per minute she earns $12 / 60 = $0.20.\nFor 50 minutes: 0.20 * 50 = $10.00.\n#### $10.00", True, 1.0,
     "a dollar sign and 10.00 == 10"),
    (JOSH, "Cost: $80,000 + $50,000 = $130,000.\nNew value: $80,000 * 2.5 = $200,000.\n"
           "Profit: $200,000 - $130,000 = $70,000.\n#### $70,000", True, 1.0, "thousands commas and $"),
    (FARM, "1,250 liters a day for 6 days is 1,250 * 6 = 7,500 liters.\n#### 7500.", True, 1.0,
     "a reference with commas, a trailing full stop"),
    (FREEZER, "It drops from 5 to 5 - 12 = -7 degrees.\n#### -7", True, 1.0, "a negative answer"),
    (FREEZER, "The temperature dropped by 7 degrees.\n#### 7", True, 0.0, "the sign counts"),
    (PENS, "2 x $1.75 = $3.50\n#### 3.50", True, 1.0, "3.50 == 3.5"),
    (CHEESE, "Each slice is 2 / 4 of a pound.\n#### .5", True, 1.0, ".5 == 0.5"),
    (JANET, "She has 16 - 3 - 4 = 9 eggs left and sells them at $2 each, so she makes 9 * 2 = $18 "
            "per day. The answer is $18.", True, 1.0, "no ####: the last number, fallback on"),
    (JANET, "She has 16 - 3 - 4 = 9 eggs left and sells them at $2 each, so she makes 9 * 2 = $18 "
            "per day. The answer is $18.", False, 0.0, "no ####: nothing, fallback off"),
    (JANET, "She sells the eggs she has left for $2 each.", True, 0.0, "the last number is the wrong one"),
    (JANET, "#### 16\nWait, she eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs and 9 * 2 = 18.\n#### 18",
     True, 1.0, "the last #### wins"),
    (JANET, "#### 18 dollars a day, from 9 eggs", True, 1.0, "the first number after #### is the answer"),
    (JANET, "9 * 2 = 18, so she makes $18 a day.\n####", True, 1.0, "#### with no number: fallback"),
    (JANET, "9 * 2 = 18, so she makes $18 a day.\n####", False, 0.0, "#### with no number, fallback off"),
    (JANET, "#### 18.5", True, 0.0, "a near miss is wrong"),
    (JANET, "#### 180", True, 0.0, "a digit too many is wrong"),
    (ROBE, "It takes 2 bolts of blue and 2 / 2 = 1 bolt of white.\n#### 2", True, 0.0, "a wrong answer"),
    (ROBE, "", True, 0.0, "an empty completion"),
    (JAMES, "Each week: 3 * 2 * 2 = 12 pages. A year: 12*52=<<12*52=624>>624 pages a year", True, 1.0,
     "calculator annotations copied from GSM8K, no ####"),
]
AFTER_EOS = (ROBE, "2 + 1 = 3 bolts.\n#### 3", "#### 4")  # text after eos never counts


@pytest.fixture(scope="module")
def records(tmp_path_factory, text_tokenizer_dir):
    """The eval records of a GSM8K file holding every problem above, keyed by question."""
    problems = {q: a for (q, a), *_ in CASES}
    path = write_jsonl(tmp_path_factory.mktemp("reward") / "problems.jsonl",
                       [{"question": q, "answer": a} for q, a in problems.items()])
    dataset = get_dataset("gsm8k", {"path": path, "eval_path": path, "tokenizer_path": text_tokenizer_dir})
    return {record["question"]: record for record in dataset.eval_records()}


@pytest.fixture(scope="module")
def tokenizer(text_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir)


@pytest.mark.parametrize("problem, completion, fallback, expected, shows", CASES,
                         ids=[case[-1] for case in CASES])
def test_reward_of_realistic_completions(records, tokenizer, problem, completion, fallback, expected, shows):
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    reward = get_reward("gsm8k", {"last_number_fallback": fallback})
    assert reward(records[problem[0]], completion_ids) == expected


def test_records_carry_the_reference_answers(records):
    assert [records[q]["answer"] for q, _ in (NATALIA, WENG, JOSH, FARM, FREEZER, PENS, CHEESE)] == [
        "72", "10", "70000", "7500", "-7", "3.5", "0.5"]


def test_tokens_after_eos_are_ignored(records, tokenizer):
    (question, _), before, after = AFTER_EOS
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    reward = get_reward("gsm8k")
    assert reward(records[question], encode(before) + [tokenizer.eos_token_id] + encode(after)) == 1.0
    assert reward(records[question], encode(before + "\n" + after)) == 0.0


def test_reward_option_tokenizer_path_overrides_the_records(records, tokenizer, text_tokenizer_dir, tmp_path):
    record = dict(records[ROBE[0]], tokenizer_path=str(tmp_path / "gone"))
    ids = tokenizer("#### 3", add_special_tokens=False)["input_ids"]
    assert get_reward("gsm8k", {"tokenizer_path": text_tokenizer_dir})(record, ids) == 1.0
    with pytest.raises(ValueError, match="is not a directory"):
        get_reward("gsm8k")(record, ids)


@pytest.mark.parametrize("text, expected", [
    ("#### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### 1,234,567.", "1234567"),
    ("#### -12", "-12"),
    ("#### +12", "12"),
    ("#### \u221212", "-12"),          # a typographic minus
    ("#### -$5", "-5"),
    ("#### $-5", "-5"),
    ("#### 3.50", "3.5"),
    ("#### $0.75.", "0.75"),
    ("#### 25%", "25"),
    ("####42", "42"),
    ("so 10-3 = 7", "7"),
    ("from 10-3 days", "3"),            # a range's dash is not a minus
    ("is 1.5 hours.", "1.5"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer_formats(text, expected):
    value = extract_answer(text)
    assert (None if value is None else format_number(value)) == expected


def test_extract_answer_numeric_equality():
    assert extract_answer("#### 3.50") == Decimal("3.5") == extract_answer("#### 3.5")
    assert extract_answer("#### 1,000") == extract_answer("#### 1000.00")
    assert extract_answer("#### 100") != extract_answer("#### 10")


def test_reference_answer_needs_the_mark():
    assert reference_answer("2 + 2 = 4\n#### 4") == 4
    for bad in ("2 + 2 = 4", "#### four", None):
        with pytest.raises(ValueError):
            reference_answer(bad)


def test_format_number_is_canonical():
    assert [format_number(Decimal(s)) for s in ("100", "3.50", "-0", "0.250", "1E+3")] == [
        "100", "3.5", "0", "0.25", "1000"]
