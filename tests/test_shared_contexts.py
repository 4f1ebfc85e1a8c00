"""Shared-context training computes what stand-alone training computes (tiny random GPT-2 and Llama, CPU).

* fp32: every question's loss, and the LoRA (or full fine-tuning) gradients of the batch loss, equal the
  stand-alone computation to 1e-5 relative, through the labelled-positions loss and through the model's own
  loss (``train.fast_loss=false``), with sdpa and eager attention;
* bf16 (frozen base in bf16, autocast, fp32 adapters): each question's loss within 1e-2 relative of the same
  computation stand-alone, the gradients' cosine similarity above 0.999;
* contexts cut to fit ``prompt.max_length``: questions whose windows differ get separate blocks, and the
  losses still match;
* the sampler keeps ``batch_size`` questions per step and covers every question once per epoch.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import nonzero_lora_b
from loraqa.attention import SEGMENTS
from loraqa.attention import register as register_attention
from loraqa.batching import QACollator, padded_width
from loraqa.config import LoraConfig
from loraqa.loss import labelled_positions_loss
from loraqa.model import apply_lora, load_base_model
from loraqa.packing import SharedContextBatches, SharedContextCollator, build_blocks, context_key
from loraqa.prompt import IGNORE_INDEX, PromptEncoder
from loraqa.trainer import QATrainer

FACTS = [("box", "garden", "red"), ("lamp", "library", "blue"), ("kite", "harbor", "green"),
         ("coin", "kitchen", "yellow"), ("hat", "museum", "black"), ("cup", "forest", "white")]  # fmt: skip


def paragraph(facts) -> tuple[str, list[tuple[str, str, int]]]:
    context = " ".join(f"The {o} in the {p} is {c}." for o, p, c in facts)
    qas = []
    for o, p, c in facts:
        sentence = f"The {o} in the {p} is {c}."
        qas.append(
            (f"What color is the {o} in the {p}?", c, context.index(sentence) + len(sentence) - len(c) - 1)
        )
    return context, qas


def make_features(encoder: PromptEncoder, sizes=(3, 1, 4, 2)) -> list[dict]:
    """Questions on paragraphs of ``sizes`` questions each, in file order (a paragraph's questions together)."""
    features = []
    for k, n in enumerate(sizes):
        facts = [FACTS[(k + j) % len(FACTS)] for j in range(max(n, 2) + k % 2)]
        context, qas = paragraph(facts)
        for question, answer, start in qas[:n]:
            features.append(encoder.encode_train(context, question, answer, start))
    return features


def tiny_llama(seed: int = 0, attn: str = "sdpa", vocab: int = 50257):
    from transformers import LlamaConfig, LlamaForCausalLM

    register_attention()  # attn_implementation=eager_lean, as load_base_model does
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.2)  # fmt: skip
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


def base_model(family: str, attn: str = "sdpa", seed: int = 0):
    if family == "llama":
        return tiny_llama(seed, attn)
    return load_base_model("tiny-random-gpt2", seed=seed, attn_implementation=attn)


def with_lora(model, seed: int = 0):
    """LoRA on every linear layer, B matrices non-zero (PEFT starts them at zero), dropout 0."""
    return nonzero_lora_b(
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets="all-linear")), seed + 1
    )


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("num_questions", "real_tokens", "labels")}


def per_question_losses(model, features, collator) -> list[float]:
    """Each question's summed answer-token loss, from the model's own logits in one forward pass: the features
    collated again with every label replaced by its question's index tell which position is whose."""
    batch = collator(features)
    tagged = collator([{**f, "labels": [k if x != IGNORE_INDEX else x for x in f["labels"]]}
                       for k, f in enumerate(features)])["labels"][:, 1:]  # fmt: skip
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[:, :-1].float()
    token_losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    assert int((tagged != IGNORE_INDEX).sum()) == int((batch["labels"] != IGNORE_INDEX).sum())
    return [float(token_losses[tagged == k].sum()) for k in range(len(features))]


def batch_loss(model, batch: dict, fast: bool) -> torch.Tensor:
    """The answer-token mean, by the labelled-positions loss or by the model's own loss."""
    if fast:
        return labelled_positions_loss(model, {k: v for k, v in batch.items() if k != "num_questions"})
    return model(**model_inputs(batch), labels=batch["labels"]).loss


def grads_of_batch_loss(model, features, collator, fast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = batch_loss(model, collator(features), fast)
    loss.backward()
    return float(loss.detach()), {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad
    }


# the kernels these equalities hold for: the CPU's, and a GPU's where there is one (benchmarks/gpu_check.sh)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def on(device: str, collator):
    """``collator`` with the tensors of its batches on ``device``."""
    if device == "cpu":
        return collator
    return lambda fs: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator(fs).items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_step(model, features, expected_collator, collator, fast: bool = True) -> None:
    """Each question's loss, the batch loss and its gradients under ``collator`` equal ``expected_collator``'s
    (fp32: to 1e-5 relative)."""
    expected = per_question_losses(model, features, expected_collator)
    for g, e in zip(per_question_losses(model, features, collator), expected, strict=True):
        assert abs(g - e) <= 1e-5 * abs(e)
    ref_loss, ref = grads_of_batch_loss(model, features, expected_collator, fast)
    new_loss, new = grads_of_batch_loss(model, features, collator, fast)
    assert abs(new_loss - ref_loss) <= 1e-5 * ref_loss
    assert ref and set(ref) == set(new)
    for name in ref:
        assert rel_err(new[name], ref[name]) < 1e-5, name


@pytest.fixture(scope="module")
def features(gpt2_tokenizer):
    return make_features(PromptEncoder(gpt2_tokenizer))


@pytest.fixture(scope="module")
def collators(gpt2_tokenizer):
    pad = gpt2_tokenizer.pad_token_id
    return SharedContextCollator(pad), QACollator(pad)


def test_the_batch_shares_each_context_once(features, collators):
    shared, alone = collators
    batch, plain = shared(features), alone(features)
    assert batch["num_questions"] == len(features) == 10
    assert batch["input_ids"].shape[0] < len(features)  # several questions a row
    assert batch["real_tokens"] < int(plain["attention_mask"].sum()) * 0.7
    assert batch["attention_mask"].dtype == torch.float32 and batch["attention_mask"].dim() == 4
    # the same labelled tokens, so the same num_items_in_batch and the same answer-token average
    assert sorted(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()) == sorted(
        plain["labels"][plain["labels"] != IGNORE_INDEX].tolist()
    )
    assert len(build_blocks(features)) == 4


@pytest.mark.parametrize("family,attn,fast", [("gpt2", "sdpa", True), ("gpt2", "eager", False),
                                              ("gpt2", "eager_lean", True), ("llama", "sdpa", True),
                                              ("llama", "eager", True), ("llama", "eager_lean", True),
                                              ("llama", "eager_lean", False), ("llama", "sdpa", False)])  # fmt: skip
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_lora_losses_and_gradients_equal_stand_alone(features, collators, family, attn, fast, device):
    shared, alone = collators
    model = with_lora(base_model(family, attn)).to(device)
    model.eval()
    assert_same_step(model, features, on(device, alone), on(device, shared), fast)


def lora_loss_and_grads(family: str, kernel: str, dtype: torch.dtype, batch: dict):
    """The labelled-positions loss of a LoRA model on ``batch`` in training mode (GPT-2's own dropout draws the
    same masks from the same seed), under bf16 autocast for bf16, and the LoRA gradients as fp32."""
    model = with_lora(base_model(family, kernel)).to(dtype)
    model.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = batch_loss(model, batch, fast=True)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["shared", "alone"])
def test_lean_eager_attention_computes_what_eager_does(features, collators, family, layout):
    """eager_lean (loraqa.attention) against transformers' eager path, on a shared-context batch (loraqa's 4D
    float mask) and on stand-alone rows (the mask transformers builds from the padding mask); the llama model has
    grouped key/value heads. In fp32: the same loss and LoRA gradients (the query is scaled before its matmul,
    not the scores after: another rounding order, ~1e-5 of a gradient). In bf16, where either kernel's
    gradients are some 10% off the fp32 ones: eager_lean no further off than eager, give or take a quarter."""
    batch = collators[0 if layout == "shared" else 1](features)
    ref_loss, ref = lora_loss_and_grads(family, "eager", torch.float32, batch)
    lean_loss, lean = lora_loss_and_grads(family, "eager_lean", torch.float32, batch)
    assert ref and set(ref) == set(lean)
    assert abs(lean_loss - ref_loss) <= 1e-5 * abs(ref_loss), (lean_loss, ref_loss)
    assert max(rel_err(lean[n], ref[n]) for n in ref) < 1e-4
    off = {}
    for kernel in ("eager", "eager_lean"):
        loss, grads = lora_loss_and_grads(family, kernel, torch.bfloat16, batch)
        assert abs(loss - ref_loss) <= 5e-3 * abs(ref_loss), (kernel, loss, ref_loss)
        off[kernel] = max(rel_err(grads[n], ref[n]) for n in ref)
    assert off["eager_lean"] <= 1.25 * off["eager"], off


@pytest.mark.parametrize("mask_heads", [1, 6])
def test_lean_attention_reads_grouped_key_heads_as_transformers_orders_them(mask_heads):
    """Grouped-query attention: query head h reads key/value head h // groups, and the mask (one for all heads or
    one per head) lands on the right head: outputs, weights and every input's gradient match attention written
    out over transformers' repeated keys and values."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from loraqa.attention import eager_lean_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 5, 8, generator=gen).requires_grad_() for n in (6, 2, 2))
    mask = torch.where(torch.rand(2, mask_heads, 5, 5, generator=gen) < 0.3, -1e9, 0.0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3  # as transformers' attention modules carry it
    out, weights = eager_lean_attention(module, q, k, v, mask)
    scores = q @ repeat_kv(k, 3).transpose(-1, -2) / 8**0.5 + mask
    want_weights = scores.softmax(-1)
    want = (want_weights @ repeat_kv(v, 3)).transpose(1, 2)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(weights, want_weights)
    got_grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    for got, expected in zip(got_grads, torch.autograd.grad(want.pow(2).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("family,attn", [("gpt2", "sdpa"), ("llama", "sdpa"), ("llama", "eager"),
                                         ("llama", "eager_lean")])  # fmt: skip
def test_widths_padded_to_a_multiple_change_no_loss_or_gradient(
    gpt2_tokenizer, features, collators, family, attn
):
    """train.pad_to_multiple: a few batch shapes instead of one a batch, the same losses and gradients."""
    pad = gpt2_tokenizer.pad_token_id
    model = with_lora(base_model(family, attn))
    model.eval()
    for tight, padded in zip(collators, (SharedContextCollator(pad, 64), QACollator(pad, 64)), strict=True):
        batch = padded(features)
        assert (
            batch["input_ids"].shape[1] % 64 == 0
            and batch["input_ids"].shape[1] > tight(features)["input_ids"].shape[1]
        )
        assert_same_step(model, features, tight, padded)
    assert len(SharedContextCollator(pad, 64)(features)["input_ids"]) <= len(
        collators[0](features)["input_ids"]
    )


def test_one_row_lays_the_rows_end_to_end_as_segments(gpt2_tokenizer, features):
    pad = gpt2_tokenizer.pad_token_id
    rows, flat = (
        SharedContextCollator(pad, 64)(features),
        SharedContextCollator(pad, 64, one_row=True)(features),
    )
    segments, width = flat[SEGMENTS], flat["input_ids"].shape[1]
    assert flat["input_ids"].shape[0] == 1 and width % 64 == 0 and sum(segments) == width
    assert len(segments) == rows["input_ids"].shape[0] > 1  # one segment a row
    assert flat["real_tokens"] == rows["real_tokens"] < rows["input_ids"].numel()
    assert width < rows["input_ids"].numel()  # no padding between the rows
    # the mask holds each segment's block: a position's row covers its own segment's positions from column 0
    assert flat["attention_mask"].shape == (1, 1, width, max(segments)) and max(segments) < width
    start = 0
    for r, n in enumerate(segments):  # each segment holds its row's tokens, labels, positions and mask
        real = min(n, flat["real_tokens"] - start)
        for key in ("input_ids", "labels", "position_ids"):
            assert flat[key][0, start : start + real].tolist() == rows[key][r, :real].tolist(), key
        block = flat["attention_mask"][0, 0, start : start + n]
        assert torch.equal(block[:real, :real], rows["attention_mask"][r, 0, :real, :real])
        assert (block[:, n:] < 0).all()  # no column past the segment's own positions
        start += n
    tail = torch.arange(flat["real_tokens"], width)
    last = width - segments[-1]
    # the padding sees itself
    assert len(tail) and (flat["attention_mask"][0, 0, tail, tail - last] == 0).all()


def test_one_row_mask_grows_with_the_longest_segment_not_the_row(gpt2_tokenizer, features):
    """Twice the questions (each again, on a context that differs in its first token) make the row twice as
    wide; the mask's columns stay within the longest block's padded width, whatever the number of questions."""
    pad = gpt2_tokenizer.pad_token_id
    flat = SharedContextCollator(pad, 64, one_row=True)
    once = flat(features)
    again = [{**f, "input_ids": [(f["input_ids"][0] + 1) % 50_000, *f["input_ids"][1:]]} for f in features]
    twice = flat(features + again)
    assert twice["real_tokens"] == 2 * once["real_tokens"]
    longest = max(len(b.input_ids) for b in build_blocks(features))
    room = padded_width(longest, 64) + 63  # + the tail's padding
    for batch in (once, twice):
        assert batch["attention_mask"].shape[-1] == max(batch[SEGMENTS]) <= room


@pytest.mark.parametrize("family,fast", [("gpt2", True), ("llama", True), ("llama", False)])
def test_fp32_one_row_losses_and_gradients_equal_the_rows(gpt2_tokenizer, features, family, fast):
    """train.one_row: eager_lean attends segment by segment, reading each segment's block of the mask; each
    question's loss and the LoRA gradients are the rows' (with padding between rows and after)."""
    pad = gpt2_tokenizer.pad_token_id
    rows, flat = SharedContextCollator(pad, 64), SharedContextCollator(pad, 64, one_row=True)
    model = with_lora(base_model(family, "eager_lean"))
    model.eval()
    assert_same_step(model, features, rows, flat, fast)


def test_lean_attention_with_segments_reads_only_their_blocks_of_the_mask():
    """With attention_segments, each segment attends within itself: rows a:b of the mask are the segment's,
    columns 0:b-a its positions; the columns past a short segment are never read (here they allow everything),
    and the output and gradients are each segment's attention on its own."""
    from loraqa.attention import eager_lean_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 9, 8, generator=gen).requires_grad_() for n in (4, 2, 2))
    causal = torch.zeros(9, 9).masked_fill_(torch.ones(9, 9, dtype=torch.bool).triu(1), -1e9)
    # segments of 4 and 5 positions; the first segment's rows allow column 4, past its own positions
    blocks = torch.cat([causal[:4, :5], causal[:5, :5]])
    blocks[:4, 4] = 0.0
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out, weights = eager_lean_attention(module, q, k, v, blocks[None, None], attention_segments=[4, 5])
    assert weights is None
    parts = [eager_lean_attention(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal[None, None, :b - a, :b - a])[0]
             for a, b in ((0, 4), (4, 9))]  # fmt: skip
    want = torch.cat(parts, dim=1)
    torch.testing.assert_close(out, want)
    whole = eager_lean_attention(module, q, k, v, causal[None, None])[0]
    assert not torch.allclose(out[:, 4:], whole[:, 4:])  # the second segment does not see the first
    for got, expected in zip(torch.autograd.grad(out.pow(2).sum(), (q, k, v)),
                             torch.autograd.grad(want.pow(2).sum(), (q, k, v)), strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fp32_full_fine_tuning_gradients_equal_stand_alone(features, collators, family):
    shared, alone = collators
    model = base_model(family)
    model.eval()
    _, ref = grads_of_batch_loss(model, features, alone, True)
    _, new = grads_of_batch_loss(model, features, shared, True)
    for name in ref:
        if ref[name].norm() > 0:  # embedding rows of tokens absent from the batch have no gradient
            assert rel_err(new[name], ref[name]) < 1e-5, name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_losses_within_1e_2_of_stand_alone(features, collators, family, device):
    """As loraqa trains in bf16: frozen base stored in bf16, fp32 adapters, bf16 autocast; both layouts."""
    shared, alone = on(device, collators[0]), on(device, collators[1])
    model = with_lora(base_model(family)).to(device)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.eval()
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = per_question_losses(model, features, alone)
        got = per_question_losses(model, features, shared)
        _, ref = grads_of_batch_loss(model, features, alone, True)
        _, new = grads_of_batch_loss(model, features, shared, True)
    for g, e in zip(got, expected, strict=True):
        assert abs(g - e) <= 1e-2 * abs(e)
    flat = torch.nn.functional.cosine_similarity(
        torch.cat([new[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref]), dim=0
    )
    assert flat > 0.999


def test_truncated_contexts_split_the_group_and_keep_each_answer(gpt2_tokenizer, collators):
    """A paragraph too long for max_length: each question keeps a window around its own answer; windows that
    differ make separate blocks, equal ones share, and the losses are the stand-alone ones."""
    shared, alone = collators
    facts = FACTS + [(o, "attic", c) for o, _, c in FACTS] + [(o, "garage", c) for o, _, c in FACTS]
    context, qas = paragraph(facts)
    encoder = PromptEncoder(gpt2_tokenizer, max_length=60)
    chosen = [qas[0], qas[1], qas[-1]]  # the first two answers lie in one window, the last far away
    features = [encoder.encode_train(context, q, a, s) for q, a, s in chosen]
    assert all(f is not None for f in features)
    keys = [context_key(f) for f in features]
    assert len(keys[0]) < len(PromptEncoder(gpt2_tokenizer, max_length=2048).encode_train(context, *chosen[0])
                              ["input_ids"])  # fmt: skip
    assert keys[2] != keys[0]
    for f, (_, answer, _) in zip(features, chosen, strict=True):
        assert answer in gpt2_tokenizer.decode(f["input_ids"][: f["context_length"]])
    blocks = build_blocks(features)
    assert len(blocks) == len(set(keys)) >= 2
    model = with_lora(base_model("llama"))
    model.eval()
    expected = per_question_losses(model, features, alone)
    got = per_question_losses(model, features, shared)
    for g, e in zip(got, expected, strict=True):
        assert abs(g - e) <= 1e-5 * abs(e)


def test_labelled_contexts_are_refused(gpt2_tokenizer, collators):
    features = make_features(PromptEncoder(gpt2_tokenizer, loss_on="all"), sizes=(2,))
    with pytest.raises(ValueError, match="loss_on=answer"):
        collators[0](features)


# ---------------------------------------------------------------------------------------------- the sampler


def sampler_features(sizes: list[int]) -> list[dict]:
    """Fake features: paragraph p has sizes[p] questions; context length 20 + p % 7, segments 5 + q % 3."""
    out = []
    for p, n in enumerate(sizes):
        ctx = [1000 + p] * (20 + p % 7)
        out += [{"input_ids": ctx + [7] * (5 + q % 3), "context_length": len(ctx)} for q in range(n)]
    return out


@pytest.mark.parametrize("by_length", [True, False])
def test_sampler_keeps_batch_size_questions_and_covers_each_once(by_length):
    sizes = [(p * 5) % 11 + 1 for p in range(40)]  # 1..11 questions a paragraph
    feats = sampler_features(sizes)
    sampler = SharedContextBatches(feats, group=8, by_length=by_length, mega=3, seed=5)
    order = list(sampler)
    assert len(sampler) == len(order) == len(feats)
    assert sorted(order) == list(range(len(feats)))  # every question exactly once an epoch
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert all(len(b) == 8 for b in batches[:-1])  # one optimizer step = batch_size questions
    # a paragraph's questions come together and batches are filled with whole paragraphs where the counts
    # allow: cutting the paragraph list at every 8th question would split ~one paragraph per batch (63 pieces)
    para = [f["input_ids"][0] for f in feats]
    pieces = sum(len({para[i] for i in b}) for b in batches)
    assert pieces <= len(sizes) + len(batches) // 2
    torch.manual_seed(0)  # the global generator plays no part
    assert list(sampler) == order  # the same seed and epoch give the same order
    sampler.set_epoch(1)
    assert list(sampler) != order  # the next epoch another


def test_the_trainer_samples_paragraphs_together_when_sharing(tmp_path, features):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             remove_unused_columns=False)  # fmt: skip
    trainer = QATrainer(model=with_lora(base_model("gpt2")), args=args, train_dataset=features,
                                   share_contexts=True)  # fmt: skip
    assert isinstance(trainer._get_train_sampler(), SharedContextBatches)


# ---------------------------------------------------------------------------------------------- through the Trainer


def test_trainer_losses_and_eval_loss_equal_stand_alone(tmp_path, features, collators, gpt2_tokenizer):
    """compute_loss with num_items_in_batch (both loss paths) and trainer.evaluate() on the dev answer tokens."""
    from transformers import TrainingArguments

    shared, alone = collators
    model = with_lora(base_model("llama"))
    model.eval()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4,
                             remove_unused_columns=False)  # fmt: skip
    results = {}
    for name, collator in (("shared", shared), ("alone", alone)):
        for fast in (True, False):
            trainer = QATrainer(model=model, args=args, data_collator=collator, eval_dataset=features,
                                           fast_loss=fast, share_contexts=name == "shared")  # fmt: skip
            n = torch.tensor(int((alone(features)["labels"][:, 1:] != IGNORE_INDEX).sum()) * 2)
            loss = trainer.compute_loss(model, collator(copy.deepcopy(features)), num_items_in_batch=n)
            results[name, fast] = (float(loss.detach()), trainer.evaluate()["eval_loss"])
    for fast in (True, False):
        (a, ea), (b, eb) = results["shared", fast], results["alone", fast]
        assert abs(a - b) <= 1e-5 * abs(b) and abs(ea - eb) <= 1e-5 * abs(eb), (fast, results)


@pytest.mark.parametrize(("attn", "loss_on", "shared"), [("sdpa", "answer", True), ("eager", "answer", True),
                                                          ("eager_lean", "answer", True),
                                                          ("flash_attention_2", "answer", False),
                                                          ("sdpa", "all", False)])  # fmt: skip
def test_training_shares_contexts_only_where_the_attention_takes_the_mask(attn, loss_on, shared):
    # flash attention takes a padding mask only: transformers would hand it the shared-context B x 1 x L x L mask
    from loraqa.config import ExperimentConfig, apply_overrides
    from loraqa.pipeline import resolve

    cfg = apply_overrides(
        ExperimentConfig(), [("model.attn_implementation", attn), ("prompt.loss_on", loss_on)]
    )
    assert resolve(cfg).share_contexts is shared


def test_one_row_applies_with_eager_lean_and_without_compiled_layers():
    from loraqa.config import ExperimentConfig, apply_overrides
    from loraqa.pipeline import one_row

    cfg = ExperimentConfig()
    lean, sdpa = base_model("gpt2", "eager_lean"), base_model("gpt2", "sdpa")
    assert one_row(cfg, lean, "norms") and one_row(cfg, lean, "off")
    assert not one_row(cfg, sdpa, "off")  # SDPA does not read segments, nor a mask of their blocks
    assert not one_row(cfg, lean, "layers")  # each new number of segments would compile the layers again
    assert not one_row(apply_overrides(cfg, [("train.one_row", False)]), lean, "off")


def test_a_batch_past_all_the_questions_is_all_of_them_at_once():
    """A mistyped train.batch_size (10**11) makes one batch of every question, not a list of 10**11 buckets."""
    from loraqa.packing import fill_batches

    paragraphs = [[0, 1, 2], [3], [4, 5]]
    assert fill_batches(paragraphs, 10**11) == [[0, 1, 2, 4, 5, 3]] == fill_batches(paragraphs, 6)  # best fit
    assert fill_batches([], 10**11) == []


def test_padding_to_a_multiple_stops_at_the_prompts_length():
    """train.pad_to_multiple=2000 with stand-alone examples: padded to prompt.max_length, not past the model's
    positions (an IndexError in its position embeddings)."""
    features = [{"input_ids": [5] * n, "labels": [1] * n} for n in (10, 50)]
    assert QACollator(0, 2000, max_width=128)(features)["input_ids"].shape == (2, 128)
    assert QACollator(0, 64, max_width=128)(features)["input_ids"].shape == (2, 64)
    assert QACollator(0, 2000)(features)["input_ids"].shape == (2, 2000)


def test_an_epoch_padded_for_ddp_ends_in_labelless_fillers_that_no_count_includes(gpt2_tokenizer):
    """Under N processes an epoch that is no whole number of global batches is padded with copies of its last
    question without labels: each process gets its full share and no question trains or counts twice."""
    from loraqa.batching import FILLER, EvenEpoch, WithFillers

    features = WithFillers([{"input_ids": [1, 2, 3, 7, 9, 9], "labels": [-100] * 4 + [9, 9], "context_length": 3},
                            {"input_ids": [1, 2, 3, 7, 8], "labels": [-100] * 4 + [8], "context_length": 3}])  # fmt: skip
    order = EvenEpoch([1, 0], n=2, group=4)
    assert len(order) == 4 and list(order) == [1, 0, 2, 2]  # index 2 = question 0's filler
    filler = features[2]
    assert filler[FILLER] and filler["labels"] == [-100] * 6 and filler["input_ids"] == features[0]["input_ids"]
    assert list(EvenEpoch([0, 1], n=2, group=2)) == [0, 1]  # a whole epoch is left as it is
    batch = [features[i] for i in order]
    shared = SharedContextCollator(gpt2_tokenizer.pad_token_id)(batch)
    assert (shared["num_questions"], shared["real_tokens"]) == (2, 3 + 3 + 2)  # the context once, two segments
    assert (shared["labels"] != -100).sum() == 3  # the fillers' answers are not trained on
    plain = QACollator(gpt2_tokenizer.pad_token_id)(batch)
    assert (plain["num_questions"], plain["real_tokens"]) == (2, 6 + 5)
    assert "num_questions" not in QACollator(gpt2_tokenizer.pad_token_id)(batch[:2])  # none: the rows count
