"""Kernel-test fixtures: every buffer the Triton launchers allocate starts as NaN."""
import pytest

import accuracy


@pytest.fixture(autouse=True)
def _poison_every_test(poison):
    """Every kernel test runs with NaN-filled launcher buffers (tests/conftest.py: poison)."""
    return poison


class Helpers:
    """Inputs in every layout the kernels accept, with the float64 references and accuracy rule of
    tests/accuracy.py."""

    ACT = accuracy.ACT
    grads = staticmethod(accuracy.grads)
    rand = staticmethod(accuracy.rand)
    ref_lnws = staticmethod(accuracy.ref_lnws)
    ref_merge = staticmethod(accuracy.ref_merge)
    ref_mlp = staticmethod(accuracy.ref_mlp)
    mlp_params = staticmethod(accuracy.mlp_params)
    mlp_input = staticmethod(accuracy.mlp_input)
    alpha_terms = staticmethod(accuracy.alpha_terms)
    check = staticmethod(accuracy.check)
    compare = staticmethod(accuracy.compare)

    @staticmethod
    def hidden(L, lead, D, dtype, layout):
        """(leaves, build): leaf tensors, and build(leaves) -> (h for the ops, list of L layer views).

        layouts: stacked [L, ..., D]; strided = stacked[:, :, 1:] (CLS dropped from [L, B, T+1, D]);
        list = L separate tensors; list_strided = L separate [B, T+1, D] buffers, each [:, 1:].
        """
        r = lambda *s: Helpers.rand(*s, dtype=dtype, scale=2.0, shift=0.5)  # noqa: E731
        if layout == "stacked":
            return [r(L, *lead, D)], lambda ls: (ls[0], list(ls[0].unbind(0)))
        if layout == "strided":
            return [r(L, lead[0], lead[1] + 1, D)], lambda ls: (ls[0][:, :, 1:], list(ls[0][:, :, 1:].unbind(0)))
        if layout == "list":
            return [r(*lead, D) for _ in range(L)], lambda ls: (list(ls), list(ls))
        if layout == "list_strided":
            return ([r(lead[0], lead[1] + 1, D) for _ in range(L)],
                    lambda ls: ([x[:, 1:] for x in ls], [x[:, 1:] for x in ls]))
        raise ValueError(layout)


@pytest.fixture
def H():
    return Helpers
