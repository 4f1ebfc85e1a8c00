"""The one answering path: load a model, answer questions, score those with gold answers, write the results.

Every command that answers goes through it: ``train`` (its final evaluation), ``eval`` (:func:`eval_zero_shot`,
:func:`eval_run_dir`), ``predict`` and ``ask`` (:mod:`loraqa.predict`, the file side), ``export`` (it loads the
run as this path does) and ``serve``. In stage order:

* **load**: :func:`load_answerer` gives an :class:`Answerer`, a model ready to generate with the config it
  answers under: a trained run folder's (through :func:`loraqa.model.load_run`) or, zero-shot, a base model's
  (:func:`load_base`);
* **answer**: :meth:`Answerer.answer` runs :func:`answer` under the config's sections: prompts
  (:mod:`loraqa.prompt`), greedy answers (:mod:`loraqa.generate`, batch-invariant or batched, extractive or
  free), every process's share gathered, timed, and kept as they come (:mod:`loraqa.journal`) when answering
  into a folder;
* **score**: :func:`loraqa.metrics.score_predictions` on the questions that have gold answers (none: a summary
  that scores nothing);
* **write**: :func:`write_results` (``predictions.jsonl``, ``predictions.json``, a trained run's model card,
  ``metrics.json`` last).

The same question gets the same answer on every one of these paths: the prompt, the generation settings and
the model are the run's own wherever it is answered.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import dist
from .config import ConfigError, EvalConfig, ExperimentConfig, apply_overrides
from .data import Example
from .devices import peak_memory_mb
from .generate import Decoding, generate_answers, generate_answers_invariant, stop_token_ids
from .journal import AnswerJournal, fingerprint
from .layout import (
    ANSWER_JOURNAL_FILE,
    ANSWER_JOURNALS,
    CONFIG_FILE,
    LOG_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    TRAIN_METRICS_FILE,
    rank_journal,
)
from .metrics import ZERO_SHOT, score_predictions
from .prompt import PromptEncoder, PromptStats

# ---------------------------------------------------------------------------------------------- load


@dataclass
class Answerer:
    """A model ready to generate, with the config it answers under (a trained run's own, or the defaults with
    ``model.name``, zero-shot); :func:`load_answerer` adds the precision and device it loaded it in."""

    cfg: ExperimentConfig
    model: object
    tokenizer: object
    precision: str | None = None  # "bf16" or "fp32"; None: a model loaded elsewhere (training's)
    device: object = None

    def answer(self, examples: Sequence[Example], progress: bool = False, journal: Path | None = None):
        """Per-question records and the EM/F1 summary over the questions that have gold answers (:func:`answer`
        under the config's ``eval`` section, its prompt length and its no-answer text)."""
        return answer(
            self.model,
            self.tokenizer,
            examples,
            self.cfg.eval,
            max_length=self.cfg.prompt.max_length,
            progress=progress,
            unanswerable_answer=self.cfg.data.no_answer_text(),
            journal=journal,
        )

    def prompt_length(self) -> int:
        """The prompt tokens it answers from (:func:`prompt_length`)."""
        return prompt_length(self.model, self.cfg.prompt.max_length, self.cfg.eval.max_new_tokens)


def load_answerer(
    run_dir: str | Path | None = None,
    *,
    model: str | None = None,
    device: str | None = None,
    overrides: Sequence[tuple[str, object]] = (),
) -> Answerer:
    """A trained run folder (its config changed by ``overrides``), or with ``model`` and no run the base model
    zero-shot under the default config (changed by ``overrides``)."""
    if run_dir:
        if model:
            raise ConfigError("give a run folder or --model (zero-shot), not both")
        from .model import load_run

        run = load_run(run_dir, overrides=list(overrides), device=device)
        return Answerer(run.cfg, run.model, run.lm.tokenizer, run.lm.precision, run.lm.device)
    if not model:
        raise ConfigError(
            "give a run folder made by `loraqa train`, or --model NAME to ask a base model zero-shot"
        )
    return load_base(apply_overrides(ExperimentConfig(), [("model.name", model), *overrides]), device)


def load_base(cfg: ExperimentConfig, device: str | None = None) -> Answerer:
    """``cfg``'s base model, not fine-tuned (zero-shot), ready to generate."""
    from .model import load_model, prepare_for_generation

    lm = load_model(cfg.model, device)
    return Answerer(
        cfg, prepare_for_generation(lm.model, precision=lm.precision), lm.tokenizer, lm.precision, lm.device
    )


# ---------------------------------------------------------------------------------------------- answer


def prompt_length(model, max_length: int, max_new_tokens: int) -> int:
    """The prompt tokens an answer is generated from: ``max_length``, less the room for the answer where the
    model's positions would not hold both (the answer comes after the prompt)."""
    from .model import position_limit

    limit = position_limit(model)
    check_answer_room(limit, max_new_tokens)
    if limit is not None and max_length + max_new_tokens > limit:
        return limit - max_new_tokens
    return max_length


def check_answer_room(limit: int | None, max_new_tokens: int) -> None:
    """Refuse an answer as long as the model's positions (``limit``): no prompt would fit before it."""
    if limit is not None and max_new_tokens >= limit:
        raise ConfigError(
            f"eval.max_new_tokens: {max_new_tokens} leaves no room for a prompt in the {limit} positions the model "
            "takes; give far fewer (an answer is a few tokens)"
        )


def answer(
    model,
    tokenizer,
    examples: Sequence[Example],
    eval_cfg: EvalConfig,
    *,
    max_length: int = 512,
    progress: bool = True,
    unanswerable_answer: str | None = None,
    journal: Path | None = None,
) -> tuple[list[dict], dict]:
    """Greedy answers to ``examples`` as ``eval_cfg`` says, scored by SQuAD EM/F1 (the v2.0 rules with
    ``unanswerable_answer``); returns per-question records and a summary with ``exact_match``, ``f1``,
    ``n_questions`` (questions with gold answers, the ones scored), ``eval_seconds``,
    ``eval_questions_per_second``, ``eval_prompts_truncated``, ``eval_questions_cut`` (a question alone over the
    prompt length: its end kept, no context).

    Under several processes each answers a contiguous share of ``examples`` and every process gets all the
    answers back, in the order of ``examples``; the time is until the last share is in.

    With ``journal`` (a file path: a run folder's ``ANSWER_JOURNAL_FILE``) the answers are kept there as they
    come (:mod:`loraqa.journal`): answering interrupted midway resumes at its next batch when called again, its
    time counting both parts."""
    share = dist.shard(len(examples))
    stats = PromptStats()
    encoder = PromptEncoder(tokenizer, max_length=prompt_length(model, max_length, eval_cfg.max_new_tokens))
    parts = [encoder.encode_prompt_parts(ex.context, ex.question, stats) for ex in examples][share]
    prompts = [c + q for c, q in parts]
    # extractive: every answer a piece of its paragraph as written (a decoded context can differ from it in
    # spaces the tokenizer cleans up)
    contexts = [ex.context for ex in examples][share] if eval_cfg.extractive else None
    # a SQuAD 2.0 run's no-answer is no piece of any paragraph, and must stay an answer the model can give
    also = (unanswerable_answer,) if unanswerable_answer and contexts is not None else ()
    kept = _open_journal(journal, model, tokenizer, prompts, eval_cfg, also) if journal else None
    resume = {"done": kept.done, "on_batch": kept.record} if kept else {}
    decoding = Decoding(eval_cfg.max_new_tokens, contexts, also_allowed=also, progress=progress, **resume)
    start = time.perf_counter()
    answers = dist.gather_lists(
        _generate(model, tokenizer, prompts, [len(c) for c, _ in parts], eval_cfg, decoding)
    )
    seconds = time.perf_counter() - start + (kept.seconds_before if kept else 0.0)
    if kept:  # removed by the writer of the results (write_results, predict_file) once they are written
        kept.close()
    records, summary = score_predictions(examples, answers, unanswerable_answer)
    summary.update(
        eval_seconds=round(seconds, 3),
        eval_questions_per_second=round(len(examples) / seconds, 3) if seconds > 0 else None,
        eval_prompts_truncated=stats.truncated,
        eval_questions_cut=stats.questions_cut,
    )
    return records, summary


def _generate(model, tokenizer, prompts, context_ends: list[int], eval_cfg: EvalConfig, decoding: Decoding):
    """This process's answers, by the generator ``eval_cfg.batch_invariant`` picks."""
    if eval_cfg.batch_invariant:
        return generate_answers_invariant(model, tokenizer, prompts, context_ends, decoding)
    return generate_answers(
        model,
        tokenizer,
        prompts,
        decoding,
        batch_size=eval_cfg.batch_size,
        sort_by_length=eval_cfg.sort_by_length,
        share_prefixes=eval_cfg.share_prefixes,
        prune_finished=eval_cfg.prune_finished,
    )


def _open_journal(
    journal: Path, model, tokenizer, prompts: list[list[int]], eval_cfg: EvalConfig, also_allowed=()
) -> AnswerJournal:
    """This process's share of ``journal``, keyed by the model, the prompts and every generation setting."""
    settings = {
        **dataclasses.asdict(eval_cfg),
        "tokenizer": type(tokenizer).__name__,
        "vocab": len(tokenizer),
        "stops": stop_token_ids(tokenizer),
        **({"also_allowed": list(also_allowed)} if also_allowed else {}),
    }
    path = rank_journal(Path(journal), dist.rank(), dist.world_size())
    return AnswerJournal(path, fingerprint(model, prompts, settings))


def asked(context: str, questions: Sequence[str], prefix: str = "q") -> list[Example]:
    """Questions typed in about one paragraph, as examples without gold answers (answered, never scored), with
    the ids ``{prefix}0``, ``{prefix}1``, ..."""
    return [Example(f"{prefix}{i}", "", context, q, (), ()) for i, q in enumerate(questions)]


def generated_text(record: dict) -> str:
    """The text the model gave for one question: a SQuAD 2.0 run's no-answer text as it is, not the official
    ``""`` its ``prediction`` holds."""
    return record.get("generated", record["prediction"])


# ---------------------------------------------------------------------------------------------- write


def write_results(
    folder: Path,
    records: list[dict],
    metrics: dict,
    cfg: ExperimentConfig | None = None,
    *,
    card: str | None = None,
) -> dict:
    """From the main process: ``cfg`` as ``config.yaml`` when given (an evaluation that is no trained run's),
    ``predictions.jsonl`` and ``predictions.json``, the model ``card`` when given (a trained run's), then
    ``metrics.json``, last: its presence means the evaluation (or the run) is done; then the answer journals go.
    Returns the main process's ``metrics`` on every process."""
    return dist.on_main(_write_results, Path(folder), records, metrics, cfg, card)


def _write_results(folder: Path, records: list[dict], metrics: dict, cfg, card: str | None) -> dict:
    from .io import write_json_atomic, write_text_atomic
    from .runfolder import write_predictions

    if cfg is not None:
        write_text_atomic(folder / CONFIG_FILE, cfg.to_yaml())
    write_predictions(folder, records)
    if card is not None:
        write_text_atomic(folder / MODEL_CARD_FILE, card)
    write_json_atomic(folder / METRICS_FILE, metrics)
    for journal in folder.glob(ANSWER_JOURNALS):  # every process's: its answers are in the files now
        journal.unlink(missing_ok=True)
    return metrics


# ---------------------------------------------------------------------------------------------- loraqa eval


def dev_questions(cfg: ExperimentConfig) -> list[Example]:
    """The dev questions an evaluation under ``cfg`` scores (``data.eval_skip``, ``data.eval_limit``)."""
    from .data import evaluated, evaluated_read_limit, load_split

    dev, _, _ = load_split(cfg.data, "dev", limit=evaluated_read_limit(cfg.data))
    return evaluated(cfg.data, dev)


def eval_zero_shot(
    cfg: ExperimentConfig, out_dir, *, device: str | None = None, progress: bool = True
) -> dict:
    """Score the base model (no fine-tuning) with the same prompt; writes ``config.yaml``, the predictions and
    ``metrics.json`` into ``out_dir`` and returns the metrics."""
    from .model import count_parameters
    from .runfolder import make_run_folder

    out_dir = Path(out_dir)
    if any((out_dir / f).exists() for f in (LOG_FILE, TRAIN_METRICS_FILE)):  # a trained run's own results
        raise ConfigError(
            f"{out_dir}: holds a trained run; pick another --output-dir for the zero-shot results"
        )
    # a file or an impossible path as --output-dir: one line, before any work
    dist.on_main(make_run_folder, out_dir)
    dev = dev_questions(cfg)
    answerer = load_base(cfg, device)
    records, summary = answerer.answer(dev, progress=progress, journal=out_dir / ANSWER_JOURNAL_FILE)
    _, total = count_parameters(answerer.model)
    metrics = {
        **summary,
        "trainable_params": 0,
        "total_params": total,
        "model": cfg.model.name,
        "method": ZERO_SHOT,
        "precision": answerer.precision,
        "device": str(answerer.device),
        "peak_memory_mb": round(peak_memory_mb(answerer.device), 1),
    }
    write_results(out_dir, records, metrics, cfg)
    return metrics


def eval_run_dir(
    run_dir,
    *,
    overrides: Sequence[tuple[str, object]] | None = None,
    out_dir=None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Re-score a trained run folder (its adapter or full model) on the dev questions, its config changed by
    ``overrides`` (``[("data.eval_limit", 100)]``); writes the predictions and ``metrics.json`` into ``out_dir``
    (default: ``eval-<n>`` inside the run folder) and returns the metrics."""
    from .runfolder import make_run_folder

    run_dir = Path(run_dir)
    if out_dir is not None:  # checked before any loading; the run's own metrics.json is never replaced
        _check_eval_out(run_dir, Path(out_dir))
        dist.on_main(make_run_folder, Path(out_dir))
    answerer = load_answerer(run_dir, overrides=list(overrides or []), device=device)
    cfg = answerer.cfg
    dev = dev_questions(cfg)
    out = Path(out_dir) if out_dir else run_dir / f"eval-{len(dev)}"
    dist.on_main(make_run_folder, out)
    records, summary = answerer.answer(dev, progress=progress, journal=out / ANSWER_JOURNAL_FILE)
    metrics = {
        **summary,
        "model": cfg.model.name,
        "precision": answerer.precision,
        "device": str(answerer.device),
    }
    write_results(out, records, metrics)
    return metrics


def _check_eval_out(run_dir: Path, out_dir: Path) -> None:
    """``-o`` of ``loraqa eval RUN_DIR`` must be neither the run folder nor any run's folder."""
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError(f"{out_dir}: is the run folder itself; pick another -o (default: RUN_DIR/eval-N)")
    if (out_dir / CONFIG_FILE).is_file():  # a run's or a zero-shot evaluation's own results
        raise ConfigError(
            f"{out_dir}: holds a run ({CONFIG_FILE}); pick another -o (default: RUN_DIR/eval-N)"
        )
