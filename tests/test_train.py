"""Training end to end on the tiny random GPT-2: the run folder, memorisation, determinism, resume."""

import json
import os
import shutil
import signal

import pytest
import torch

from loraqa.answering import eval_run_dir, eval_zero_shot
from loraqa.batching import QACollator
from loraqa.config import ExperimentConfig, apply_overrides
from loraqa.data import make_synthetic_squad
from loraqa.pipeline import run_experiment
from loraqa.prompt import IGNORE_INDEX


def tiny_config(data_dir, **overrides) -> ExperimentConfig:
    base = {
        "model.name": "tiny-random-gpt2", "model.precision": "fp32", "data.data_dir": str(data_dir),
        "data.train_limit": 16, "data.eval_limit": 8, "data.loss_eval_limit": 4, "train.max_steps": 4,
        "train.batch_size": 4, "train.warmup_steps": 0, "train.eval_steps": 2, "train.save_steps": 2,
        "train.logging_steps": 1, "eval.batch_size": 4, "eval.max_new_tokens": 4,
    }  # fmt: skip
    base.update(overrides)
    return apply_overrides(ExperimentConfig(), list(base.items()))


def step_probe():
    """A callback that watches the first decoder layer's MLP in training forwards: how many ran, and whether bf16
    autocast was on. What a run's metrics cannot show: that a switch really reached the Trainer."""
    from transformers import TrainerCallback

    from loraqa.loss import decoder_layers

    class StepProbe(TrainerCallback):
        def __init__(self):
            self.forwards, self.steps, self.autocast = 0, 0, set()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # on the MLP: a hook on the layer itself stays outside transformers' checkpoint
            decoder_layers(model)[0].mlp.register_forward_pre_hook(self._seen)

        def _seen(self, module, inputs):
            if module.training:
                self.forwards += 1
                self.autocast.add(torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepProbe()


def test_collator_pads_right_and_masks_padding():
    batch = QACollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_run_folder_holds_everything_and_the_adapter_loads(tmp_path, synthetic_dir):
    from peft import PeftModel

    from loraqa.model import load_base_model

    run = tmp_path / "run"
    metrics = run_experiment(tiny_config(synthetic_dir), run, progress=False)
    for name in ("config.yaml", "log_history.jsonl", "adapter_config.json", "adapter_model.safetensors",
                 "predictions.jsonl", "metrics.json", "train_metrics.json"):  # fmt: skip
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()  # removed once the adapter is saved
    assert not list(run.glob("answers.partial*"))  # the answer journal: removed once the results are written
    assert metrics["n_questions"] == 8 and metrics["train_steps"] == 4
    # model.attn_implementation=auto: eager_lean to train on a CPU (one row of segments a batch), sdpa on a GPU
    attn = "sdpa" if torch.cuda.is_available() else "eager_lean"
    assert metrics["train_attn_implementation"] == attn
    assert metrics["train_one_row"] is (attn == "eager_lean")
    # LoRA r=8 on GPT-2's c_attn (64 -> 192), 2 layers: r x (in + out) per layer
    assert metrics["trainable_params"] == 2 * 8 * (64 + 192)
    base = sum(p.numel() for p in load_base_model("tiny-random-gpt2").parameters())
    assert metrics["total_params"] == base + metrics["trainable_params"]
    preds_em = [json.loads(line)["exact_match"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert metrics["exact_match"] == pytest.approx(100 * sum(preds_em) / 8)
    assert metrics["train_tokens_per_second"] == pytest.approx(metrics["train_tokens"] / metrics["train_seconds"],
                                                               rel=1e-2)  # fmt: skip
    # eval_seconds is rounded to the millisecond, which a tiny model's few-ms evaluation feels: compare times
    assert 8 / metrics["eval_questions_per_second"] == pytest.approx(metrics["eval_seconds"], abs=1e-3)
    assert metrics["peak_memory_mb"] > 0 and metrics["eval_seconds"] > 0
    assert json.loads((run / "metrics.json").read_text()) == metrics
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and {"id", "prediction", "answers", "exact_match", "f1"} <= set(preds[0])
    history = [json.loads(line) for line in (run / "log_history.jsonl").read_text().splitlines()]
    assert any("loss" in h for h in history) and any("eval_loss" in h for h in history)
    # train tokens are real tokens: the training examples' lengths, no padding
    assert metrics["train_tokens"] > 0
    model = PeftModel.from_pretrained(load_base_model("tiny-random-gpt2"), run)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # the official predictions format, {id: answer}, agrees with predictions.jsonl
    official = json.loads((run / "predictions.json").read_text())
    assert official == {p["id"]: p["prediction"] for p in preds}
    # the adapter names a portable base, and the model card is filled in, with no path of this machine
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random-gpt2"
    card = (run / "README.md").read_text()
    assert "More Information Needed" not in card and str(tmp_path) not in card and str(synthetic_dir) not in card
    for fact in ("tiny-random-gpt2", "train-v1.1.json", "dev-v1.1.json", "rank r = 8", "c_attn", "Question:",
                 f"| exact match | {metrics['exact_match']:.2f} |", "| questions scored | 8 |", "loraqa 0."):
        assert fact in card, fact
    # re-scoring the saved run gives the same answers
    again = eval_run_dir(run, progress=False)
    assert again["exact_match"] == metrics["exact_match"] and again["f1"] == metrics["f1"]
    # a finished run is not redone
    assert run_experiment(tiny_config(synthetic_dir), run, progress=False) == metrics


def test_a_run_resumed_between_training_and_evaluation_scores_the_trained_adapter(tmp_path, synthetic_dir,
                                                                                 monkeypatch):
    """Killed after train_metrics.json, before metrics.json: the rerun must load the trained adapter, not score
    the fresh (untrained) one. A high learning rate makes the trained answers differ from the untrained ones,
    and the same rerun with the reload taken out (a planted bug) is shown to give other answers."""
    from loraqa import pipeline

    cfg = tiny_config(synthetic_dir, **{"train.lr": 0.05, "train.eval_steps": 0})
    first = run_experiment(cfg, tmp_path / "run", progress=False)
    answers = (tmp_path / "run" / "predictions.json").read_text()

    def killed_during_evaluation(folder):
        shutil.copytree(tmp_path / "run", folder)
        for name in ("metrics.json", "predictions.json", "predictions.jsonl", "README.md"):
            (folder / name).unlink()
        return folder

    again = run_experiment(cfg, killed_during_evaluation(tmp_path / "resumed"), progress=False)
    assert (tmp_path / "resumed" / "predictions.json").read_text() == answers
    assert (again["exact_match"], again["f1"]) == (first["exact_match"], first["f1"])

    monkeypatch.setattr(pipeline, "load_trained", lambda model, *args, **kwargs: model)  # the reload removed
    run_experiment(cfg, killed_during_evaluation(tmp_path / "planted"), progress=False)
    assert (tmp_path / "planted" / "predictions.json").read_text() != answers


def test_same_config_gives_the_same_metrics(tmp_path, synthetic_dir):
    a = run_experiment(tiny_config(synthetic_dir), tmp_path / "a", progress=False)
    b = run_experiment(tiny_config(synthetic_dir), tmp_path / "b", progress=False)
    # on a GPU, SDPA's memory-efficient backward adds in no fixed order: the same losses to rounding
    same = (lambda x: pytest.approx(x, rel=1e-6)) if torch.cuda.is_available() else (lambda x: x)
    for key in ("exact_match", "f1", "final_train_loss", "final_eval_loss", "train_tokens"):
        assert a[key] == same(b[key]), key
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (
        tmp_path / "b" / "predictions.jsonl"
    ).read_text()


def test_gradient_checkpointing_trains_the_same_run_in_bf16(tmp_path, synthetic_dir):
    """``train.gradient_checkpointing`` through ``loraqa train``'s own path (the Trainer switches it on): each
    layer runs again in the backward, and the run trains the same."""
    runs, probes = {}, {}
    for on in (False, True):
        probes[on] = step_probe()
        cfg = tiny_config(synthetic_dir, **{"model.precision": "bf16", "train.gradient_checkpointing": on})
        runs[on] = run_experiment(cfg, tmp_path / str(on), callbacks=[probes[on]], progress=False)
    assert probes[False].steps == probes[True].steps == 4
    assert (probes[False].forwards, probes[True].forwards) == (4, 8)  # one micro-batch a step; recomputed
    assert runs[True]["final_train_loss"] == pytest.approx(runs[False]["final_train_loss"], rel=2e-2)


def test_a_different_config_in_the_same_folder_is_refused(tmp_path, synthetic_dir):
    from loraqa.config import ConfigError

    run_experiment(tiny_config(synthetic_dir, **{"train.max_steps": 1}), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different config"):
        run_experiment(tiny_config(synthetic_dir, **{"train.max_steps": 2}), tmp_path, progress=False)


def test_a_run_that_failed_before_it_trained_leaves_its_folder_to_the_corrected_command(tmp_path, synthetic_dir):
    """data.eval_skip past the dev split: one line before any model loads (not EM 0 on no questions); the
    folder then holds its config and error.json only, which the corrected config may take."""
    from loraqa.data import DataError

    with pytest.raises(DataError, match="data.eval_skip 100 leaves no dev question to evaluate"):
        run_experiment(tiny_config(synthetic_dir, **{"data.eval_skip": 100}), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".loraqa.lock") == ["config.yaml", "error.json"]
    metrics = run_experiment(tiny_config(synthetic_dir, **{"train.max_steps": 1}), tmp_path, progress=False)
    assert metrics["train_steps"] == 1 and metrics["n_questions"] == 8


def test_an_answer_as_long_as_the_models_positions_is_refused_before_training(tmp_path, synthetic_dir):
    from loraqa.answering import prompt_length
    from loraqa.config import ConfigError
    from loraqa.model import load_model

    cfg = tiny_config(synthetic_dir, **{"eval.max_new_tokens": 5000})
    with pytest.raises(ConfigError, match="eval.max_new_tokens: 5000 leaves no room for a prompt in the"):
        run_experiment(cfg, tmp_path, progress=False)
    assert not (tmp_path / "log_history.jsonl").exists()  # refused before any step
    model = load_model(cfg.model, "cpu").model
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        prompt_length(model, 128, 5000)  # loraqa eval / ask / predict / serve meet it here


def test_training_into_a_zero_shot_evaluations_folder_is_refused(tmp_path, synthetic_dir):
    from loraqa.answering import eval_zero_shot
    from loraqa.runfolder import RunFolderError

    cfg = tiny_config(synthetic_dir, **{"train.max_steps": 1})
    eval_zero_shot(cfg, tmp_path, progress=False)
    with pytest.raises(RunFolderError, match="holds a zero-shot evaluation .*, not a trained run"):
        run_experiment(cfg, tmp_path, progress=False)
    assert not (tmp_path / "error.json").exists()
    assert run_experiment(cfg, tmp_path, overwrite=True, progress=False)["method"] == "lora"


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, synthetic_dir):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    cfg = tiny_config(synthetic_dir)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path, callbacks=[Interrupt()], progress=False)
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "metrics.json").exists()
    # this callback stops on_save before the clock's turn (the clock runs last): the totals written at the
    # step's end, beside the checkpoints, are what the resumed run starts from
    assert not (tmp_path / "checkpoints" / "checkpoint-2" / "loraqa_clock.json").exists()
    before = json.loads((tmp_path / "checkpoints" / "loraqa_clock.json").read_text())
    assert before["step"] == 2 and before["segments"] == 1 and before["train_seconds"] > 0
    assert before["train_tokens"] > 0
    class Watch(TrainerCallback):
        """What the Trainer itself did on resuming: the step it restored, the optimizer state it loaded, the
        steps it then ran."""

        def __init__(self):
            self.begin_step, self.adam_steps, self.steps_run = None, set(), 0

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.begin_step = state.global_step

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if self.steps_run == 0:  # the optimizer state as loaded from the checkpoint, before any new step
                self.adam_steps = {int(s["step"]) for s in optimizer.state.values()}

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1

    watch = Watch()
    metrics = run_experiment(cfg, tmp_path, callbacks=[watch], progress=False)
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["train_steps"] == 4
    assert watch.begin_step == 2 and metrics["resumed_at_step"] == 2  # the Trainer restored step 2 ...
    assert watch.adam_steps == {2}  # ... and AdamW's state after 2 steps (a fresh optimizer has none) ...
    assert watch.steps_run == 2  # ... and ran only the 2 steps left
    # the resumed run ends where an uninterrupted one does
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)
    assert metrics["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert metrics["exact_match"] == straight["exact_match"]
    # its time and tokens cover both segments, not only the resumed one
    assert metrics["train_segments"] == 2 and straight["train_segments"] == 1
    assert metrics["train_tokens"] == straight["train_tokens"]
    assert metrics["train_seconds"] > before["train_seconds"]
    assert "train_seconds_cover_last_segment_only" not in metrics


def test_a_kill_while_old_checkpoints_are_removed_keeps_the_train_time(tmp_path, synthetic_dir, monkeypatch):
    """The Trainer removes the older checkpoint (and its clock) as soon as the new one is complete, before
    on_save: the new checkpoint's clock is written before that, so a kill there loses no train time."""
    import transformers.trainer

    class Killed(BaseException):  # like SIGKILL: nothing in loraqa or the Trainer handles it
        pass

    real = transformers.trainer.rotate_checkpoints

    def rotate_then_die(*args, **kwargs):
        real(*args, **kwargs)
        if not (tmp_path / "checkpoints" / "checkpoint-2").exists():  # checkpoint-2 is gone, checkpoint-4 stays
            raise Killed

    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", rotate_then_die)
    cfg = tiny_config(synthetic_dir)
    with pytest.raises(Killed):
        run_experiment(cfg, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (tmp_path / "checkpoints" / "checkpoint-4" / "loraqa_clock.json").exists()  # the window itself
    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", real)
    metrics = run_experiment(cfg, tmp_path, progress=False)
    assert metrics["resumed_from"] == "checkpoint-4" and "train_seconds_cover_last_segment_only" not in metrics


def test_a_run_interrupted_in_a_later_epoch_resumes_with_the_same_batches(tmp_path, synthetic_dir):
    """Each epoch's batch order comes from (seed, epoch), not from the global generator the checkpoint restores
    (which is past that epoch's permutation), so a resume in epoch 2 trains on what a straight run does."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    # 8 questions, 4 a step: 2 steps an epoch; the checkpoint at step 3 is inside the second epoch
    cfg = tiny_config(synthetic_dir, **{"data.train_limit": 8, "train.max_steps": 6, "train.save_steps": 3,
                                        "train.eval_steps": 0})  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "resumed", callbacks=[Interrupt()], progress=False)
    resumed = run_experiment(cfg, tmp_path / "resumed", progress=False)
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)
    assert resumed["resumed_from"] == "checkpoint-3" and resumed["epochs"] == 3
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)

    def losses(name):
        lines = (tmp_path / name / "log_history.jsonl").read_text().splitlines()
        return [h["loss"] for h in map(json.loads, lines) if "loss" in h]

    assert losses("resumed") == pytest.approx(losses("straight"), rel=1e-5) and len(losses("straight")) == 6


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = map(json.loads, (run_dir / "log_history.jsonl").read_text().splitlines())
    return [(h["step"], h["loss"]) for h in rows if "loss" in h]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_a_checkpoint_at_the_step_reached_and_the_rerun_resumes_there(
    tmp_path, synthetic_dir, signum
):
    from transformers import TrainerCallback

    from loraqa.callbacks import Interrupted

    class Signal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signum)

    # no checkpoint is due before the end: without the signal's own, a rerun would start from step 0
    cfg = tiny_config(synthetic_dir, **{"train.max_steps": 6, "train.save_steps": 100, "train.eval_steps": 0})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as stopped:
        run_experiment(cfg, tmp_path / "resumed", callbacks=[Signal()], progress=False)
    assert stopped.value.step == 3 and stopped.value.signum == signum
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # training's handlers are gone again
    checkpoints = sorted((tmp_path / "resumed" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3"] and (checkpoints[0] / "loraqa_clock.json").is_file()
    assert not (tmp_path / "resumed" / "metrics.json").exists()

    resumed = run_experiment(cfg, tmp_path / "resumed", progress=False)
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)
    assert resumed["resumed_from"] == "checkpoint-3" and resumed["resumed_at_step"] == 3
    assert resumed["train_steps"] == 6 and resumed["train_tokens"] == straight["train_tokens"]
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    resumed_log, straight_log = _losses(tmp_path / "resumed"), _losses(tmp_path / "straight")
    assert [step for step, _ in resumed_log] == [step for step, _ in straight_log] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in resumed_log] == pytest.approx([loss for _, loss in straight_log], rel=1e-5)


def test_train_time_stops_when_training_does(tmp_path, synthetic_dir, monkeypatch):
    # the final eval-loss pass after the last step is no training: a clock read after it would count it
    import time
    import types

    import transformers

    from loraqa import callbacks

    offset = [0.0]
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + offset[0], monotonic=time.monotonic))  # fmt: skip
    evaluate = transformers.Trainer.evaluate

    def slow_evaluate(self, *args, **kwargs):  # an hour passes on loraqa's clock at every evaluation
        offset[0] += 3600.0
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow_evaluate)
    # keep_best takes step 2's adapter back, so an eval-loss pass of it follows training (the Trainer's own
    # evaluation at the last step was of step 4's weights)
    from test_scoring import scripted

    scripted(monkeypatch, {2: 30.0, 4: 10.0})
    cfg = tiny_config(synthetic_dir, **{"train.eval_steps": 100, "train.keep_best": True, "eval.score_steps": 2,
                                        "data.score_limit": 4})  # fmt: skip
    metrics = run_experiment(cfg, tmp_path / "run")
    # every evaluation added an hour; the last one (the kept adapter's eval loss) must not be in the train time
    assert metrics["kept_step"] == 2 and offset[0] >= 7200.0 and 0 < metrics["train_seconds"] < offset[0] - 3600


def test_a_second_stop_signal_stops_at_once_unless_it_is_the_first_delivered_twice(monkeypatch):
    from loraqa import callbacks

    callback, now = callbacks.InterruptCallback(), [100.0]
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: now[0])
    callback.handle(signal.SIGINT, None)
    now[0] += callbacks.REPEAT_WINDOW_SECONDS / 2
    callback.handle(signal.SIGINT, None)  # the same Ctrl-C, passed on by a launcher: still a graceful stop
    assert callback.signum == signal.SIGINT
    now[0] += callbacks.REPEAT_WINDOW_SECONDS
    with pytest.raises(KeyboardInterrupt):
        callback.handle(signal.SIGTERM, None)


def test_stop_signal_handlers_hold_for_the_block_in_the_main_thread_only():
    import threading

    from loraqa import signals

    def handler(signum, frame):
        pass

    def other(signum, frame):
        pass

    def in_a_thread():  # Python refuses handlers outside the main thread: the block runs, nothing is set
        with signals.handling([signal.SIGTERM], other):
            seen.append(signal.getsignal(signal.SIGTERM))

    before, seen = signal.getsignal(signal.SIGTERM), []
    with signals.handling([signal.SIGTERM], handler):
        assert signal.getsignal(signal.SIGTERM) is handler
        worker = threading.Thread(target=in_a_thread)
        worker.start()
        worker.join()
    assert seen == [handler] and signal.getsignal(signal.SIGTERM) is before
    assert [signals.stopped_by_request(rc) for rc in (130, 143, -2, -15, 0, 1, -9, 137, None)] == [True] * 4 + [False] * 5


def test_length_grouped_batches_depend_on_seed_and_epoch_only():
    from loraqa.batching import LengthGroupedBatches

    lengths = [(7 * i) % 23 + 1 for i in range(40)]
    sampler = LengthGroupedBatches(lengths, group=4, seed=42)
    first = list(sampler)
    torch.manual_seed(0)  # the global generator plays no part
    assert list(sampler) == first and sorted(first) == list(range(40))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(LengthGroupedBatches(lengths, group=4, seed=43)) != first


def test_a_half_written_checkpoint_is_not_resumed_from(tmp_path):
    from loraqa.runfolder import last_checkpoint

    ckpt = tmp_path / "checkpoints"
    (ckpt / "checkpoint-2").mkdir(parents=True)
    (ckpt / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (ckpt / "checkpoint-4").mkdir()  # killed while saving: trainer_state.json is written last
    (ckpt / "checkpoint-4" / "adapter_model.safetensors").write_text("")
    (ckpt / "checkpoint-6").mkdir()  # killed while trainer_state.json itself was written (in place)
    (ckpt / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    assert last_checkpoint(ckpt) == str(ckpt / "checkpoint-2")
    assert not (ckpt / "checkpoint-4").exists() and not (ckpt / "checkpoint-6").exists()
    assert last_checkpoint(tmp_path / "none") is None


def test_training_memorises_a_small_task_and_the_adapter_answers_it(tmp_path):
    """A few steps drive the loss down and the trained adapter answers the questions it was taught;
    the model comes from a local folder (save_pretrained), the path a user's own checkpoint takes."""
    from loraqa.model import load_base_model, load_gpt2_tokenizer

    model_dir = tmp_path / "model"
    base = load_base_model("tiny-random-gpt2")
    # GPT-2's own dropout off: with it, whether 50 steps memorise all four answers depends on its random draws,
    # which any change in the batches' shapes reshuffles
    base.config.resid_pdrop = base.config.embd_pdrop = base.config.attn_pdrop = 0.0
    base.save_pretrained(model_dir)
    load_gpt2_tokenizer().save_pretrained(model_dir)
    data = make_synthetic_squad(tmp_path / "data", n_train=4, n_dev=4)
    shutil.copy(data / "train-v1.1.json", data / "dev-v1.1.json")  # ask what was taught
    cfg = tiny_config(
        data,
        **{
            "model.name": str(model_dir),
            "lora.r": 16,
            "lora.alpha": 32,
            "lora.dropout": 0.0,
            "lora.targets": "all-linear",
            "train.lr": 1e-2,
            "train.max_steps": 50,
            "train.eval_steps": 0,
            "train.save_steps": 0,
            "eval.max_new_tokens": 8,
        },  # fmt: skip
    )
    metrics = run_experiment(cfg, tmp_path / "run", progress=False)
    losses = [h["loss"] for h in map(json.loads, (tmp_path / "run" / "log_history.jsonl").read_text().splitlines())
              if "loss" in h]  # fmt: skip
    assert losses[-1] < losses[0] / 3
    assert metrics["exact_match"] == 100.0


def test_eval_loss_is_on_the_answer_tokens_whatever_the_training_loss(tmp_path, synthetic_dir):
    # with lr=0 the weights never move, so the two runs' eval losses are equal exactly when both are
    # measured on the same (answer-only) labels; their train losses differ (all tokens vs the answer)
    runs = {}
    for loss_on in ("answer", "all"):
        cfg = tiny_config(synthetic_dir, **{"train.lr": 0.0, "prompt.loss_on": loss_on})
        runs[loss_on] = run_experiment(cfg, tmp_path / loss_on, progress=False)

    def curve(name, key):
        lines = (tmp_path / name / "log_history.jsonl").read_text().splitlines()
        return [h[key] for h in map(json.loads, lines) if key in h]

    assert curve("all", "eval_loss") == curve("answer", "eval_loss") and len(curve("all", "eval_loss")) >= 2
    assert runs["all"]["final_eval_loss"] == runs["answer"]["final_eval_loss"]
    assert runs["all"]["final_train_loss"] != runs["answer"]["final_train_loss"]
    assert runs["all"]["eval_loss_on"] == runs["answer"]["eval_loss_on"] == "answer"


def test_zero_shot_evaluation_writes_predictions(tmp_path, synthetic_dir):
    cfg = tiny_config(synthetic_dir)
    metrics = eval_zero_shot(cfg, tmp_path, progress=False)
    assert metrics["method"] == "zero-shot" and metrics["n_questions"] == 8
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 8


def test_full_fine_tuning_trains_every_parameter(tmp_path, synthetic_dir):
    metrics = run_experiment(tiny_config(synthetic_dir, **{"train.method": "full", "train.max_steps": 2}),
                             tmp_path, progress=False)  # fmt: skip
    assert metrics["trainable_params"] == metrics["total_params"]
    assert (tmp_path / "model.safetensors").is_file()
    assert eval_run_dir(tmp_path, progress=False)["exact_match"] == metrics["exact_match"]


def test_bf16_run_trains_and_scores(tmp_path, synthetic_dir):
    if not torch.cuda.is_available():
        from loraqa.devices import cpu_has_bf16

        if not cpu_has_bf16():
            pytest.skip("no native bf16 here")
    probes = {p: step_probe() for p in ("bf16", "fp32")}
    runs = {p: run_experiment(tiny_config(synthetic_dir, **{"model.precision": p}), tmp_path / p,
                              callbacks=[probes[p]], progress=False) for p in probes}  # fmt: skip
    metrics = runs["bf16"]
    history = [json.loads(line) for line in (tmp_path / "bf16" / "log_history.jsonl").read_text().splitlines()]
    assert metrics["precision"] == "bf16"
    assert metrics["final_train_loss"] == [h["loss"] for h in history if "loss" in h][-1]
    # the training forwards really ran under bf16 autocast (and the fp32 ones did not)
    assert probes["bf16"].autocast == {True} and probes["fp32"].autocast == {False}
    assert probes["bf16"].forwards == probes["fp32"].forwards == 4
    assert metrics["final_train_loss"] != runs["fp32"]["final_train_loss"]


def test_generation_speed_switches_do_not_change_the_answers(synthetic_dir):
    """On the batched path (eval.batch_invariant=false), eval.sort_by_length / share_prefixes / prune_finished /
    batch size change the speed, not the answers (fp32, tiny model; several questions share each context so
    prefixes are really shared)."""
    import dataclasses

    from loraqa.answering import answer
    from loraqa.config import EvalConfig, ModelConfig
    from loraqa.data import load_squad
    from loraqa.model import load_model

    dev, _ = load_squad(synthetic_dir, split="dev", limit=6)
    examples = [
        dataclasses.replace(ex, id=f"{ex.id}-{k}", context=dev[0].context) for k, ex in enumerate(dev)
    ]
    examples += dev
    lm = load_model(ModelConfig(name="tiny-random-gpt2", precision="fp32"), "cpu")
    fast_cfg = EvalConfig(batch_size=4, batch_invariant=False)  # the invariant path ignores these switches
    fast, _ = answer(lm.model, lm.tokenizer, examples, eval_cfg=fast_cfg, progress=False)
    plain_cfg = EvalConfig(
        batch_size=1, sort_by_length=False, share_prefixes=False, prune_finished=False, batch_invariant=False
    )
    plain, _ = answer(lm.model, lm.tokenizer, examples, eval_cfg=plain_cfg, progress=False)
    answers = [r["prediction"] for r in fast]
    assert len(set(answers)) > 1  # answers that can tell a mix-up
    assert answers == [r["prediction"] for r in plain]


def test_a_prompt_as_long_as_the_model_takes_leaves_room_for_the_answer(synthetic_dir):
    """prompt.max_length at GPT-2's 1024 positions: the answer is generated after the prompt, so evaluation
    keeps the prompt to 1024 - eval.max_new_tokens (before, a long context ran past the position table)."""
    import dataclasses

    from loraqa.answering import answer
    from loraqa.config import EvalConfig, ModelConfig
    from loraqa.data import load_squad
    from loraqa.model import load_model

    (ex,) = load_squad(synthetic_dir, split="dev", limit=1)[0]
    long = dataclasses.replace(ex, context=" ".join([ex.context] * 200))
    lm = load_model(ModelConfig(name="tiny-random-gpt2", precision="fp32"), "cpu")
    assert lm.model.config.n_positions == 1024
    cfg = EvalConfig(batch_size=1, max_new_tokens=8)
    records, summary = answer(lm.model, lm.tokenizer, [long], max_length=1024, eval_cfg=cfg, progress=False)
    assert summary["eval_prompts_truncated"] == 1 and len(records) == 1


def test_no_questions_for_the_eval_loss_turns_its_pass_off(tmp_path, synthetic_dir):
    # data.loss_eval_limit=0 with the default train.eval_steps: the Trainer refuses periodic evaluation without
    # an eval set, so the eval-loss pass must be turned off for the run to start
    metrics = run_experiment(tiny_config(synthetic_dir, **{"data.loss_eval_limit": 0, "train.eval_steps": 2}),
                             tmp_path, progress=False)  # fmt: skip
    assert metrics["final_eval_loss"] is None and metrics["final_train_loss"] is not None


def test_saving_the_adapter_leaves_no_template_card(tmp_path):
    # PEFT's save writes a template README.md naming the base by its load path; none may stay in the folder,
    # not even in a run interrupted before its own card is written
    from loraqa.config import LoraConfig
    from loraqa.model import apply_lora, load_base_model, save_trained

    model = apply_lora(load_base_model("tiny-random-gpt2"), LoraConfig(r=4, alpha=8, dropout=0.0, targets="attn"))
    save_trained(model, None, tmp_path, full=False, base_name="tiny-random-gpt2")
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "README.md").exists()


def test_no_checkpoint_names_the_path_its_base_was_loaded_from(tmp_path, synthetic_dir, monkeypatch):
    """Checkpoints travel (``loraqa sync`` carries them to other machines and into git): PEFT writes the base's
    load path into each one's adapter_config.json and template README.md, and loraqa must take it out."""
    from loraqa import pipeline
    from loraqa.model import load_base_model, load_gpt2_tokenizer

    model_dir = tmp_path / "my-base"
    load_base_model("tiny-random-gpt2").save_pretrained(model_dir)
    load_gpt2_tokenizer().save_pretrained(model_dir)
    kept = tmp_path / "checkpoints-as-saved"
    save_training = pipeline._save_training

    def keep_checkpoints(model, tok, run_dir, *args, **kwargs):  # they are removed once the adapter is saved
        shutil.copytree(run_dir / "checkpoints", kept)
        save_training(model, tok, run_dir, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_save_training", keep_checkpoints)
    run_experiment(tiny_config(synthetic_dir, **{"model.name": str(model_dir)}), tmp_path / "run", progress=False)
    checkpoints = sorted(kept.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-4"]  # the newest only (save_total_limit)
    for ckpt in checkpoints:
        assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-base"
        assert not (ckpt / "README.md").exists()
        for f in ckpt.iterdir():
            assert str(tmp_path).encode() not in f.read_bytes(), f


def test_compile_seconds_counts_this_process_compiling():
    from loraqa.trainer import compile_seconds

    before = compile_seconds()
    torch.compile(lambda x: (x * 3).cos().sum())(torch.randn(5))
    assert compile_seconds() > before


def test_a_stopped_run_logs_the_losses_an_unstopped_one_does(tmp_path, synthetic_dir):
    """Stopped between two logs (logging_steps 4, a stop at step 3), the run resumed from its checkpoint logs
    the same losses at the same steps as an uninterrupted run: the checkpoint kept the steps' loss sum."""
    import os
    import signal

    from transformers import TrainerCallback

    from loraqa.callbacks import Interrupted

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(synthetic_dir, **{"train.max_steps": 6, "train.logging_steps": 4, "train.eval_steps": 0,
                                        "train.save_steps": 0, "lora.dropout": 0.0})  # fmt: skip
    with pytest.raises(Interrupted):
        run_experiment(cfg, tmp_path / "stopped", callbacks=[Stop()], progress=False)
    resumed = run_experiment(cfg, tmp_path / "stopped", progress=False)
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)

    def losses(run):
        rows = [json.loads(x) for x in (run / "log_history.jsonl").read_text().splitlines()]
        return [(h["step"], h["loss"]) for h in rows if "loss" in h]

    assert resumed["resumed_from"] == "checkpoint-3"
    assert [s for s, _ in losses(tmp_path / "stopped")] == [s for s, _ in losses(tmp_path / "straight")] == [1, 4]
    assert [v for _, v in losses(tmp_path / "stopped")] == pytest.approx([v for _, v in losses(tmp_path / "straight")], rel=1e-5)
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
