"""Prompt text, token ids and answer-only labels, with the real GPT-2 tokenizer."""

import pytest

from loraqa.prompt import IGNORE_INDEX, PromptEncoder, PromptStats, format_example, format_prompt

CONTEXT = (
    "Super Bowl 50 was an American football game. The Denver Broncos defeated the Carolina Panthers 24-10."
)
QUESTION = "Who won Super Bowl 50?"
ANSWER = "Denver Broncos"


def test_format_is_the_reference_studys():
    assert format_prompt("C", "Q?") == "Context: C\nQuestion: Q?\nAnswer:"
    assert format_example("C", "Q?", "A") == "Context: C\nQuestion: Q?\nAnswer: A"


def test_labels_cover_only_answer_and_eos(gpt2_tokenizer):
    enc = PromptEncoder(gpt2_tokenizer)
    feat = enc.encode_train(CONTEXT, QUESTION, ANSWER, CONTEXT.index(ANSWER))
    ids, labels, n_prompt = feat["input_ids"], feat["labels"], feat["prompt_length"]
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer_part = labels[n_prompt:]
    assert answer_part == ids[n_prompt:]
    assert answer_part[-1] == gpt2_tokenizer.eos_token_id
    assert gpt2_tokenizer.decode(answer_part[:-1]) == " " + ANSWER
    # the ids spell out exactly the reference format, then EOS
    assert gpt2_tokenizer.decode(ids[:-1]) == format_example(CONTEXT, QUESTION, ANSWER)


def test_loss_on_all_labels_every_token(gpt2_tokenizer):
    feat = PromptEncoder(gpt2_tokenizer, loss_on="all").encode_train(CONTEXT, QUESTION, ANSWER)
    assert feat["labels"] == feat["input_ids"]
    with pytest.raises(ValueError, match="loss_on"):
        PromptEncoder(gpt2_tokenizer, loss_on="prompt")


@pytest.mark.parametrize("answer", ["Denver Broncos", "24-10", "Carolina Panthers 24-10."])
def test_eval_prompt_is_a_prefix_of_the_training_tokens(gpt2_tokenizer, answer):
    enc = PromptEncoder(gpt2_tokenizer)
    prompt = enc.encode_prompt(CONTEXT, QUESTION)
    train = enc.encode_train(CONTEXT, QUESTION, answer)["input_ids"]
    assert train[: len(prompt)] == prompt
    # and it is what the prompt text decodes to
    assert gpt2_tokenizer.decode(prompt) == format_prompt(CONTEXT, QUESTION)


def test_no_bos_token_is_added(gpt2_tokenizer):
    enc = PromptEncoder(gpt2_tokenizer)
    assert (
        enc.encode_prompt("c", "q")[0] == gpt2_tokenizer("Context", add_special_tokens=False)["input_ids"][0]
    )


def _long_context(n_sentences: int, answer_sentence: int) -> tuple[str, int]:
    sentences = [f"Sentence number {i} talks about nothing in particular." for i in range(n_sentences)]
    sentences[answer_sentence] = "The treasure is hidden under the old oak tree."
    context = " ".join(sentences)
    return context, context.index("the old oak tree")


@pytest.mark.parametrize("where", [0, 50, 99])
def test_truncation_keeps_a_window_with_the_answer(gpt2_tokenizer, where):
    context, start = _long_context(100, where)
    enc = PromptEncoder(gpt2_tokenizer, max_length=96)
    stats = PromptStats()
    feat = enc.encode_train(context, "Where is the treasure?", "the old oak tree", start, stats)
    assert feat is not None and len(feat["input_ids"]) <= 96
    assert stats.truncated == 1 and stats.encoded == 1
    prompt_text = gpt2_tokenizer.decode(feat["input_ids"][: feat["prompt_length"]])
    assert "the old oak tree" in prompt_text
    assert prompt_text.startswith("Context:") and prompt_text.endswith(
        "\nQuestion: Where is the treasure?\nAnswer:"
    )
    assert gpt2_tokenizer.decode(feat["input_ids"][feat["prompt_length"] : -1]) == " the old oak tree"


def test_truncation_finds_the_answer_when_the_offset_is_wrong(gpt2_tokenizer):
    context, _ = _long_context(60, 30)
    feat = PromptEncoder(gpt2_tokenizer, max_length=80).encode_train(context, "Where?", "the old oak tree", 3)
    assert "the old oak tree" in gpt2_tokenizer.decode(feat["input_ids"][: feat["prompt_length"]])


def test_an_answer_given_with_leading_space_keeps_its_own_occurrence(gpt2_tokenizer):
    # the gold " Sentence number 90" points at the space before it; stripped, it must still mean that one
    # occurrence, not the first "Sentence number" in the context (whose window would lack number 90's text)
    context, _ = _long_context(100, 50)
    start = context.index(" Sentence number 90")
    feat = PromptEncoder(gpt2_tokenizer, max_length=64).encode_train(context, "Which?", " Sentence number 9", start)
    prompt = gpt2_tokenizer.decode(feat["input_ids"][: feat["prompt_length"]])
    assert "Sentence number 90 talks" in prompt and "Sentence number 9 talks" not in prompt


def test_skips_when_question_and_answer_alone_do_not_fit(gpt2_tokenizer):
    stats = PromptStats()
    enc = PromptEncoder(gpt2_tokenizer, max_length=16)
    long_q = "What is " + "very " * 20 + "long?"
    assert enc.encode_train("short context", long_q, "answer", None, stats) is None
    assert stats.skipped["question and answer longer than max_length"] == 1
    assert enc.encode_train("ctx", "q", "   ", None, stats) is None
    assert stats.skipped["empty answer"] == 1
    assert "2 encoded" not in stats.summary() and "empty answer" in stats.summary()


def test_skips_an_answer_that_is_not_in_a_too_long_context(gpt2_tokenizer):
    context, _ = _long_context(100, 10)
    stats = PromptStats()
    assert (
        PromptEncoder(gpt2_tokenizer, max_length=64).encode_train(context, "q?", "a unicorn", None, stats)
        is None
    )
    assert stats.skipped["answer does not fit in a context window"] == 1


def test_eval_prompt_too_long_keeps_the_beginning_and_counts(gpt2_tokenizer):
    context, _ = _long_context(100, 10)
    stats = PromptStats()
    prompt = PromptEncoder(gpt2_tokenizer, max_length=64).encode_prompt(context, "Where?", stats)
    assert len(prompt) == 64 and stats.truncated == 1
    text = gpt2_tokenizer.decode(prompt)
    assert text.startswith("Context: Sentence number 0") and text.endswith("\nQuestion: Where?\nAnswer:")


def test_a_question_longer_than_the_prompt_is_cut_to_its_end_never_over_the_length():
    """A question alone over the prompt length: the prompt keeps no context and the question's last tokens
    (ending in "\\nAnswer:"), is never longer than max_length, and is counted apart from contexts cut."""
    from loraqa.model import load_gpt2_tokenizer
    from loraqa.prompt import PromptEncoder, PromptStats

    tok = load_gpt2_tokenizer()
    encoder, stats = PromptEncoder(tok, max_length=64), PromptStats()
    context_part, question_part = encoder.encode_prompt_parts(
        "The box is red.", "What " + "very " * 100 + "color?", stats
    )
    assert len(context_part) + len(question_part) == 64
    assert tok.decode(question_part).endswith("color?\nAnswer:")
    assert stats.questions_cut == 1 and stats.truncated == 0
    assert "1 with the question cut to fit" in stats.summary()
