"""One LoRA computation for a batch whose rows belong to different adapters.

PEFT's mixed-adapter forward (`adapter_names=[...]`) gathers each adapter's rows by
Python index lists in every LoRA module. Our batches keep each tenant's rows
contiguous (a job joins the batch whole, retiring rows keeps the order, training
batches are concatenated tenant by tenant), so every LoRA module computes all
adapters of a batch at once: two batched matmuls over a [segments, rows, features]
view of the batch (the BGMV/SGMV idea of Punica, written with torch ops), A and B
stacked (zero-padded where ranks differ). Target modules may differ per adapter. The
segments are found once per batch change (`torch.unique_consecutive`), not per module
or per step. The computation is differentiable, so training uses the same path.

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
        segments = [(name, lo, hi) for name, lo, hi in self.segments if name in module.lora_A]
        if not segments:
            return result
        pieces, covered = [], 0
        for lo, hi, part in self._deltas(module, segments, x):
            if lo > covered:
                pieces.append(result.new_zeros((lo - covered, *result.shape[1:])))
            pieces.append(part.to(result.dtype))
            covered = hi
        if covered < result.shape[0]:
            pieces.append(result.new_zeros((result.shape[0] - covered, *result.shape[1:])))
        # Out of place: autograd keeps the frozen base output out of the graph.
        return result + (torch.cat(pieces) if len(pieces) > 1 else pieces[0])

    @staticmethod
    def _deltas(module: LoraLinear, segments: list[tuple[str, int, int]], x: torch.Tensor):
        """(first row, end row, scale * B @ A @ x) spans covering the segments, in order.

        Several adapters go through two batched matmuls over a [segments, rows, features]
        view (the BGMV/SGMV idea): free when the segments are back to back and equally long
        (a training batch: every tenant's prompts x samples; a fresh decode batch); ranks
        may differ (A and B are zero-padded to the largest, which adds nothing and gets no
        gradient). Ragged segments (rows that stopped have left) are padded when no gradient
        is needed, and otherwise take the per-segment loop, which is also the reference the
        batched path is tested against."""
        lengths = [hi - lo for _, lo, hi in segments]
        back_to_back = all(a[2] == b[1] for a, b in zip(segments, segments[1:]))
        even = back_to_back and len(set(lengths)) == 1
        if len(segments) == 1 or not (even or not torch.is_grad_enabled()):
            out = []
            for name, lo, hi in segments:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                part = torch.nn.functional.linear(torch.nn.functional.linear(x[lo:hi].to(a.dtype), a), b)
                out.append((lo, hi, part * module.scaling[name]))
            return out
        names = [name for name, _, _ in segments]
        weights_a = [module.lora_A[n].weight for n in names]  # [r, in] each
        weights_b = [module.lora_B[n].weight.t() for n in names]  # [r, out] each
        if len({w.shape[0] for w in weights_a}) == 1:
            a, b = torch.stack(weights_a), torch.stack(weights_b)
        else:
            pad = torch.nn.utils.rnn.pad_sequence
            a, b = pad(weights_a, batch_first=True), pad(weights_b, batch_first=True)
        scale = torch.tensor([module.scaling[n] for n in names], dtype=a.dtype, device=a.device).view(-1, 1, 1)
        first, last, count = segments[0][1], segments[-1][2], len(segments)
        if even:
            xs = x[first:last].to(a.dtype).reshape(count, -1, x.shape[-1])
        else:
            xs = torch.nn.utils.rnn.pad_sequence([x[lo:hi] for _, lo, hi in segments], batch_first=True)
            xs = xs.to(a.dtype).reshape(count, -1, x.shape[-1])
        out = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b) * scale  # [segments, rows * tokens, out]
        if even:
            return [(first, last, out.reshape(last - first, *x.shape[1:-1], out.shape[-1]))]
        out = out.view(count, max(lengths), *x.shape[1:-1], out.shape[-1])
        return [(lo, hi, out[i, : hi - lo]) for i, (_, lo, hi) in enumerate(segments)]

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
