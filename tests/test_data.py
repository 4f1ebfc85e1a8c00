"""Tests for loraqa.data: loading and validating SQuAD files, finding/downloading them, corpus stats.

All data is synthetic (written to tmp_path); downloads go to a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraqa import data
from loraqa.data import DataError, Example, LoadReport, load_squad

# --------------------------------------------------------------------------------------------------
# Synthetic SQuAD files
# --------------------------------------------------------------------------------------------------

CTX_ALPHA = "Alpha was founded in 1900 by Bob Smith in Paris. Bob Smith later moved to Rome."
CTX_BETA1 = "Beta is a river. It flows north for 300 km."
CTX_BETA2 = "The Beta valley has many farms."


def qa(qid: str, question: str, context: str, *texts: str) -> dict:
    """A question whose answers point at the first occurrence of each text."""
    return {
        "id": qid,
        "question": question,
        "answers": [{"text": t, "answer_start": context.index(t)} for t in texts],
    }


def make_squad() -> dict:
    """Two articles, three paragraphs, five valid questions (ids q1..q5, in file order)."""
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Alpha",
                "paragraphs": [
                    {
                        "context": CTX_ALPHA,
                        "qas": [
                            qa("q1", "Who founded Alpha?", CTX_ALPHA, "Bob Smith", "Bob Smith"),
                            qa("q2", "When was Alpha founded?", CTX_ALPHA, "1900"),
                        ],
                    }
                ],
            },
            {
                "title": "Beta",
                "paragraphs": [
                    {
                        "context": CTX_BETA1,
                        "qas": [
                            qa("q3", "What is Beta?", CTX_BETA1, "a river"),
                            qa("q4", "How long is the Beta river?", CTX_BETA1, "300 km", "300"),
                        ],
                    },
                    {
                        "context": CTX_BETA2,
                        "qas": [qa("q5", "What does the valley have?", CTX_BETA2, "farms")],
                    },
                ],
            },
        ],
    }


def write_json(path: Path, obj: object) -> Path:
    """Write `obj` as JSON (gzipped when the name ends in .gz) and return the path."""
    text = json.dumps(obj)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_obj(tmp_path: Path, obj: object, **kw) -> tuple[list[Example], LoadReport]:
    return load_squad(write_json(tmp_path / "squad.json", obj), **kw)


def first_qa(obj: dict) -> dict:
    return obj["data"][0]["paragraphs"][0]["qas"][0]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Keep the user's own settings out of these tests."""
    for name in ("LORAQA_DATA_DIR", "LORAQA_CACHE_DIR", "LORAQA_SQUAD_URL"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------
# Loading good files
# --------------------------------------------------------------------------------------------------


def test_load_json_file(tmp_path):
    path = write_json(tmp_path / "my.json", make_squad())
    examples, report = load_squad(path)

    assert [ex.id for ex in examples] == ["q1", "q2", "q3", "q4", "q5"]
    first = examples[0]
    assert first == Example(
        id="q1",
        title="Alpha",
        context=CTX_ALPHA,
        question="Who founded Alpha?",
        answers=("Bob Smith", "Bob Smith"),  # duplicates kept
        answer_starts=(29, 29),
    )
    assert examples[3].answers == ("300 km", "300")
    for ex in examples:
        for text, start in zip(ex.answers, ex.answer_starts, strict=True):
            assert ex.context[start : start + len(text)] == text

    assert report.path == path
    assert (report.n_articles, report.n_paragraphs, report.n_questions_in_file, report.n_loaded) == (
        2,
        3,
        5,
        5,
    )
    assert report.skipped == {} and report.skipped_ids == {}
    assert report.fixed_offsets == 0 and report.dropped_answers == 0


def test_example_is_frozen(tmp_path):
    examples, _ = load_obj(tmp_path, make_squad())
    with pytest.raises(AttributeError):
        examples[0].question = "changed"  # type: ignore[misc]


def test_load_gzip_file_gives_same_result(tmp_path):
    plain = load_squad(write_json(tmp_path / "a.json", make_squad()))[0]
    gzipped = load_squad(write_json(tmp_path / "a.json.gz", make_squad()))[0]
    assert gzipped == plain


def test_gzip_recognised_by_content_whatever_the_name(tmp_path):
    path = tmp_path / "really-gzip.json"
    path.write_bytes(gzip.compress(json.dumps(make_squad()).encode()))
    examples, _ = load_squad(path)
    assert len(examples) == 5


def test_title_is_optional(tmp_path):
    obj = make_squad()
    del obj["data"][0]["title"]
    examples, _ = load_obj(tmp_path, obj)
    assert examples[0].title == ""


def test_load_folder_picks_split(tmp_path):
    dev = make_squad()
    train = make_squad()
    train["data"] = train["data"][:1]
    write_json(tmp_path / "dev-v1.1.json", dev)
    write_json(tmp_path / "train-v1.1.json.gz", train)

    dev_examples, dev_report = load_squad(tmp_path)  # split defaults to dev
    train_examples, train_report = load_squad(str(tmp_path), split="train")
    assert len(dev_examples) == 5 and dev_report.path == tmp_path / "dev-v1.1.json"
    assert len(train_examples) == 2 and train_report.path == tmp_path / "train-v1.1.json.gz"


def test_load_folder_without_the_split_file(tmp_path):
    write_json(tmp_path / "dev-v1.1.json", make_squad())
    with pytest.raises(DataError, match=r"train-v1\.1\.json") as info:
        load_squad(tmp_path, split="train")
    assert str(tmp_path) in str(info.value)
    assert "LORAQA_DATA_DIR" in str(info.value)


def test_load_folder_unknown_split(tmp_path):
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_squad(tmp_path, split="test")


def test_limit_keeps_first_valid_questions(tmp_path):
    obj = make_squad()
    first_qa(obj)["answers"] = []  # q1 is skipped, so the first three valid are q2, q3, q4
    examples, report = load_obj(tmp_path, obj, limit=3)
    assert [ex.id for ex in examples] == ["q2", "q3", "q4"]
    assert report.n_loaded == 3
    assert report.n_questions_in_file == 5  # the report still describes the whole file
    assert report.skipped == {"no answers": 1}
    assert "first 3 of 4 valid" in report.summary()


def test_limit_edge_cases(tmp_path):
    path = write_json(tmp_path / "s.json", make_squad())
    assert load_squad(path, limit=0)[0] == []
    assert len(load_squad(path, limit=100)[0]) == 5
    assert "limited" not in load_squad(path, limit=5)[1].summary()
    with pytest.raises(ValueError, match="limit"):
        load_squad(path, limit=-1)


# --------------------------------------------------------------------------------------------------
# Bad input: one-line DataError naming the file (and question id / field)
# --------------------------------------------------------------------------------------------------


def assert_one_line_error(info: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(DataError) as info:
        load_squad(path)
    assert_one_line_error(info, path, "no such file")


def test_truncated_json_reports_line_and_column(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps(make_squad(), indent=1)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError) as info:
        load_squad(path)
    assert_one_line_error(info, path, "invalid JSON", "line ", "column ", "truncated")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("")
    with pytest.raises(DataError) as info:
        load_squad(path)
    assert_one_line_error(info, path, "invalid JSON at line 1, column 1")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"data": [{"title": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_squad(path)
    assert_one_line_error(info, path, "not UTF-8")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.json.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError) as info:
        load_squad(path)
    assert_one_line_error(info, path, "gzip")


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.json.gz"
    blob = gzip.compress(json.dumps(make_squad()).encode())
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as info:
        load_squad(path)
    assert_one_line_error(info, path, "gzip")


@pytest.mark.parametrize("top", [[], {"version": "1.1"}, {"data": {}}, "text", None])
def test_top_level_must_hold_a_data_list(tmp_path, top):
    with pytest.raises(DataError, match="'data' list") as info:
        load_obj(tmp_path, top)
    assert_one_line_error(info, tmp_path / "squad.json")


def _del(*keys):
    """An edit that deletes obj[keys[0]][keys[1]]...[keys[-1]]."""

    def edit(obj):
        target = obj
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return edit


def _set(value, *keys):
    """An edit that sets obj[keys[0]]...[keys[-1]] = value."""

    def edit(obj):
        target = obj
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


P0 = ("data", 0, "paragraphs", 0)
Q0 = (*P0, "qas", 0)
A0 = (*Q0, "answers", 0)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (_del("data", 0, "paragraphs"), ["article 0 ('Alpha')", "missing field 'paragraphs'"]),
        (_del(*P0, "context"), ["article 0 ('Alpha'), paragraph 0", "missing field 'context'"]),
        (_del(*P0, "qas"), ["paragraph 0", "missing field 'qas'"]),
        (_del(*Q0, "id"), ["paragraph 0, question 0", "missing field 'id'"]),
        (_del(*Q0, "question"), ["question 'q1'", "missing field 'question'"]),
        (_del(*Q0, "answers"), ["question 'q1'", "missing field 'answers'"]),
        (_del(*A0, "text"), ["question 'q1', answer 0", "missing field 'text'"]),
        (_del(*A0, "answer_start"), ["question 'q1', answer 0", "missing field 'answer_start'"]),
        # wrong types
        (_set("x", "data", 0), ["article 0 should be an object, got a string"]),
        (_set(7, "data", 0, "title"), ["field 'title' should be a string, got an integer"]),
        (_set({}, "data", 0, "paragraphs"), ["field 'paragraphs' should be a list, got an object"]),
        (_set(None, *P0, "context"), ["field 'context' should be a string, got null"]),
        (_set([1], *Q0), ["question 0 should be an object, got a list"]),
        (_set(17, *Q0, "id"), ["field 'id' should be a string, got an integer"]),
        (_set(["?"], *Q0, "question"), ["question 'q1'", "field 'question' should be a string"]),
        (_set({"text": "x"}, *Q0, "answers"), ["question 'q1'", "field 'answers' should be a list"]),
        (_set("Bob Smith", *A0), ["question 'q1', answer 0 should be an object"]),
        (_set(5, *A0, "text"), ["question 'q1', answer 0", "field 'text' should be a string"]),
        (
            _set("28", *A0, "answer_start"),
            ["question 'q1'", "'answer_start' should be an integer, got a string"],
        ),
        (_set(True, *A0, "answer_start"), ["'answer_start' should be an integer, got a boolean"]),
        (_set(28.0, *A0, "answer_start"), ["'answer_start' should be an integer, got a number"]),
    ],
)
def test_malformed_structure(tmp_path, edit, fragments):
    obj = make_squad()
    edit(obj)
    with pytest.raises(DataError) as info:
        load_obj(tmp_path, obj)
    assert_one_line_error(info, tmp_path / "squad.json", *fragments, "SQuAD v1.1")


def test_error_in_later_question_names_its_id(tmp_path):
    obj = make_squad()
    del obj["data"][1]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"]
    with pytest.raises(DataError) as info:
        load_obj(tmp_path, obj)
    assert_one_line_error(info, tmp_path / "squad.json", "question 'q5'", "'answer_start'")


def test_duplicate_question_id(tmp_path):
    obj = make_squad()
    obj["data"][1]["paragraphs"][0]["qas"][1]["id"] = "q2"
    with pytest.raises(DataError) as info:
        load_obj(tmp_path, obj)
    assert_one_line_error(info, tmp_path / "squad.json", "'q2'", "more than once")


# --------------------------------------------------------------------------------------------------
# Counted skips and corrected offsets
# --------------------------------------------------------------------------------------------------


def test_question_without_answers_is_skipped_and_named(tmp_path):
    obj = make_squad()
    obj["data"][1]["paragraphs"][0]["qas"][0]["answers"] = []  # q3
    examples, report = load_obj(tmp_path, obj)
    assert [ex.id for ex in examples] == ["q1", "q2", "q4", "q5"]
    assert report.skipped == {"no answers": 1}
    assert report.skipped_ids == {"no answers": ["q3"]}
    assert report.n_questions_in_file == 5 and report.n_loaded == 4
    assert "no answers: 1 [q3]" in report.summary()


def test_answer_not_in_context(tmp_path):
    obj = make_squad()
    # q2: its only answer is not in the context -> question skipped
    obj["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [{"text": "1999", "answer_start": 21}]
    # q4: one bad answer among good ones -> the bad one is dropped, the question kept
    obj["data"][1]["paragraphs"][0]["qas"][1]["answers"].insert(0, {"text": "400 km", "answer_start": 0})
    examples, report = load_obj(tmp_path, obj, split="train")

    assert [ex.id for ex in examples] == ["q1", "q3", "q4", "q5"]
    q4 = examples[2]
    assert q4.answers == ("300 km", "300")
    assert q4.answer_starts == (CTX_BETA1.index("300"),) * 2
    assert report.skipped == {"answer not in context": 1}
    assert report.skipped_ids == {"answer not in context": ["q2"]}
    assert report.dropped_answers == 1
    assert "answer not in context: 1 [q2]" in report.summary()
    assert "dropped 1" in report.summary()
    assert report.kept_unlocated == 0 and "not found in their context" not in report.summary()


def test_an_answer_not_in_its_context_is_still_scored_outside_training(tmp_path):
    """The official v1.1 script scores a prediction against every gold answer as given: an evaluation or
    prediction file keeps the answers that do not occur in the context (no start), and says how many."""
    obj = make_squad()
    obj["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [{"text": "1999", "answer_start": 21}]
    obj["data"][1]["paragraphs"][0]["qas"][1]["answers"].insert(0, {"text": "400 km", "answer_start": 0})
    for split in ("dev", None):
        examples, report = load_obj(tmp_path, obj, **({"split": split} if split else {}))
        assert [ex.id for ex in examples] == ["q1", "q2", "q3", "q4", "q5"]
        assert examples[1].answers == ("1999",) and examples[1].answer_starts == (None,)
        assert examples[3].answers == ("400 km", "300 km", "300")
        assert examples[3].answer_starts == (None, CTX_BETA1.index("300"), CTX_BETA1.index("300"))
        assert report.skipped == {} and report.dropped_answers == 0 and report.kept_unlocated == 2
        assert "kept 2 answers not found in their context (scored as given)" in report.summary()
    from loraqa.metrics import squad_scores

    # scored as the official script scores it: the best match over all gold answers
    assert squad_scores({"q4": "400 km"}, {"q4": list(examples[3].answers)})["exact_match"] == 100.0


def test_empty_answer_text(tmp_path):
    obj = make_squad()
    first_qa(obj)["answers"] = [{"text": "", "answer_start": 0}, {"text": "  ", "answer_start": 3}]
    obj["data"][1]["paragraphs"][1]["qas"][0]["answers"].append({"text": "", "answer_start": 0})
    examples, report = load_obj(tmp_path, obj)
    assert [ex.id for ex in examples] == ["q2", "q3", "q4", "q5"]
    assert examples[-1].answers == ("farms",)
    assert report.skipped == {"empty answer": 1}
    assert report.skipped_ids == {"empty answer": ["q1"]}
    assert report.dropped_answers == 1


def test_mixed_unusable_answers_count_as_not_in_context(tmp_path):
    obj = make_squad()
    first_qa(obj)["answers"] = [{"text": "", "answer_start": 0}, {"text": "Lisbon", "answer_start": 0}]
    _, report = load_obj(tmp_path, obj, split="train")
    assert report.skipped == {"answer not in context": 1}


def test_wrong_answer_start_is_corrected_to_nearest_occurrence(tmp_path):
    obj = make_squad()
    # "Bob Smith" occurs at 29 and 49; 45 is nearer the second one, 31 the first.
    assert [CTX_ALPHA.index("Bob Smith"), CTX_ALPHA.index("Bob Smith", 30)] == [29, 49]
    first_qa(obj)["answers"] = [
        {"text": "Bob Smith", "answer_start": 45},
        {"text": "Bob Smith", "answer_start": 31},
        {"text": "Bob Smith", "answer_start": 49},  # already right: untouched
        {"text": "Bob Smith", "answer_start": 10_000},  # out of range
        {"text": "Bob Smith", "answer_start": -3},
    ]
    examples, report = load_obj(tmp_path, obj)
    assert examples[0].answer_starts == (49, 29, 49, 49, 29)
    assert report.fixed_offsets == 4
    assert report.skipped == {}
    assert "fixed 4 answer offsets" in report.summary()


def test_skipped_ids_keep_at_most_five(tmp_path):
    context = "Some text."
    qas = [{"id": f"n{i}", "question": "Why?", "answers": []} for i in range(8)]
    qas.append(qa("ok", "What?", context, "text"))
    obj = {"data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}
    examples, report = load_obj(tmp_path, obj)
    assert [ex.id for ex in examples] == ["ok"]
    assert report.skipped == {"no answers": 8}
    assert report.skipped_ids == {"no answers": ["n0", "n1", "n2", "n3", "n4"]}
    summary = report.summary()
    assert "\n" not in summary
    assert "loaded 1 of 9 questions" in summary
    assert "skipped 8" in summary and "n4, ..." in summary


def test_summary_of_clean_file(tmp_path):
    _, report = load_obj(tmp_path, make_squad())
    assert report.summary() == (
        "squad.json: loaded 5 of 5 questions (2 articles, 3 paragraphs); skipped 0; fixed 0 answer offsets"
    )


def test_input_is_not_modified(tmp_path):
    obj = make_squad()
    before = copy.deepcopy(obj)
    load_obj(tmp_path, obj)
    assert obj == before


# --------------------------------------------------------------------------------------------------
# Finding the data folder
# --------------------------------------------------------------------------------------------------


def make_data_dir(folder: Path, *splits: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        write_json(folder / data.SQUAD_FILES[split][0], make_squad())
    return folder


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download."""

    def refuse(*args, **kwargs):
        raise AssertionError("unexpected download")

    monkeypatch.setattr(data.squad, "download_squad", refuse)


def test_resolve_precedence_arg_env_cache(tmp_path, monkeypatch, no_download):
    arg_dir = make_data_dir(tmp_path / "arg", "train", "dev")
    env_dir = make_data_dir(tmp_path / "env", "train", "dev")
    cache_dir = make_data_dir(tmp_path / "cache", "train", "dev")
    monkeypatch.setattr(data.squad, "DEFAULT_CACHE_DIR", cache_dir)

    assert data.resolve_data_dir() == cache_dir
    monkeypatch.setenv("LORAQA_DATA_DIR", str(env_dir))
    assert data.resolve_data_dir() == env_dir
    assert data.resolve_data_dir(arg_dir) == arg_dir
    assert data.resolve_data_dir(str(arg_dir)) == arg_dir
    monkeypatch.setenv("LORAQA_DATA_DIR", "")  # empty counts as unset
    assert data.resolve_data_dir() == cache_dir


def test_resolve_cache_dir_env_overrides_default(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(data.squad, "DEFAULT_CACHE_DIR", tmp_path / "unused")
    custom = make_data_dir(tmp_path / "custom", "train", "dev")
    monkeypatch.setenv("LORAQA_CACHE_DIR", str(custom))
    assert data.resolve_data_dir() == custom


def test_default_cache_dir_follows_xdg(tmp_path):
    code = "from loraqa.data import DEFAULT_CACHE_DIR; print(DEFAULT_CACHE_DIR)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == tmp_path / "xdg" / "loraqa" / "squad"

    env.pop("XDG_CACHE_HOME")
    env["HOME"] = str(tmp_path / "home")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == tmp_path / "home" / ".cache" / "loraqa" / "squad"


def test_resolve_explicit_dir_never_downloads(tmp_path, monkeypatch, no_download):
    folder = make_data_dir(tmp_path / "mine", "dev")
    with pytest.raises(DataError) as info:
        data.resolve_data_dir(folder)
    assert_one_line_error(info, folder, "missing train-v1.1.json", "--data-dir", "LORAQA_DATA_DIR")

    monkeypatch.setenv("LORAQA_DATA_DIR", str(folder))
    with pytest.raises(DataError, match="from LORAQA_DATA_DIR"):
        data.resolve_data_dir()
    # asking only for the split that is there is fine
    assert data.resolve_data_dir(splits=["dev"]) == folder


def test_resolve_missing_folder(tmp_path, no_download):
    folder = tmp_path / "does-not-exist"
    with pytest.raises(DataError) as info:
        data.resolve_data_dir(folder)
    assert_one_line_error(info, folder, "no such folder", "LORAQA_DATA_DIR")
    folder.write_text("not a folder")
    with pytest.raises(DataError) as info:
        data.resolve_data_dir(folder)
    assert_one_line_error(info, folder, "a file, not a folder", "LORAQA_DATA_DIR")


def test_resolve_accepts_gzipped_files(tmp_path, no_download):
    folder = tmp_path / "gz"
    folder.mkdir()
    write_json(folder / "train-v1.1.json.gz", make_squad())
    write_json(folder / "dev-v1.1.json.gz", make_squad())
    assert data.resolve_data_dir(folder) == folder
    assert data.squad_path("dev", folder) == folder / "dev-v1.1.json.gz"


def test_resolve_cache_without_download(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("LORAQA_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError) as info:
        data.resolve_data_dir(download=False)
    assert_one_line_error(info, tmp_path / "empty-cache", "downloading is off", "LORAQA_DATA_DIR")


def test_squad_path_prefers_plain_json_and_needs_only_its_split(tmp_path, no_download):
    folder = make_data_dir(tmp_path / "d", "dev")
    write_json(folder / "dev-v1.1.json.gz", make_squad())
    assert data.squad_path("dev", folder) == folder / "dev-v1.1.json"
    with pytest.raises(DataError, match=r"missing train-v1\.1\.json"):
        data.squad_path("train", folder)
    with pytest.raises(DataError, match="unknown split"):
        data.squad_path("validation", folder)


# --------------------------------------------------------------------------------------------------
# Downloading (from a real HTTP server on 127.0.0.1)
# --------------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www over HTTP; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}/squad"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def publish(root: Path, split: str, monkeypatch, *, checksum: str | None = None) -> bytes:
    """Put a synthetic file for `split` on the server and make SQUAD_FILES expect its sha256."""
    name, url, _ = data.SQUAD_FILES[split]
    payload = json.dumps(make_squad()).encode()
    (root / "squad").mkdir(exist_ok=True)
    (root / "squad" / name).write_bytes(payload)
    monkeypatch.setitem(data.SQUAD_FILES, split, (name, url, checksum or hashlib.sha256(payload).hexdigest()))
    return payload


def test_download_success(tmp_path, server, monkeypatch):
    root, base_url = server
    payload = publish(root, "dev", monkeypatch)
    dest_dir = tmp_path / "cache" / "nested"  # created on demand

    path = data.download_squad("dev", dest_dir, base_url=base_url + "/")
    assert path == dest_dir / "dev-v1.1.json"
    assert path.read_bytes() == payload
    assert sorted(p.name for p in dest_dir.iterdir()) == ["dev-v1.1.json"]  # no temp file left
    assert len(load_squad(path)[0]) == 5


def test_download_uses_env_base_url(tmp_path, server, monkeypatch):
    root, base_url = server
    publish(root, "train", monkeypatch)
    monkeypatch.setenv("LORAQA_SQUAD_URL", base_url)
    assert data.download_squad("train", tmp_path).name == "train-v1.1.json"


def test_download_checksum_mismatch_leaves_nothing(tmp_path, server, monkeypatch):
    root, base_url = server
    publish(root, "dev", monkeypatch, checksum="0" * 64)
    dest_dir = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        data.download_squad("dev", dest_dir, base_url=base_url)
    got = hashlib.sha256((root / "squad" / "dev-v1.1.json").read_bytes()).hexdigest()
    assert_one_line_error(info, dest_dir / "dev-v1.1.json", "sha256", f"expected {'0' * 64}", f"got {got}")
    assert list(dest_dir.iterdir()) == []


def test_download_http_404(tmp_path, server, monkeypatch):
    _, base_url = server  # nothing published
    dest_dir = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        data.download_squad("dev", dest_dir, base_url=base_url)
    assert_one_line_error(info, dest_dir, "download", "failed", "HTTP 404", "--data-dir", "LORAQA_DATA_DIR")
    assert f"{base_url}/dev-v1.1.json" in str(info.value)
    assert list(dest_dir.iterdir()) == []


def test_download_connection_refused(tmp_path):
    with socket.socket() as sock:  # find a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError, match="download from .* failed") as info:
        data.download_squad("dev", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5)
    assert "LORAQA_DATA_DIR" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_download_unknown_split(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        data.download_squad("test", tmp_path)


def test_cache_downloads_missing_files_once(tmp_path, server, monkeypatch):
    root, base_url = server
    publish(root, "dev", monkeypatch)
    publish(root, "train", monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAQA_CACHE_DIR", str(cache))

    assert data.squad_path("dev", base_url=base_url) == cache / "dev-v1.1.json"
    assert sorted(p.name for p in cache.iterdir()) == ["dev-v1.1.json"]  # only the split asked for
    assert data.resolve_data_dir(base_url=base_url) == cache
    assert sorted(p.name for p in cache.iterdir()) == ["dev-v1.1.json", "train-v1.1.json"]

    # now everything is cached: no further download
    monkeypatch.setattr(data.squad, "download_squad", lambda *a, **k: pytest.fail("downloaded again"))
    assert data.squad_path("train") == cache / "train-v1.1.json"


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Who founded Alpha?", "who"),
        ("what is Beta?", "what"),
        ("What's the name of the river?", "what"),
        ("When was it built?", "when"),
        ("Where is Paris?", "where"),
        ("Why did he leave?", "why"),
        ("How many farms are there?", "how"),
        ("Which river flows north?", "which"),
        ("In which year, and by whom, was it founded?", "which"),  # first wh-word in the question
        ("The river that flows north is what?", "what"),
        ("Name the founder who moved to Rome.", "who"),
        ("Howard Smith founded what company?", "what"),  # "Howard" is not "how"
        ("Whom did she marry?", "other"),
        ("Name the river.", "other"),
        ("", "other"),
    ],
)
def test_question_type(question, expected):
    assert data.question_type(question) == expected


def ex(qid: str, title: str, context: str, question: str, answer: str) -> Example:
    return Example(qid, title, context, question, (answer, "other answer words here"), (0, 0))


HAND_MADE = [
    # title, context (words), question (words), first answer (words)
    ex("a", "T1", "one two three four", "Who is it?", "one"),  # 4, 3, 1
    ex("b", "T1", "one two three four", "What is the thing?", "one two"),  # 4, 4, 2
    ex("c", "T1", "five six", "When?", "five six"),  # 2, 1, 2
    ex("d", "T2", "one two three four", "Name it", "three"),  # 4, 2, 1 -- same context, other title
]


def test_dataset_stats_known_values():
    stats = data.dataset_stats(HAND_MADE)
    assert stats["questions"] == 4
    assert stats["articles"] == 2
    assert stats["paragraphs"] == 3  # distinct (title, context)
    assert stats["mean_question_words"] == pytest.approx((3 + 4 + 1 + 2) / 4)
    assert stats["mean_answer_words"] == pytest.approx((1 + 2 + 2 + 1) / 4)
    assert stats["mean_context_words"] == pytest.approx((4 + 4 + 2 + 4) / 4)
    shares = stats["question_types"]
    assert list(shares) == list(data.QUESTION_TYPES)
    assert shares == {
        "who": 0.25,
        "what": 0.25,
        "when": 0.25,
        "where": 0.0,
        "why": 0.0,
        "how": 0.0,
        "which": 0.0,
        "other": 0.25,
    }


def test_dataset_stats_empty():
    stats = data.dataset_stats([])
    assert stats["questions"] == stats["articles"] == stats["paragraphs"] == 0
    assert stats["mean_question_words"] == 0.0
    assert sum(stats["question_types"].values()) == 0.0


def test_dataset_stats_of_loaded_file(tmp_path):
    examples, _ = load_obj(tmp_path, make_squad())
    stats = data.dataset_stats(examples)
    assert (stats["questions"], stats["articles"], stats["paragraphs"]) == (5, 2, 3)
    assert sum(stats["question_types"].values()) == pytest.approx(1.0)


def test_format_stats_table_contains_the_numbers():
    small = data.dataset_stats(HAND_MADE)
    one = data.dataset_stats(HAND_MADE[:1])
    table = data.format_stats_table({"train": small, "dev": one})
    lines = table.splitlines()

    assert lines[0].split("|")[2:4] == [" train ", "   dev "]
    assert set(lines[1]) <= {"|", "-", ":"}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in lines[2:]}
    assert rows["questions"] == ["4", "1"]
    assert rows["articles"] == ["2", "1"]
    assert rows["paragraphs"] == ["3", "1"]
    assert rows["mean question words"] == ["2.5", "3.0"]
    assert rows["mean answer words"] == ["1.5", "1.0"]
    assert rows["mean context words"] == ["3.5", "4.0"]
    assert rows["who (%)"] == ["25.0", "100.0"]
    assert rows["other (%)"] == ["25.0", "0.0"]
    assert [label for label in rows if label.endswith("(%)")] == [f"{t} (%)" for t in data.QUESTION_TYPES]
    assert len({len(line) for line in lines}) == 1  # columns are aligned
