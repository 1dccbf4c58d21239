"""Chapter 2's LoRA layer from scratch, checked against peft's LoRA layer on the same weights: the
reference and a learner's own version pass, and planted mistakes are named."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.checks import CheckError, check_lora_linear
from utils.lora import LoRALinear


class Mine(nn.Module):
    """Written differently: F.linear, the scale stored once, merge into a fresh layer."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad = False
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + self.scale * nn.functional.linear(
            nn.functional.linear(x, self.lora_A), self.lora_B
        )

    def merge(self):
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out.weight.data = self.base.weight.data + self.scale * self.lora_B.data @ self.lora_A.data
        if self.base.bias is not None:
            out.bias.data = self.base.bias.data.clone()
        return out


def test_the_reference_and_a_learners_version_pass(capsys):
    check_lora_linear(LoRALinear)
    check_lora_linear(Mine)
    assert capsys.readouterr().out.count("[check passed]") == 2


def _variant(**changes):
    """Mine, with one thing changed."""

    class Bug(Mine):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            if changes.get("scale"):
                self.scale = changes["scale"](r, alpha)
            if changes.get("unfrozen"):
                self.base.requires_grad_(True)
            if changes.get("b_random"):
                self.lora_B.data.normal_()
            if changes.get("a_zero"):
                self.lora_A.data.zero_()
            if changes.get("transposed"):
                self.lora_A = nn.Parameter(self.lora_A.data.T.contiguous())

        if changes.get("merge_unscaled"):

            def merge(self):
                out = nn.Linear(
                    self.base.in_features, self.base.out_features, bias=self.base.bias is not None
                )
                out.weight.data = self.base.weight.data + self.lora_B.data @ self.lora_A.data
                if self.base.bias is not None:
                    out.bias.data = self.base.bias.data.clone()
                return out

        if changes.get("merge_in_place"):

            def merge(self):
                self.base.weight.data += self.scale * self.lora_B.data @ self.lora_A.data
                return self.base

        if changes.get("merge_no_bias"):

            def merge(self):
                out = nn.Linear(self.base.in_features, self.base.out_features)
                out.weight.data = self.base.weight.data + self.scale * self.lora_B.data @ self.lora_A.data
                out.bias.data.zero_()
                return out

    return Bug


@pytest.mark.parametrize(
    "bug, message",
    [
        (_variant(scale=lambda r, a: 1.0), "the update is not scaled"),
        (_variant(scale=lambda r, a: a), "scaled by alpha; LoRA scales it by alpha / r"),
        (_variant(scale=lambda r, a: r / a), "the scale is upside down"),
        (_variant(unfrozen=True), "the base layer must be frozen"),
        (_variant(b_random=True), "should start at zero"),
        (_variant(a_zero=True), "starts at zero too"),
        (_variant(transposed=True), "(transposed?)"),
        (_variant(merge_unscaled=True), "missing the scale alpha / r"),
        (_variant(merge_in_place=True), "itself changed"),
        (_variant(merge_no_bias=True), "lost the base layer's bias"),
    ],
    ids=[
        "unscaled",
        "alpha-only",
        "r-over-alpha",
        "base-trainable",
        "B-random",
        "A-zero",
        "A-transposed",
        "merge-unscaled",
        "merge-in-place",
        "merge-drops-bias",
    ],
)
def test_the_checker_names_planted_mistakes(bug, message):
    with pytest.raises(CheckError) as failure:
        check_lora_linear(bug)
    assert message in str(failure.value), str(failure.value)


def test_the_check_leaves_the_notebooks_random_state_alone():
    """The learner's layer draws A from the global generator; the cells after the check (peft's own
    adapters) must draw what they would have drawn without it."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_lora_linear(LoRALinear)
    assert torch.equal(torch.rand(3), expected)
