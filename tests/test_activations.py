"""comm_fast.activations against transformers' own activation table (the encoders' ground truth)."""
import pytest
import torch
from transformers.activations import ACT2FN

from comm_fast.activations import ACTIVATIONS, activation, activation_backward

HF_NAME = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "quick_gelu": "quick_gelu"}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_transformers(name, seed):
    x = torch.randn(4096, dtype=torch.float64) * 4
    torch.testing.assert_close(activation(x, name), ACT2FN[HF_NAME[name]](x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_backward_matches_autograd(name, seed):
    x = (torch.randn(4096, dtype=torch.float64) * 4).requires_grad_()
    g = torch.randn(4096, dtype=torch.float64)
    (expected,) = torch.autograd.grad(ACT2FN[HF_NAME[name]](x), x, g)
    torch.testing.assert_close(activation_backward(name, g, x.detach()), expected, rtol=1e-10, atol=1e-12)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="activation: expected one of .*got 'swish'"):
        activation(torch.zeros(1), "swish")
