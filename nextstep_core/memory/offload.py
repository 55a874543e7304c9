"""Block swap: keep N decoder layers in CPU memory and stream each to the compute device just
before it runs, with the next one prefetched while the current one computes.

    enable_block_swap(model, 20)      # the last 20 of the decoder's layers live on the CPU
    model.to("cuda")                   # moves everything else; swapped layers stay where they are

Two placements per swapped layer:
- storage: the layer's tensors on `storage_device` (CPU; pinned when CUDA is present, so copies
  can run asynchronously). These are the only long-lived copy.
- compute: a copy on the device of the hidden states that reach the layer, made right before
  the layer runs (or earlier, by the prefetch) and dropped right after it.

The swapped layers are hidden from the module tree (each sits inside a `SwappedLayer` that does
not register it), so `model.to(device)`, `model.parameters()` and ComfyUI's model management
see, move and count only the resident part. On a CPU-only machine the compute placement is a
second CPU copy: the mechanism runs the same way (tests check the outputs are identical and
that at most two swapped layers have a compute copy at once).

Order: layers run in index order for every forward (prefill, then once per image token), so
when swapped layer i starts, the next swapped layer (wrapping round to the first for the next
forward) is prefetched: on CUDA on a side stream, overlapping layer i's compute.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NextStepError


def check_block_swap(count: int, num_layers: int) -> None:
    """Refuse a swap count the model cannot take, naming the setting."""
    if int(count) != count or count < 0:
        raise NextStepError(f"block_swap {count} must be a whole number of decoder layers, 0 or more")
    if count > num_layers:
        raise NextStepError(f"block_swap {count} is more than the model's {num_layers} decoder layers")


def uses_copy_stream(device: torch.device) -> bool:
    """Whether copies to `device` run on a side stream with events (CUDA), or inline."""
    return device.type == "cuda"


def layer_tensors(layer: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owning module, attribute, is parameter) for every tensor of a layer."""
    out = []
    for module in layer.modules():
        out += [(module, name, True) for name, p in module._parameters.items() if p is not None]
        out += [(module, name, False) for name, b in module._buffers.items() if b is not None]
    return out


def place(layer: nn.Module, tensors: list[torch.Tensor]) -> None:
    """Point a layer's parameters/buffers at `tensors` (in layer_tensors order), keeping the Parameter objects."""
    for (module, name, is_param), value in zip(layer_tensors(layer), tensors):
        if is_param:
            module._parameters[name].data = value
        else:
            module._buffers[name] = value


class BlockSwap:
    """The swapped layers of one model, their storage copies, and the compute copies in flight.

    Counters for tests and the planner: `max_resident` (most swapped layers holding a compute
    copy at once), `transfers` (layers copied to the compute device).
    """

    def __init__(self, layers: dict[int, nn.Module], storage_device: str | torch.device = "cpu",
                 pin: bool | None = None):
        self.order = sorted(layers)
        self.layers = layers
        pin = torch.cuda.is_available() if pin is None else pin
        self.storage: dict[int, list[torch.Tensor]] = {}
        for index, layer in layers.items():
            tensors = [getattr(m, n).data.to(storage_device) for m, n, _ in layer_tensors(layer)]
            self.storage[index] = [t.pin_memory() if pin and t.device.type == "cpu" else t for t in tensors]
            place(layer, self.storage[index])
        self.in_flight: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.copy_stream = None
        self.max_resident = 0
        self.transfers = 0

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.storage.values() for t in ts)

    def layer_bytes(self, index: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage[index])

    def start_copy(self, index: int, device: torch.device) -> None:
        """Begin copying a layer's storage tensors to `device` (asynchronously on CUDA)."""
        if index in self.in_flight:
            return
        sources = self.storage[index]
        if uses_copy_stream(device):
            if self.copy_stream is None:
                self.copy_stream = torch.cuda.Stream(device)
            self.copy_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.copy_stream):
                copies = [t.to(device, non_blocking=True) for t in sources]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            copies, event = [t.to(device, copy=True) for t in sources], None
        self.in_flight[index] = (copies, event)
        self.transfers += 1
        self.max_resident = max(self.max_resident, len(self.in_flight))

    def bring_in(self, index: int, device: torch.device) -> None:
        """Make layer `index` compute on `device`, and prefetch the next swapped layer."""
        self.start_copy(index, device)
        copies, event = self.in_flight[index]
        if event is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(event)
            for t in copies:
                t.record_stream(stream)  # the allocator must not reuse them before compute is done
        place(self.layers[index], copies)
        self.start_copy(self.next_after(index), device)

    def evict(self, index: int) -> None:
        """Point layer `index` back at its storage copy and drop the compute copy."""
        place(self.layers[index], self.storage[index])
        self.in_flight.pop(index, None)

    def next_after(self, index: int) -> int:
        position = self.order.index(index)
        return self.order[(position + 1) % len(self.order)]

    def release(self) -> None:
        """Drop every compute copy (a prefetched layer waiting for the next forward, for instance)."""
        for index in list(self.in_flight):
            self.evict(index)


class SwappedLayer(nn.Module):
    """Stands in a ModuleList for a swapped decoder layer, without registering it as a submodule."""

    def __init__(self, layer: nn.Module, index: int, swap: BlockSwap):
        super().__init__()
        self.hidden = [layer]  # a list: nn.Module does not register what is inside it
        self.index = index
        self.swap = [swap]

    @property
    def layer(self) -> nn.Module:
        return self.hidden[0]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        swap = self.swap[0]
        swap.bring_in(self.index, hidden_states.device)
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            swap.evict(self.index)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.hidden[0], name)


def enable_block_swap(model: nn.Module, count: int, storage_device: str | torch.device = "cpu",
                      pin: bool | None = None) -> BlockSwap | None:
    """Swap the last `count` decoder layers of a NextStepModel (`model.backbone.layers`); returns the BlockSwap
    (also kept as `model.block_swap`). count 0 leaves the model as it is."""
    layers = model.backbone.layers
    check_block_swap(count, len(layers))
    disable_block_swap(model)
    if count == 0:
        return None
    indices = range(len(layers) - count, len(layers))
    swap = BlockSwap({i: layers[i] for i in indices}, storage_device, pin)
    for i in indices:
        layers[i] = SwappedLayer(layers[i], i, swap)
    model.block_swap = swap
    return swap


def disable_block_swap(model: nn.Module) -> None:
    """Put swapped layers back into the module tree (on their storage device)."""
    swap = getattr(model, "block_swap", None)
    if swap is None:
        return
    swap.release()
    layers = model.backbone.layers
    for i in swap.order:
        layers[i] = layers[i].layer
    model.block_swap = None
