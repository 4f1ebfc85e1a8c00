"""loraqa: LoRA fine-tuning of causal language models for extractive QA, scored by SQuAD EM/F1.

The pipeline, one module per stage:
data -> prompt -> model -> train -> generate -> metrics -> sweep -> report.
"""

__version__ = "0.1.0"
