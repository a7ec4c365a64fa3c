"""sample.py --bench and --score: LLaVA-Interleave Bench asked and scored as the release does (its
normalisation, multi-choice extraction, ROUGE-L, dataset and category means), resuming a killed run, and bad
input skipped and counted."""
import io
import json
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUGE_GOLDEN = os.path.join(ROOT, "tests", "goldens", "rouge", "rouge_l.json")
EXACT = 2 / (2 + 1e-8)   # the package's F of a perfect match: 2 p r / (p + r + 1e-8) with p = r = 1


# ---- normalisation: each rule of the release on hand-made cases

def test_newlines_and_tabs_become_spaces():
    assert sample.normalise("a\nb\tc") == "a b c"


def test_the_text_is_stripped_before_the_punctuation_rule():
    # Stripped, "-" touches no space and becomes one; unstripped, " -" would delete it everywhere
    assert sample.normalise(" -x, y-z") == "x y z"
    # Stripped first, the quotes are at the ends when they are stripped
    assert sample.normalise("'yes' ") == "yes"


def test_a_mark_beside_a_space_is_deleted_everywhere():
    assert sample.normalise("a - b-c") == "a  bc"


def test_a_mark_beside_no_space_becomes_a_space():
    assert sample.normalise("b-c/d") == "b c d"


def test_a_digit_comma_digit_deletes_every_mark():
    assert sample.normalise("1,000-a") == "1000a"


def test_periods_not_before_a_digit_are_deleted():
    assert sample.normalise("yes.") == "yes"
    assert sample.normalise("it is 3.5 m.") == "it is 3.5 m"


def test_only_32_periods_are_deleted():
    # The release passes re.UNICODE (32) where re.sub takes its count
    assert sample.normalise("a" + "." * 40) == "a" + "." * 8


def test_quotes_are_stripped_from_the_ends():
    # '"', "(" and ")" are among the marks, so the punctuation rule has removed them before this
    # step: of the four characters stripped from the ends, only the single quote can still be there.
    assert sample.normalise("'yes'") == "yes"
    assert sample.normalise("it's") == "it's"


def test_answers_are_lower_cased():
    assert sample.normalise("Yes SIR") == "yes sir"


# ---- multi-choice extraction

def test_a_prediction_with_a_colon_becomes_its_single_letter_piece():
    assert sample.choice_letter("the answer is: b") == "b"
    assert sample.choice_letter("b : the red one") == "b"


def test_the_last_single_letter_piece_wins():
    assert sample.choice_letter("a: x: c") == "c"


def test_only_single_letters_a_to_h_are_taken():
    assert sample.choice_letter("answer: z") == "answer: z"
    assert sample.choice_letter("answer: bc") == "answer: bc"
    assert sample.choice_letter("b") == "b"


def test_multi_choice_is_exact_match_after_normalisation():
    assert sample.score_answer("multi-choice", "The answer is: (B).", "B") == 1.0
    assert sample.score_answer("multi-choice", "B) red", "B") == 0.0


# ---- ROUGE-L: equal to the rouge package (tests/goldens/make_rouge_goldens.py), and the release's cuts

def test_rouge_l_equals_the_rouge_package_on_the_golden_corpus():
    with open(ROUGE_GOLDEN, encoding="utf-8") as f:
        pairs = json.load(f)["pairs"]
    assert len(pairs) >= 300
    for pair in pairs:
        # null: the package raises (a side with no sentence); the release scores those 0
        expected = 0.0 if pair["f"] is None else pair["f"]
        assert sample.rouge_l(pair["prediction"], pair["reference"]) == expected, pair


def test_an_empty_prediction_or_reference_scores_0():
    assert sample.score_answer("open-ended", "", "yes") == 0.0
    assert sample.score_answer("open-ended", "yes", "") == 0.0
    assert sample.score_answer("open-ended", "yes", "yes") == EXACT


def test_a_prediction_is_cut_to_512_characters():
    reference = "yes"
    # "no " is 3 characters: 171 of them are 513, so the cut drops the last "yes"
    assert sample.score_answer("open-ended", "no " * 171 + "yes", reference) == 0.0
    recall = 1.0
    precision = 1 / 2      # distinct words: "no" and "yes"
    expected = 2.0 * ((precision * recall) / (precision + recall + 1e-8))
    assert sample.score_answer("open-ended", "no " * 100 + "yes", reference) == expected


# ---- scores per dataset and category, as the release writes them

def answer(dataset, prediction, reference, question_type, sample_id=0):
    return {"dataset": dataset, "sample_id": sample_id, "pred_response": prediction,
            "gt_response": reference, "question_type": question_type}


def test_scores_per_dataset_and_category_by_hand(tmp_path):
    lines = [
        answer("MMCoQA", "Yes.", "yes", "open-ended"),
        answer("MMCoQA", "the cat", "a cat", "open-ended"),
        answer("ALFRED", "", "go left", "open-ended"),
        answer("NLVR2", "Answer: A", "A", "multi-choice"),
        answer("NLVR2", "b", "A", "multi-choice"),
        answer("NLVR2", "(C)", "C", "multi-choice"),
        answer("BLINK", "d", "D", "multi-choice"),
        # The release scores the dataset called Mantis by exact match whatever its type says
        answer("Mantis", "a", "A", "free-form"),
        answer("Mantis", "b", "A", "free-form"),
        answer("ours", "red circle", "red square", "open-ended"),
        answer("Puzzles", "a", "a", "yes-no"),
    ]
    path = tmp_path / "answers.jsonl"
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.write("not json\n")
        f.write(json.dumps({"dataset": "MMCoQA", "sample_id": 9}) + "\n")
    messages = []
    table = io.StringIO()
    sample.score_file(str(path), messages.append, out=table)

    # By hand: "the cat" / "a cat" share 1 of 2 distinct words each side
    half = 2.0 * ((0.5 * 0.5) / (0.5 + 0.5 + 1e-8))
    mmcoqa = (EXACT + half) / 2
    expected_datasets = {"MMCoQA": {"Rouge-L f": mmcoqa}, "ALFRED": {"Rouge-L f": 0.0},
                         "NLVR2": {"Accuracy": 2 / 3}, "BLINK": {"Accuracy": 1.0},
                         "Mantis": {"Accuracy": 0.5}, "ours": {"Rouge-L f": half}}
    expected_categories = {"multi_modal_dialogue": mmcoqa / 2, "multi_image_reasoning": 2 / 3,
                           "mantis": 0.75}
    datasets = json.loads((tmp_path / "eval_dataset.json").read_text())
    categories = json.loads((tmp_path / "eval_cat.json").read_text())
    assert list(datasets) == list(expected_datasets)
    for name, score in expected_datasets.items():
        metric = next(iter(score))
        assert datasets[name][metric] == pytest.approx(score[metric], rel=1e-12, abs=1e-15), name
    assert list(categories) == list(expected_categories)
    for key, score in expected_categories.items():
        assert categories[key] == pytest.approx(score, rel=1e-12), key
    # Skipped and counted: two bad lines, and the dataset of an unknown question_type
    text = table.getvalue()
    assert "10 answers scored, 3 lines skipped" in text
    assert any("line 12" in m and "not valid JSON" in m for m in messages)
    assert any("line 13" in m and "pred_response" in m for m in messages)
    assert any("Puzzles" in m and "unknown question_type 'yes-no'" in m for m in messages)
    # The table: categories in the release's order, each over its datasets, x100
    rows = [row.split() for row in text.splitlines()]
    names = [row[0] for row in rows if row]
    assert names.index("multi_modal_dialogue") < names.index("MMCoQA") < names.index("multi_image_reasoning")
    assert names.index("multi_image_reasoning") < names.index("NLVR2") < names.index("mantis")
    assert ["NLVR2", "3", "Accuracy", "66.67"] in rows
    assert (tmp_path / "eval_table.txt").read_text() == text


def test_the_papers_numbers_stand_beside_the_release_they_are_for(tmp_path):
    path = tmp_path / "result.jsonl"
    lines = [dict(answer("BLINK", "a", "A", "multi-choice"), model_id="llava-next-interleave-qwen-0.5b"),
             dict(answer("NLVR2", "a", "B", "multi-choice"), model_id="llava-next-interleave-qwen-0.5b")]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = io.StringIO()
    sample.score_file(str(path), print, out=table)
    rows = [row.split() for row in table.getvalue().splitlines()]
    assert ["BLINK", "1", "Accuracy", "100.00", "39.2"] in rows
    assert ["NLVR2", "1", "Accuracy", "0.00", "67.8"] in rows
    # Another model: no paper column
    path.write_text("".join(json.dumps(dict(line, model_id="m4-tiny")) + "\n" for line in lines))
    table = io.StringIO()
    sample.score_file(str(path), print, out=table)
    assert ["BLINK", "1", "Accuracy", "100.00"] in [row.split() for row in table.getvalue().splitlines()]


# ---- asking: resume after a kill, and bad records skipped

def bench_folder(tmp_path, records):
    """A bench file of records whose images (a.png, b.png, c.png) exist in tmp_path."""
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 20), "red").save(tmp_path / f"{name}.png")
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(records))
    return str(path)


def record(sample_id, images, *turns, dataset="ours", question_type="open-ended"):
    speakers = ["human", "gpt"] * len(turns)
    conversations = [{"from": who, "value": text} for who, text in zip(speakers, turns)]
    return {"sample_id": sample_id, "image": images, "conversations": conversations,
            "metadata": {"dataset": dataset, "question_type": question_type}}


class FakeModel:
    """bench_answer's stand-in: answers "answer N" (N counts the calls), raises after `kill_after` calls."""

    def __init__(self, kill_after=None):
        self.calls = []
        self.kill_after = kill_after

    def __call__(self, session, turns):
        if self.kill_after is not None and len(self.calls) == self.kill_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(turns))
        return f"answer {len(self.calls)}"


def bench_args(tmp_path, questions):
    return types.SimpleNamespace(bench=questions, image_folder=str(tmp_path), model=None, max_new_tokens=None,
                                 answers=str(tmp_path / "answers.jsonl"))


def test_a_killed_run_restarted_answers_each_question_once(tmp_path, monkeypatch):
    questions = bench_folder(tmp_path, [
        record("r1", ["a.png"], "q1", "ref1"),
        record("r2", ["a.png", "b.png"], "first <image> then <image>?", "ref2a", "and now?", "ref2b"),
        record(3, ["c.png"], "q3", "ref3"),
    ])
    args = bench_args(tmp_path, questions)
    session = types.SimpleNamespace(settings={})
    # ---- killed after 2 answers: r1, then r2's first turn
    first = FakeModel(kill_after=2)
    monkeypatch.setattr(sample, "bench_answer", first)
    with pytest.raises(KeyboardInterrupt):
        sample.run_bench(session, args, sample.read_bench(questions, str(tmp_path)), print)
    # ... in the middle of writing a third line
    with open(args.answers, "a") as f:
        f.write('{"dataset": "ours", "sample_id": 3, "tu')
    # ---- restarted
    second = FakeModel()
    monkeypatch.setattr(sample, "bench_answer", second)
    sample.run_bench(session, args, sample.read_bench(questions, str(tmp_path)), print)
    with open(args.answers) as f:
        lines = [json.loads(line) for line in f]
    asked = [(line["sample_id"], line["turn"]) for line in lines]
    assert asked == [("r1", 0), ("r2", 0), ("r2", 1), (3, 0)]
    assert len(first.calls) + len(second.calls) == 4
    # r2's second question continues after the model's own first answer, from the killed run
    assert second.calls[0][:2] == [("user", "first <image> then <image>?",
                                    [str(tmp_path / "a.png"), str(tmp_path / "b.png")]),
                                   ("assistant", "answer 2")]
    assert second.calls[0][2] == ("user", "and now?", [])
    assert [line["gt_response"] for line in lines] == ["ref1", "ref2a", "ref2b", "ref3"]
    # A third run has nothing left to ask
    third = FakeModel()
    monkeypatch.setattr(sample, "bench_answer", third)
    sample.run_bench(session, args, sample.read_bench(questions, str(tmp_path)), print)
    assert third.calls == []


def test_bad_records_are_skipped_with_a_reason_and_counted(tmp_path, monkeypatch):
    good = record("good", ["a.png"], "q", "ref")
    not_alternating = record("two-humans", ["a.png"], "q", "ref")
    not_alternating["conversations"][1]["from"] = "human"
    questions = bench_folder(tmp_path, [
        record("no-images", [], "q", "ref"),
        record("missing", ["a.png", "gone.png"], "q", "ref"),
        record("odd-type", ["a.png"], "q", "ref", question_type="yes-no"),
        record("outside", ["../a.png"], "q", "ref"),
        record("markers", ["a.png", "b.png"], "only <image>", "ref"),
        not_alternating,
        ["not", "a", "record"],
        good,
        good,
        record("too-long", ["a.png"], "a question too long", "ref"),
    ])
    items, skipped = sample.read_bench(questions, str(tmp_path))
    assert [item.sample_id for item in items] == ["good", "too-long"]
    reasons = "\n".join(skipped)
    for expected in ("'no-images': no images", "gone.png is missing", "unknown question_type 'yes-no'",
                     "climbs out of the image folder", "1 <image> markers for 2 images", "alternate",
                     "not an object", '"good": seen before'):
        assert expected in reasons
    assert len(skipped) == 8

    def model(session, turns):
        """Answers, except the question too long for the model's context."""
        if turns[-1][1] == "a question too long":
            raise sample.interleave.InputError("the prompt takes 9999 tokens")
        return "ref"

    monkeypatch.setattr(sample, "bench_answer", model)
    messages = []
    sample.run_bench(types.SimpleNamespace(settings={}), bench_args(tmp_path, questions),
                     (items, skipped), messages.append)
    assert "9 records skipped" in messages
    assert any("too-long" in m and "9999 tokens" in m for m in messages)
    with open(tmp_path / "answers.jsonl") as f:
        assert [json.loads(line)["sample_id"] for line in f] == ["good"]


# ---- the command line

def test_bench_and_score_options_are_checked_before_anything_is_loaded(tmp_path, capsys):
    questions = bench_folder(tmp_path, [record("r", ["a.png"], "q", "ref")])
    answers = str(tmp_path / "answers.jsonl")
    cases = [
        (["--bench", questions, "--answers", answers], "--bench needs --image-folder"),
        (["--bench", questions, "--image-folder", str(tmp_path)], "--bench needs --answers"),
        (["--answers", answers], "--answers is for --bench"),
        (["--bench", questions, "--image-folder", str(tmp_path), "--answers", answers, "--temperature", "0.5"],
         "--bench does not take --temperature"),
        (["--bench", questions, "--image-folder", str(tmp_path), "--answers", answers, "--image", "a.png"],
         "--bench does not take --image"),
        (["--score", answers], "--score " + answers + ": there is no such file"),
        (["--score", questions, "--model", "x"], "--score does not take --model"),
        (["--score", questions, "--bench", questions], "give --bench or --score"),
        (["--bench", questions, "--image-folder", str(tmp_path / "none"), "--answers", answers],
         "there is no such folder"),
        (["--bench", questions, "--image-folder", str(tmp_path), "--answers", str(tmp_path / "x" / "a.jsonl")],
         "create it first"),
    ]
    for argv, message in cases:
        assert sample.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_the_embedded_model_runs_a_bench_file_and_scores_it(tmp_path):
    sys.path.insert(0, ROOT)
    from data import make_m4
    path, n = make_m4.write_bench(str(tmp_path), 1, seed=0, size=64)
    records = json.load(open(path))
    # A two-turn record: the description, then the task's own question
    two_turns = dict(records[0], sample_id="two-turns")
    two_turns["conversations"] = records[8]["conversations"] + [
        {"from": "human", "value": records[0]["conversations"][0]["value"].split("\n")[-1]},
        records[0]["conversations"][1]]
    records.append(two_turns)
    with open(path, "w") as f:
        json.dump(records, f)
    answers = str(tmp_path / "answers.jsonl")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, os.path.join(ROOT, "sample.py")]
    done = subprocess.run(command + ["--bench", path, "--image-folder", str(tmp_path), "--answers", answers],
                          capture_output=True, encoding="utf-8", timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert "about 0 s left" in done.stderr
    lines = [json.loads(line) for line in open(answers)]
    assert len(lines) == n + 2
    assert [line["turn"] for line in lines if line["sample_id"] == "two-turns"] == [0, 1]
    datasets = json.loads((tmp_path / "eval_dataset.json").read_text())
    assert len(datasets) == 12
    # Scoring alone gives the same files and table
    table = (tmp_path / "eval_table.txt").read_text()
    os.remove(tmp_path / "eval_dataset.json")
    again = subprocess.run(command + ["--score", answers], capture_output=True, encoding="utf-8", timeout=300,
                           cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == table
    assert json.loads((tmp_path / "eval_dataset.json").read_text()) == datasets


def test_the_questions_are_asked_in_the_release_s_layout():
    """The release's bench script (preprocess_qwen) asks each question after the system block again, puts a
    newline after each image, tokenises each text piece alone, and follows an earlier answer's <|im_end|>
    with no newline; a question without markers gets its images first."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(sample.EMBEDDED, "tokenizer.json"))
    config = sample.interleave.read_config(sample.EMBEDDED)
    turns = [("user", "<image>\nWhat is it?", ["a.png"]), ("assistant", "A cat"),
             ("user", "And <image> then?", ["b.png"]), ("assistant", "No"), ("user", "Where?", ["c.png"])]
    ids = sample.release_prompt_ids(turns, tokenizer, config)
    image = config.image_token_id
    slots = sample.interleave.image_slots(config)
    # each image is one run of its slots; write it as <image> to read the rest as text
    pieces = []
    i = 0
    while i < len(ids):
        if ids[i] == image:
            assert ids[i:i + slots] == [image] * slots
            pieces.append("<image>")
            i += slots
        else:
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
            i += 1
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert "".join(pieces) == (
        system + "<|im_start|>user\n<image>\n\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat<|im_end|>"
        + system + "<|im_start|>user\nAnd <image>\n then?<|im_end|>\n<|im_start|>assistant\nNo<|im_end|>"
        + system + "<|im_start|>user\n<image>\nWhere?<|im_end|>\n<|im_start|>assistant\n")
    # the newline after the image and the question's own first newline are two tokens, not one "\n\n"
    after = ids.index(image) + slots
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    assert ids[after:after + 2] == newline + newline
