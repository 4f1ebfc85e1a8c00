"""loraqa: LoRA fine-tuning of causal language models for extractive QA, scored by SQuAD EM/F1.

The pipeline, one module per stage:
data -> prompt -> model -> train -> answer -> score -> sweep (grid or search) -> report -> serve;
the README's Architecture section names the module of each.
"""

__version__ = "0.1.0"
