"""Own data: JSONL, CSV and datasets folders load into the same examples as SQuAD, with one-line errors;
runs train and score on them (and on SQuAD 2.0) end to end on the tiny model."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from loraqa.config import ExperimentConfig, apply_overrides
from loraqa.data import DataError, detect_format, load_file, load_squad, split_source

CTX = "The Eiffel Tower is in Paris. It was finished in 1889."
RECORDS = [
    {"id": "a", "context": CTX, "question": "Where is the Eiffel Tower?", "answers": ["Paris"]},
    {"id": "b", "context": CTX, "question": "When was it finished?",
     "answers": [{"text": "1889", "answer_start": 49}, {"text": "in 1889", "answer_start": 46}]},
    {"id": "c", "context": CTX, "question": "What is in Paris?",
     "answers": {"text": ["The Eiffel Tower"], "answer_start": [0]}},
    {"id": "d", "context": CTX, "question": "Who built it?"},  # no answers: prediction only
]  # fmt: skip


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "context", "question", "answers"])
        w.writeheader()
        for r in records:
            answers = r.get("answers")
            if isinstance(answers, dict):
                answers = answers["text"]
            if isinstance(answers, list):
                answers = [a["text"] if isinstance(a, dict) else a for a in answers]
            w.writerow({**r, "answers": json.dumps(answers) if answers is not None else ""})
    return path


def test_jsonl_answers_in_every_shape(tmp_path):
    examples, report = load_file(write_jsonl(tmp_path / "q.jsonl", RECORDS), "jsonl")
    by_id = {ex.id: ex for ex in examples}
    assert by_id["a"].answers == ("Paris",) and by_id["a"].answer_starts == (CTX.index("Paris"),)
    assert by_id["b"].answers == ("1889", "in 1889")
    assert by_id["c"].answers == ("The Eiffel Tower",)
    assert by_id["d"].answers == () and not by_id["d"].is_impossible
    assert report.n_questions_in_file == 4 and report.n_loaded == 4


def test_line_separators_inside_text_do_not_split_records(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 unescaped: Wikipedia text can hold them
    odd = [{**r, "context": r["context"].replace("Paris.", "Paris.\u2028\x85\x0c")} for r in RECORDS]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in odd), encoding="utf-8")
    examples, report = load_file(path, "jsonl")
    assert report.n_loaded == 4 and examples[0].context == odd[0]["context"]
    csv_examples, _ = load_file(write_csv(tmp_path / "q.csv", odd), "csv")
    assert [e.context for e in csv_examples] == [e.context for e in examples]


def test_gzipped_jsonl_loads_like_plain(tmp_path):
    import gzip

    plain = write_jsonl(tmp_path / "q.jsonl", RECORDS)
    packed = tmp_path / "q.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert detect_format(packed) == "jsonl"
    assert load_file(packed, "jsonl")[0] == load_file(plain, "jsonl")[0]
    packed.write_bytes(packed.read_bytes()[:20])
    with pytest.raises(DataError, match="q.jsonl.gz: corrupt or truncated gzip"):
        load_file(packed, "jsonl")


def test_csv_loads_like_jsonl(tmp_path):
    jsonl, _ = load_file(write_jsonl(tmp_path / "q.jsonl", RECORDS), "jsonl")
    csv_examples, _ = load_file(write_csv(tmp_path / "q.csv", RECORDS), "csv")
    assert [(e.id, e.answers, e.context, e.question) for e in csv_examples] == [
        (e.id, e.answers, e.context, e.question) for e in jsonl
    ]
    # a cell that is not a JSON list is one answer
    (tmp_path / "plain.csv").write_text(f'id,context,question,answers\nx,"{CTX}",Where?,Paris\n')
    (ex,), _ = load_file(tmp_path / "plain.csv", "csv")
    assert ex.answers == ("Paris",)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "context": "c", "question": 3}', r"q.jsonl: line 2 \(id 'x'\): field 'question' should be a string"),
        ('{"id": "x", "question": "q"}', r"q.jsonl: line 2 \(id 'x'\): missing field 'context'"),
        ('{"id": "x", "context": "c", "question": "q", "answers": "c"}', r"line 2 \(id 'x'\): field 'answers' should be a list"),
        ('{"id": "a", "context": "c", "question": "q"}', r"line 2: id 'a' appears more than once"),
        ('{"id": "x", "context": ', r"q.jsonl: line 2: invalid JSON"),
        ('[1, 2]', r"q.jsonl: line 2: should be an object, got a list"),
    ],
)  # fmt: skip
def test_bad_jsonl_records_are_one_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as e:
        load_file(path, "jsonl")
    assert "\n" not in str(e.value)


def test_bad_csv_is_one_line(tmp_path):
    (tmp_path / "q.csv").write_text("id,question,answers\nx,Where?,Paris\n")
    with pytest.raises(DataError, match=r"q.csv: no 'context' column \(header: id, question, answers\)"):
        load_file(tmp_path / "q.csv", "csv")
    (tmp_path / "r.csv").write_text('id,context,question,answers\nx,c,q,"[""a"",\n')
    with pytest.raises(
        DataError, match=r"r.csv: line \d+ \(id 'x'\): field 'answers' is not a valid JSON list"
    ):
        load_file(tmp_path / "r.csv", "csv")


def test_unusable_answers_are_skipped_and_counted(tmp_path):
    records = [*RECORDS[:2], {"id": "z", "context": CTX, "question": "q", "answers": ["London"]},
               {"id": "e", "context": CTX, "question": "q", "answers": []}]  # fmt: skip
    examples, report = load_file(write_jsonl(tmp_path / "q.jsonl", records), "jsonl", split="train")
    assert [ex.id for ex in examples] == ["a", "b"]
    assert report.skipped == {"answer not in context": 1, "no answers": 1}
    # outside training the answer that is not in its context is kept for scoring
    examples, report = load_file(tmp_path / "q.jsonl", "jsonl")
    assert [ex.id for ex in examples] == ["a", "b", "z"] and examples[2].answer_starts == (None,)
    assert report.skipped == {"no answers": 1} and report.kept_unlocated == 1


def test_datasets_folder_with_squad_columns(tmp_path):
    datasets = pytest.importorskip("datasets")  # the hf extra; CI installs it with the dev extra
    rows = [r for r in RECORDS if isinstance(r.get("answers"), dict)] * 1
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(
            [{"id": "t1", "title": "T", "context": CTX, "question": "Where?",
              "answers": {"text": ["Paris"], "answer_start": [CTX.index("Paris")]}}]),
        "validation": datasets.Dataset.from_list(
            [{**r, "title": "T"} for r in rows]),
    })  # fmt: skip
    dd.save_to_disk(str(tmp_path / "ds"))
    assert detect_format(tmp_path / "ds") == "hf"
    train, _ = load_file(tmp_path / "ds", "hf", split="train")
    dev, _ = load_file(tmp_path / "ds", "hf", split="dev")
    assert train[0].answers == ("Paris",) and dev[0].answers == ("The Eiffel Tower",)
    with pytest.raises(DataError, match="no 'question' column"):
        datasets.Dataset.from_list([{"id": "x", "context": "c"}]).save_to_disk(str(tmp_path / "bad"))
        load_file(tmp_path / "bad", "hf")


def test_hf_format_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'loraqa\[hf\]'"):
        load_file(tmp_path, "hf")


def test_detect_format_and_split_source(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"version": "v2.0", "data": []}))
    (tmp_path / "b.json").write_text(json.dumps({"version": "1.1", "data": []}))
    assert detect_format(tmp_path / "a.json") == "squad_v2" and detect_format(tmp_path / "b.json") == "squad"
    assert detect_format(tmp_path / "x.jsonl") == "jsonl" and detect_format(tmp_path / "x.csv") == "csv"
    cfg = apply_overrides(ExperimentConfig(), [("data.format", "jsonl"), ("data.data_dir", str(tmp_path))])
    with pytest.raises(DataError, match=r"no train.jsonl for data.format=jsonl"):
        split_source(cfg.data, "train")
    cfg = apply_overrides(cfg, [("data.train_file", "mine.jsonl")])
    assert split_source(cfg.data, "train") == "mine.jsonl"


def tiny(data_dir, fmt, **extra):
    from test_train import tiny_config

    return tiny_config(data_dir, **{"data.format": fmt, "train.eval_steps": 0, "train.save_steps": 0,
                                    "train.max_steps": 2, **extra})  # fmt: skip


def test_a_run_on_jsonl_data(tmp_path, synthetic_dir):
    from loraqa.pipeline import run_experiment

    # the synthetic SQuAD questions as JSONL files
    for split in ("train", "dev"):
        examples, _ = load_squad(synthetic_dir, split=split)
        write_jsonl(tmp_path / f"{split}.jsonl",
                    [{"id": e.id, "context": e.context, "question": e.question, "answers": list(e.answers)}
                     for e in examples])  # fmt: skip
    metrics = run_experiment(tiny(tmp_path, "jsonl"), tmp_path / "run", progress=False)
    assert metrics["n_questions"] == 8 and metrics["train_examples"] == 16
    assert "`jsonl`" in (tmp_path / "run" / "README.md").read_text()


def test_a_run_on_squad_v2_scores_hasans_and_noans(tmp_path):
    from loraqa.pipeline import run_experiment
    from test_squad_v2 import v2_dev

    for split in ("train", "dev"):
        (tmp_path / f"{split}-v2.0.json").write_text(json.dumps(v2_dev()))
    metrics = run_experiment(tiny(tmp_path, "squad_v2", **{"data.eval_limit": None}), tmp_path / "run",
                             progress=False)  # fmt: skip
    assert metrics["train_examples"] == 9  # the 4 unanswerable questions train the no-answer text
    assert metrics["n_questions"] == 9 and metrics["HasAns_total"] == 5 and metrics["NoAns_total"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    official = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert official == {r["id"]: r["prediction"] for r in records}
    assert all("generated" in r and "is_impossible" in r for r in records)
    assert "NoAns exact / F1" in (tmp_path / "run" / "README.md").read_text()


def test_a_run_folder_from_before_the_new_data_fields_is_not_refused(tmp_path):
    """config.yaml written before data.format existed: the same experiment, so it resumes, not refused."""
    from loraqa.runfolder import prepare_run_dir

    cfg = ExperimentConfig()
    old = cfg.to_yaml()
    for key in ("format", "train_file", "dev_file", "unanswerable_answer"):
        old = "\n".join(line for line in old.splitlines() if not line.strip().startswith(f"{key}:")) + "\n"
    (tmp_path / "config.yaml").write_text(old)
    prepare_run_dir(tmp_path, cfg, overwrite=False)
    assert (tmp_path / "config.yaml").read_text() == cfg.to_yaml()


def test_a_squad_file_with_is_impossible_but_no_version_is_squad_v2(tmp_path):
    qas = [{"id": "p", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 24}]},
           {"id": "q", "question": "Who?", "answers": [], "is_impossible": True}]  # fmt: skip
    (tmp_path / "v2.json").write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": CTX,
                                                  "qas": qas}]}]}))  # fmt: skip
    assert detect_format(tmp_path / "v2.json") == "squad_v2"
    (tmp_path / "bad.json").write_text(json.dumps({"data": [{"paragraphs": "oops"}]}))
    assert detect_format(tmp_path / "bad.json") == "squad"  # left to the reader to name what is wrong


def test_a_negative_answer_start_moves_to_its_text(tmp_path):
    """A negative start sliced from the context's end (here it even matches there): the answer is moved to
    its nearest occurrence and counted, never kept at a negative position."""
    ctx = "The kite is red. The box is red."
    record = {"id": "k", "context": ctx, "question": "What color?", "answers": [{"text": "red.", "answer_start": -4}]}
    examples, report = load_file(write_jsonl(tmp_path / "q.jsonl", [record]), "jsonl", split="train")
    assert examples[0].answer_starts == (ctx.index("red."),) and report.fixed_offsets == 1


def test_a_csv_answer_that_only_looks_like_a_list_is_one_answer(tmp_path):
    (tmp_path / "q.csv").write_text('id,context,question,answers\nx,See [citation needed] here.,What?,[citation needed]\n')
    examples, _ = load_file(tmp_path / "q.csv", "csv")
    assert examples[0].answers == ("[citation needed]",)


def test_an_answer_text_not_a_string_says_so(tmp_path):
    record = {"id": "y", "context": CTX, "question": "When?", "answers": [{"text": 1889, "answer_start": 49}]}
    with pytest.raises(DataError, match=r"line 1 \(id 'y'\): answer 0: field 'text' should be a string, got a"):
        load_file(write_jsonl(tmp_path / "q.jsonl", [record]), "jsonl")


def test_one_dataset_as_the_data_folder_is_refused_for_both_splits(tmp_path):
    """One Dataset read as the run's data folder would be its training and its dev questions alike; named as a
    file (predict, or data.dev_file) it is read whole."""
    datasets = pytest.importorskip("datasets")
    from loraqa.data import load_split

    datasets.Dataset.from_list([{"id": "a", "context": CTX, "question": "Where?", "answers": ["Paris"]}]).save_to_disk(
        str(tmp_path / "ds"))  # fmt: skip
    cfg = apply_overrides(ExperimentConfig(), [("data.format", "hf"), ("data.data_dir", str(tmp_path / "ds"))])
    with pytest.raises(DataError, match="one data set, not train and validation splits"):
        load_split(cfg.data, "train")
    assert [ex.id for ex in load_file(tmp_path / "ds", "hf")[0]] == ["a"]
    cfg = apply_overrides(cfg, [("data.dev_file", str(tmp_path / "ds"))])
    assert [ex.id for ex in load_split(cfg.data, "dev")[0]] == ["a"]
