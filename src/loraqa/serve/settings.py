"""What ``loraqa serve`` may hold and wait for, and where it listens, defined once: the command's options default
to these. No web framework is imported here, so the command line reads them without loading one."""

from __future__ import annotations

from dataclasses import dataclass

from .limits import QUESTION_TOKENS

LOOPBACK = "127.0.0.1"  # the address `loraqa serve` (without --host) and BackgroundServer listen on


@dataclass(frozen=True)
class ServeSettings:
    queue_size: int = 128  # requests waiting to be answered; the next one gets a 503
    max_batch: int | None = None  # questions answered together (None: the run's eval.batch_size)
    max_questions: int = 32  # questions in one request
    question_tokens: int = QUESTION_TOKENS  # prompt room for one question
    gather_ms: float = 200.0  # the most a batch waits for the clients of the last one to ask again

    def check(self) -> None:
        """A ValueError naming the first setting out of bounds by its ``loraqa serve`` option (``--queue-size``)."""
        for name in ("queue_size", "max_questions", "question_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_option(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"{_option('max_batch')} must be at least 1, got {self.max_batch}")
        if not 0 <= self.gather_ms <= 1000:
            raise ValueError(f"{_option('gather_ms')} must be 0 to 1000, got {self.gather_ms}")


# the settings `loraqa serve` has an option for, each spelled as argparse spells its dest (--queue-size: queue_size)
_OPTIONS = ("queue_size", "max_batch", "max_questions", "gather_ms")


def _option(name: str) -> str:
    """The option that sets ``name``, or the name itself for a setting with none (``question_tokens``)."""
    return "--" + name.replace("_", "-") if name in _OPTIONS else name
