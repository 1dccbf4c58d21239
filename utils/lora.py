"""LoRA (Hu et al., 2022) from scratch: Chapter 2's exercise writes :class:`LoRALinear` and checks it
against ``peft``'s LoRA layer on the same weights (this module is the checker's reference). The
chapter then trains with ``peft`` itself, the maintained implementation."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``base`` linear layer plus a trainable low-rank update:
    ``y = base(x) + (alpha / r) * x A^T B^T`` with ``lora_A [r, in]`` initialised as ``nn.Linear``'s
    weights (Kaiming-uniform, as ``peft``) and ``lora_B [out, r]`` at zero, so that the layer starts
    exactly at ``base``. :meth:`merge` returns one ordinary ``nn.Linear`` with ``W + (alpha / r) B A``."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.alpha / self.r) * (x @ self.lora_A.T @ self.lora_B.T)

    def merge(self) -> nn.Linear:
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + (self.alpha / self.r) * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged.to(self.base.weight.device, self.base.weight.dtype)
