"""loraqa predict / ask on a tiny trained run: the same answers as the run's own evaluation, batched."""

from __future__ import annotations

import json

import pytest

from helpers import train_tiny_run
from loraqa.cli import main
from loraqa.data import load_squad


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic_dir):
    # the adapter changes the answers (checked below)
    return train_tiny_run(tmp_path_factory.mktemp("predict") / "run", synthetic_dir)


def run_predictions(run) -> dict:
    return json.loads((run / "predictions.json").read_text())


def test_the_trained_adapter_changes_the_answers(tiny_run, synthetic_dir, tmp_path):
    # the control for every "answers like the run" test here: the same run with its adapter zeroed (LoRA B = 0,
    # the base model exactly) answers otherwise
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    shutil.copytree(tiny_run, bare)
    weights = load_file(bare / "adapter_model.safetensors")
    assert any("lora_B" in k for k in weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              bare / "adapter_model.safetensors")  # fmt: skip
    out = tmp_path / "bare.jsonl"
    assert main(["predict", str(bare), "-i", str(synthetic_dir / "dev-v1.1.json"), "-o", str(out)]) == 0
    base = {json.loads(x)["id"]: json.loads(x)["answer"] for x in out.read_text().splitlines()}
    run = run_predictions(tiny_run)
    assert sum(base[i] != answer for i, answer in run.items()) >= len(run) // 2


def test_predict_jsonl_answers_like_the_run_and_scores(tiny_run, synthetic_dir, tmp_path, capsys):
    dev, _ = load_squad(synthetic_dir, split="dev", limit=6)
    src = tmp_path / "dev.jsonl"
    src.write_text("".join(json.dumps({"id": e.id, "context": e.context, "question": e.question,
                                       "answers": list(e.answers)}) + "\n" for e in dev))  # fmt: skip
    capsys.readouterr()
    assert main(["predict", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.id for e in dev] and set(rows[0]) == {"id", "answer"}
    assert {r["id"]: r["answer"] for r in rows} == run_predictions(tiny_run)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert (
        f"EM {metrics['exact_match']:.2f}  F1 {metrics['f1']:.2f}  on 6 questions" in capsys.readouterr().out
    )


def test_predict_without_gold_answers_and_from_squad_json(tiny_run, synthetic_dir, tmp_path, capsys):
    dev, _ = load_squad(synthetic_dir, split="dev", limit=6)
    src = tmp_path / "q.csv"
    src.write_text("id,context,question\n" + "".join(f'{e.id},"{e.context}","{e.question}"\n' for e in dev))
    assert (
        main(["predict", str(tiny_run), "-i", str(src), "-o", str(tmp_path / "a.jsonl"), "--batch-size", "2"])
        == 0
    )
    assert "not scored" in capsys.readouterr().err
    answers = {
        json.loads(x)["id"]: json.loads(x)["answer"] for x in (tmp_path / "a.jsonl").read_text().splitlines()
    }
    assert answers == run_predictions(tiny_run)
    # the whole SQuAD dev file: every question answered
    out = tmp_path / "all.jsonl"
    assert main(["predict", str(tiny_run), "-i", str(synthetic_dir / "dev-v1.1.json"), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 16


def test_predict_answers_questions_whose_answers_are_empty_lists_too(tmp_path, capsys):
    """A datasets export of SQuAD 2.0 gives unanswerable questions empty answer lists: each is answered, in
    order, and only those with a gold answer are scored."""
    context = "The kite in the harbor is green."
    answers = {"a": [], "b": {"text": [], "answer_start": []}, "c": [""], "d": None, "e": ["green"]}
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": k, "context": context, "question": "What color is the kite?",
                                       **({"answers": v} if v is not None else {})}) + "\n"
                           for k, v in answers.items()))  # fmt: skip
    out = tmp_path / "a.jsonl"
    assert main(["predict", "--model", "tiny-random-gpt2", "-i", str(src), "-o", str(out)]) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == list(answers)
    assert "on 1 questions with gold answers" in capsys.readouterr().out  # the one with a gold answer is scored


def test_ask_reads_a_context_file_as_written_but_its_last_line_end(tmp_path, monkeypatch, capsys):
    """SQuAD keeps contexts that begin or end with spaces; a prompt of the stripped text would differ from
    predict's and the run's, and so could the answer. A byte-order mark and the final newline go."""
    from loraqa import cli, predict

    seen = []
    monkeypatch.setattr(cli, "_answerer", lambda args, device=None: None)
    monkeypatch.setattr(predict, "ask", lambda answerer, questions, context: seen.append(context) or ["x"])
    (tmp_path / "para.txt").write_bytes("\ufeff Seamans' paragraph. \n".encode())
    assert main(["ask", "--model", "tiny-random-gpt2", "-q", "Who?", "-c", f"@{tmp_path / 'para.txt'}"]) == 0
    assert seen == [" Seamans' paragraph. "]


def test_ask_answers_like_the_run(tiny_run, synthetic_dir, tmp_path, capsys):
    dev, _ = load_squad(synthetic_dir, split="dev", limit=2)
    (tmp_path / "para.txt").write_text(dev[0].context + "\n")
    capsys.readouterr()
    assert (
        main(["ask", str(tiny_run), "--question", dev[0].question, "--context", f"@{tmp_path / 'para.txt'}"])
        == 0
    )
    assert capsys.readouterr().out == run_predictions(tiny_run)[dev[0].id] + "\n"
    # several questions at once: one line each, question TAB answer
    assert (
        main(["ask", str(tiny_run), "-q", dev[0].question, "-q", dev[1].question, "-c", dev[0].context]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == f"{dev[0].question}\t{run_predictions(tiny_run)[dev[0].id]}"


def test_ask_zero_shot_and_clear_errors(capsys, tmp_path):
    assert main(["ask", "--model", "tiny-random-gpt2", "-q", "What color?", "-c", "The box is red."]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["ask", "-q", "What?", "-c", "x"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["ask", "--model", "tiny-random-gpt2", "-q", "What?", "-c", f"@{tmp_path / 'none.txt'}"]) == 2
    err = capsys.readouterr().err
    assert "none.txt" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", str(tmp_path), "-i", "x.jsonl", "-o", "y.jsonl"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_a_context_longer_than_the_prompt_takes_is_read_in_part_and_said_so(caplog):
    """`ask` (and `predict`) keep the beginning of a context the model cannot take whole, with a warning."""
    from loraqa.answering import load_answerer
    from loraqa.predict import ask

    answerer = load_answerer(None, model="tiny-random-gpt2", device="cpu")
    with caplog.at_level("WARNING", logger="loraqa.predict"):
        assert len(ask(answerer, ["What color?"], "The box is red. " * 400)) == 1
    assert "1 question(s) had a context longer than the model's prompt takes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="loraqa.predict"):
        ask(answerer, ["What color?"], "The box is red.")
    assert "longer than" not in caplog.text


def test_predict_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "question": "q"}\n')
    assert (
        main(["predict", str(tiny_run), "-i", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o.jsonl")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl: line 1 (id 'x'): missing field 'context'" in err


# bad input refused before any model loads: none of these needs a trained run (the run folder is never read)

QUESTION = '{"id": "a", "context": "The box is red.", "question": "What color?"}\n'
ZERO_SHOT = ["predict", "--model", "tiny-random-gpt2"]


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loraqa: error: ")
    return err


def test_predict_never_writes_over_its_input_or_the_run(tmp_path, capsys):
    src = tmp_path / "q.jsonl"
    src.write_text(QUESTION)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("kept: true\n")
    (tmp_path / "link.jsonl").hardlink_to(src)
    for out in (src, tmp_path / "sub" / ".." / "q.jsonl", tmp_path / "link.jsonl"):
        assert main(["predict", str(run), "-i", str(src), "-o", str(out)]) == 2
        assert f"--output {out} is the --input file; pick another path" in one_error(capsys)
    for name in ("config.yaml", "new.jsonl"):
        assert main(["predict", str(run), "-i", str(src), "-o", str(run / name)]) == 2
        assert f"--output {run / name} lies inside the run folder {run}; pick a path outside it" in one_error(
            capsys
        )
    assert src.read_text() == QUESTION and (run / "config.yaml").read_text() == "kept: true\n"
    assert not (run / "new.jsonl").exists()


def test_predict_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(QUESTION)
    (tmp_path / "pin").mkdir()
    args = [*ZERO_SHOT, "-i", str(tmp_path / "q.jsonl"), "-o", str(tmp_path / "pin")]
    assert main(args) == 2
    assert f"--output {tmp_path / 'pin'}: is a folder; give a file path" in one_error(capsys)


@pytest.mark.parametrize(
    "name,text",
    [
        ("e.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("e.json", ""),
        ("e.csv", ""),
        ("d.json", '{"version": "1.1", "data": []}'),
        ("h.csv", "id,context,question\n"),
    ],
)
def test_predict_input_without_questions_is_an_error(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    args = [*ZERO_SHOT, "-i", str(tmp_path / name), "-o", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert one_error(capsys) == f"loraqa: error: {tmp_path / name}: no questions"
    assert not (tmp_path / "o.jsonl").exists()


def test_predict_batch_size_zero_is_refused_like_a_negative_one(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(QUESTION)
    base = [*ZERO_SHOT, "-i", str(tmp_path / "q.jsonl"), "-o", str(tmp_path / "o")]
    for size in ("0", "-3"):
        assert main([*base, "--batch-size", size]) == 2
        assert f"eval.batch_size: must be > 0, got {size}" in one_error(capsys)


def test_predict_csv_error_quotes_a_short_header(tmp_path, capsys):
    src = tmp_path / "big.json"
    src.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "x" * 5000, "qas": []}]}]}))
    args = [*ZERO_SHOT, "-i", str(src), "-o", str(tmp_path / "o"), "--format", "csv"]
    assert main(args) == 2
    err = one_error(capsys)
    assert "no 'id', 'context', 'question' column (header: {\"data\": " in err and "...); expected" in err
    assert len(err) < len(str(src)) + 300  # not the 5000-character file


@pytest.mark.parametrize(
    "questions,which",
    [([""], "--question"), (["  \t"], "--question"), (["What?", " "], "--question 2 (of 2)")],
)
def test_ask_empty_question_is_refused(capsys, questions, which):
    args = ["ask", "--model", "tiny-random-gpt2", "-c", "The box is red."]
    assert main([*args, *(x for q in questions for x in ("-q", q))]) == 2
    assert (
        one_error(capsys) == f"loraqa: error: {which} is empty; ask a question about the --context paragraph"
    )


def test_predict_interrupted_midway_answers_only_the_rest_when_rerun(
    tiny_run, synthetic_dir, tmp_path, monkeypatch, capsys
):
    """``loraqa predict`` keeps its answers beside the output as they come: a rerun of the same command after a
    stop answers only the questions not kept, and writes what an uninterrupted run writes."""
    from loraqa.journal import AnswerJournal
    from loraqa.layout import prediction_journal

    src = synthetic_dir / "dev-v1.1.json"
    whole = tmp_path / "whole.jsonl"
    assert main(["predict", str(tiny_run), "-i", str(src), "-o", str(whole), "--batch-size", "2"]) == 0
    real, answered = AnswerJournal.record, []

    def stop_after_two(self, idx, answers):
        real(self, idx, answers)
        answered.extend(idx)
        if len(answered) >= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(AnswerJournal, "record", stop_after_two)
    out = tmp_path / "out" / "answers.jsonl"  # a folder not made yet
    assert main(["predict", str(tiny_run), "-i", str(src), "-o", str(out), "--batch-size", "2"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert prediction_journal(out).is_file() and not out.exists()
    kept = len(answered)
    monkeypatch.setattr(
        AnswerJournal, "record", lambda self, idx, a: answered.extend(idx) or real(self, idx, a)
    )
    answered.clear()
    assert main(["predict", str(tiny_run), "-i", str(src), "-o", str(out), "--batch-size", "2"]) == 0
    total = len(whole.read_text().splitlines())
    assert len(answered) == total - kept  # only the rest answered
    assert out.read_text() == whole.read_text() and not prediction_journal(out).exists()
