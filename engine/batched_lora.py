"""One LoRA computation for a batch whose rows belong to different adapters.

PEFT's mixed-adapter forward (`adapter_names=[...]`) gathers each adapter's rows by
Python index lists in every LoRA module. Our batches keep each tenant's rows
contiguous (a job joins the batch whole, retiring rows keeps the order, training
batches are concatenated tenant by tenant), so here every LoRA module does one
matmul pair per contiguous segment on views of the batch, with no copies and no
per-row work: the SGMV idea of Punica (segmented gather matrix-vector), written with
torch ops. Ranks and target modules may differ per adapter. The segments are found
once per batch change (`torch.unique_consecutive`), not per module or per step. The
computation is differentiable, so training uses the same path.

Invariant: inside `routed(routing)` every LoRA Linear of the model computes
`base(x) + scale * B @ A @ x` for each row with that row's adapter (none for
"__base__" or an adapter that does not target the module), which is PEFT's
per-adapter forward (tests compare the two). Outside it the PEFT forward runs.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

_active = threading.local()


class AdapterRouting:
    """Which adapter each row of the current forward uses, shared by every LoRA module.

    `names` fixes the slot order (slot i+1 is names[i], slot 0 is no adapter); `index`
    is [rows] of slots. Rows and names change as rows join and leave the batch.
    """

    def __init__(self, names: list[str], row_adapters: list[str], device: torch.device, **_ignored):
        self.names = list(dict.fromkeys(n for n in names if n != "__base__"))
        self.slots = {name: i + 1 for i, name in enumerate(self.names)}
        self.index = torch.tensor([self.slots.get(a, 0) for a in row_adapters], dtype=torch.long, device=device)
        self.device = device
        self._segments: list[tuple[str, int, int]] | None = None

    # -- rows come and go during continuous batching ---------------------------------
    def select(self, keep: torch.Tensor) -> None:
        """Keep only these rows (in this order)."""
        self.index = self.index[keep]
        self._segments = None

    def append(self, other: "AdapterRouting") -> None:
        """Add another routing's rows after these (their adapters join the slot table)."""
        for name in other.names:
            if name not in self.slots:
                self.names.append(name)
                self.slots[name] = len(self.names)
        remap = torch.tensor([0] + [self.slots[n] for n in other.names], dtype=torch.long, device=self.device)
        self.index = torch.cat([self.index, remap[other.index]])
        self._segments = None

    @property
    def segments(self) -> list[tuple[str, int, int]]:
        """(adapter, first row, end row) for each run of rows with one adapter."""
        if self._segments is None:
            slots, counts = torch.unique_consecutive(self.index, return_counts=True)
            segments, start = [], 0
            for slot, count in zip(slots.tolist(), counts.tolist()):
                if slot:
                    segments.append((self.names[slot - 1], start, start + count))
                start += count
            self._segments = segments
        return self._segments

    # -- the computation ------------------------------------------------------------
    def apply(self, module: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        result = module.base_layer(x)
        lora_a, lora_b, scaling = module.lora_A, module.lora_B, module.scaling
        pieces, covered, used = [], 0, False
        for name, lo, hi in self.segments:
            if name not in lora_a:
                continue
            if lo > covered:
                pieces.append(result.new_zeros((lo - covered, *result.shape[1:])))
            a, b = lora_a[name].weight, lora_b[name].weight
            part = x[lo:hi].to(a.dtype)
            pieces.append((torch.nn.functional.linear(torch.nn.functional.linear(part, a), b)
                           * scaling[name]).to(result.dtype))
            covered, used = hi, True
        if not used:
            return result
        if covered < result.shape[0]:
            pieces.append(result.new_zeros((result.shape[0] - covered, *result.shape[1:])))
        # Out of place: autograd keeps the frozen base output out of the graph.
        return result + (torch.cat(pieces) if len(pieces) > 1 else pieces[0])


@contextlib.contextmanager
def routed(routing: AdapterRouting):
    """Every LoRA module of an installed model uses this routing inside the block."""
    previous = getattr(_active, "routing", None)
    _active.routing = routing
    try:
        yield routing
    finally:
        _active.routing = previous


def install(model: torch.nn.Module) -> int:
    """Give each PEFT LoRA Linear of the model the routed forward (idempotent; call after
    adding adapters, since PEFT wraps newly targeted modules). Returns how many were new."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not getattr(module, "_clora_routed", False):
            original = module.forward

            def forward(self, x, *args, _original=original, **kwargs):
                routing = getattr(_active, "routing", None)
                if routing is None or kwargs.get("adapter_names") is not None:
                    return _original(x, *args, **kwargs)
                return routing.apply(self, x)

            module.forward = types.MethodType(forward, module)
            module._clora_routed = True
            count += 1
    return count
