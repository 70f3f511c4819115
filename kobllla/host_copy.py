"""Host-to-device copies that do not stall the GPU."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU from pinned memory without waiting (a copy from pageable memory
    waits for the GPU's queue to drain). On the CPU, ``t`` itself."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
