"""LoRA dropout with a fast CPU mask: nn.Dropout's semantics (rate, scale, independence, reproducibility)."""

import pytest
import torch

from loraqa.config import LoraConfig
from loraqa.lora_dropout import CpuLoraDropout
from loraqa.model import apply_lora, load_base_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_keeps_1_minus_p_scaled_by_its_inverse(dtype):
    drop = CpuLoraDropout(0.1).train()
    x = torch.ones(1000, 1000, dtype=dtype)
    y = drop(x)
    kept = y != 0
    rate = float(kept.float().mean())
    sigma = (0.1 * 0.9 / x.numel()) ** 0.5
    assert abs(rate - 0.9) < 5 * sigma
    assert torch.all(y[kept] == torch.tensor(65536 / (65536 - round(0.1 * 65536)), dtype=dtype))
    assert y.dtype == dtype and y.shape == x.shape


def test_each_call_draws_a_new_mask_and_a_seed_reproduces_them():
    drop = CpuLoraDropout(0.5).train()
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    a, b = drop(x), drop(x)
    assert not torch.equal(a, b)
    assert 0.1 < float(((a != 0) == (b != 0)).float().mean()) < 0.9  # independent, not complementary
    torch.manual_seed(7)
    assert torch.equal(drop(x), a) and torch.equal(drop(x), b)


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 64)])  # 105 elements: not a whole number of 64-bit draws
def test_the_mask_is_the_seeded_16_bit_draws_compared_to_the_threshold(shape):
    """Each element is kept where its 16-bit draw (PCG64, seeded from torch's generator) is at or above p's
    threshold: the masks of a given seed are those of this definition, whatever the code computing them."""
    import numpy as np

    drop = CpuLoraDropout(0.1).train()
    torch.manual_seed(3)
    got = drop.mask(torch.Size(shape), torch.bfloat16)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**63 - 1, ()))
    n = int(np.prod(shape))
    raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 3) // 4)
    draws = torch.from_numpy(raw.view(np.int16)[:n].astype(np.int32)).view(shape) + 32768  # 0 ... 65535
    keep = draws >= round(0.1 * 65536)
    assert torch.equal(got, keep.to(torch.bfloat16) * torch.tensor(drop.scale, dtype=torch.bfloat16))


def test_eval_mode_is_the_identity_and_the_gradient_is_the_mask():
    drop = CpuLoraDropout(0.3)
    x = torch.randn(32, 16, requires_grad=True)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * drop.scale)  # d(x * mask)/dx = mask


def test_apply_lora_installs_it_where_peft_put_dropout_and_nowhere_else():
    model = apply_lora(load_base_model("tiny-random-gpt2"), LoraConfig(r=4, alpha=8, dropout=0.05))
    drops = [m for m in model.modules() if isinstance(m, CpuLoraDropout)]
    assert drops and all(d.p == 0.05 for d in drops)
    assert not any(type(m) is torch.nn.Dropout and m.p == 0.05 for m in model.modules())
    none = apply_lora(load_base_model("tiny-random-gpt2"), LoraConfig(r=4, alpha=8, dropout=0.0))
    assert not any(isinstance(m, CpuLoraDropout) for m in none.modules())


def test_compiled_it_is_one_graph_drawing_the_same_masks():
    """Under torch.compile (train.compile=layers) the mask is a custom op, not a graph break at NumPy: the
    layer is traced whole (fullgraph), and a seed gives the masks eager dropout draws."""
    drop = CpuLoraDropout(0.25).train()
    compiled = torch.compile(drop, backend="eager", fullgraph=True)
    x = torch.ones(200, 200, dtype=torch.bfloat16)
    torch.manual_seed(3)
    got = compiled(x), compiled(x)
    torch.manual_seed(3)
    want = drop(x), drop(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) and not torch.equal(*got)
    kept = got[0] != 0
    assert abs(float(kept.float().mean()) - 0.75) < 5 * (0.25 * 0.75 / x.numel()) ** 0.5
