"""RMSNorm compiled for training: a fused loop for its forward and one for its backward pass.

In eager mode a Llama-family RMSNorm is a chain of passes over the batch x length x width activations: the
cast to fp32, the square, the mean, the scaling, the cast back, the weight; its backward pass as many again.
SmolLM2 has 61 norms, and in a bf16 training step on a CPU their passes are much of the step's ``aten::mul``
and ``aten::copy_`` (13% and 7% of it on the AMX VM). Compiled by ``torch.compile`` (inductor, dynamic shapes,
so one compilation serves every batch width) the same arithmetic runs 3.5-4.4x faster per norm, and a whole
training step ~7% faster (``benchmarks/profile_step.py --against train.compile=off``, docs/performance.md).

:func:`compile_norms` swaps the forward of each norm in :data:`NORM_CLASSES` (classes whose forward is
exactly :func:`rms_norm`'s arithmetic; a test checks each against its own forward) for the compiled function:

- only while gradients are computed: answering (``torch.no_grad``) runs the class's own forward, so answers do
  not depend on the switch and generation's one-token shapes compile nothing;
- only where the compiler works: a probe compiles the forward and backward once up front; where inductor
  cannot build its kernels (no C++ compiler, say) the norms stay eager, with a warning.

The weights are the modules' own parameters, so checkpoints and saved adapters are unchanged.
``train.compile`` chooses it (:func:`loraqa.devices.resolve_compile`).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

# transformers' RMSNorm classes that compute exactly rms_norm below (Gemma's adds 1 to its weight; T5's casts
# elsewhere: not listed)
NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})


@torch.compile(dynamic=True)
def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``'s arithmetic: normalised in fp32, cast back, times the weight."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def _forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(module).forward(module, hidden_states)
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def compile_norms(model: torch.nn.Module) -> int:
    """Route the forward of every :data:`NORM_CLASSES` module of ``model`` through :func:`rms_norm` while
    gradients are computed; returns how many (0 for a model without such norms, or where the probe fails)."""
    norms = [m for m in model.modules() if type(m).__name__ in NORM_CLASSES]
    if not norms or not compiler_works(norms[0]):
        return 0
    for norm in norms:
        # an instance's own forward, as accelerate's hooks set it: nn.Module.__call__ looks it up on the instance
        norm.forward = functools.partial(_forward, norm)
    return len(norms)


def compiler_works(norm: torch.nn.Module) -> bool:
    """Whether :func:`rms_norm` compiles, forward and backward, on an input like ``norm``'s (its weight's dtype
    and device); compiled once here, the training steps reuse it. False, with a warning, where it does not."""
    # a detached copy: the probe's gradient must not land in the model's
    weight = norm.weight.detach().requires_grad_(norm.weight.requires_grad)
    # sizes of 2 and more: dynamic=True compiles them as symbols, so any batch shape reuses the kernels
    x = torch.randn(2, 3, weight.numel(), dtype=weight.dtype, device=weight.device, requires_grad=True)
    try:
        rms_norm(x, weight, norm.variance_epsilon).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure to compile means eager norms, not a failed run
        log.warning("train.compile: the RMSNorms stay eager; torch.compile failed: %s", str(e).strip()[:300])
        return False
    return True
