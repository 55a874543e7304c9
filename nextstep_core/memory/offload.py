"""Block swap: keep N decoder layers in CPU memory and stream each to the compute device just
before it runs, with the next one prefetched while the current one computes.

    enable_block_swap(model, 20)      # the last 20 of the decoder's layers live on the CPU
    model.to("cuda")                   # moves everything else; swapped layers stay where they are

Two placements per swapped layer:
- storage: the layer's tensors, views into ONE host buffer holding every swapped tensor (64-byte
  aligned). Where CUDA is present the buffer is page-locked in place (`cudaHostRegister`, as
  ComfyUI pins), so copies run asynchronously and the pinned bytes are the swapped weights' bytes
  (pinning each tensor through the caching host allocator rounded each up to a power of two).
- compute: a copy on the device of the hidden states that reach the layer, made right before
  the layer runs (or earlier, by the prefetch) and dropped right after it.

The swapped layers stay in the module tree, under their own names: `state_dict()`,
`parameters()` and `save_converted` see the whole model, with or without swap. What keeps them
in host memory is their modules' `_apply`: moves and casts (`model.to(device)`, ComfyUI's
per-module `.to`) pass over a swapped layer's tensors. Each swapped layer's `forward` is wrapped
to bring its tensors in and drop them after. On a CPU-only machine the compute placement is a
second CPU copy: the mechanism runs the same way (tests check the outputs are identical and
that at most two swapped layers have a compute copy at once). On the meta device (shapes only)
the storage stays on meta.

Order: layers run in index order for every forward (prefill, then once per image token), so
when swapped layer i starts, the next swapped layer (wrapping round to the first for the next
forward) is prefetched: on CUDA on a side stream, overlapping layer i's compute.
"""

from __future__ import annotations

import weakref

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


ALIGN = 64  # bytes; every storage tensor starts on such a boundary inside the host buffer


def host_buffer_layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of the tensors packed into one buffer (each aligned to ALIGN), and its size."""
    offsets, size = [], 0
    for t in tensors:
        size = -(-size // ALIGN) * ALIGN
        offsets.append(size)
        size += t.numel() * t.element_size()
    return offsets, size


def register_pinned(owner, buffer: torch.Tensor) -> weakref.finalize | None:
    """Page-lock a host buffer where it is (cudaHostRegister), or None if CUDA refuses. Returns the
    finalizer that unregisters it: called by disable_block_swap, or when `owner` is collected (while
    the buffer still lives)."""
    cudart = torch.cuda.cudart()
    if cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0) != 0:
        return None
    return weakref.finalize(owner, cudart.cudaHostUnregister, buffer.data_ptr())


def keep_storage(module: nn.Module):
    """An `_apply` for a swapped layer's modules: device moves and casts leave its tensors as they are."""
    def apply(fn, recurse=True):
        return module
    return apply


class BlockSwap:
    """The swapped layers of one model, their storage copies, and the compute copies in flight.

    Counters for tests and the planner: `max_resident` (most swapped layers holding a compute
    copy at once), `transfers` (layers copied to the compute device). `buffer`: the one host
    buffer behind every storage tensor (None on the meta device); `pinned`: whether it is
    page-locked.
    """

    def __init__(self, layers: dict[int, nn.Module], storage_device: str | torch.device = "cpu",
                 pin: bool | None = None):
        self.order = sorted(layers)
        self.layers = layers
        self.storage: dict[int, list[torch.Tensor]] = {}
        self.buffer, self.pinned, self.unpin = None, False, None
        if any(getattr(m, n).is_meta for i in self.order for m, n, _ in layer_tensors(layers[i])):
            for index in self.order:
                self.storage[index] = [getattr(m, n).data for m, n, _ in layer_tensors(layers[index])]
        else:
            self.pack(torch.device(storage_device))
            pin = torch.cuda.is_available() if pin is None else pin
            self.unpin = register_pinned(self, self.buffer) if pin and self.buffer.device.type == "cpu" else None
            self.pinned = self.unpin is not None
        for index, layer in layers.items():
            place(layer, self.storage[index])
            for module in layer.modules():
                object.__setattr__(module, "_apply", keep_storage(module))
        self.in_flight: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.copy_stream = None
        self.max_resident = 0
        self.transfers = 0

    def pack(self, device: torch.device) -> None:
        """Copy every swapped tensor into one buffer on `device`, layer by layer; each layer's originals
        are dropped once it is copied (the buffer's pages are only touched as they are filled)."""
        offsets, size = host_buffer_layout([getattr(m, n) for i in self.order
                                            for m, n, _ in layer_tensors(self.layers[i])])
        self.buffer = torch.empty(size, dtype=torch.uint8, device=device)
        position = iter(offsets)
        for index in self.order:
            views = []
            for module, name, _ in layer_tensors(self.layers[index]):
                t, offset = getattr(module, name), next(position)
                view = self.buffer[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                views.append(view.copy_(t.data))
            self.storage[index] = views
            place(self.layers[index], views)

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


def swapped_forward(layer: nn.Module, index: int, swap: BlockSwap):
    """The forward of a swapped layer: its tensors brought to the hidden states' device around the call."""
    forward = type(layer).forward

    def run(hidden_states: torch.Tensor, *args, **kwargs):
        swap.bring_in(index, hidden_states.device)
        try:
            return forward(layer, hidden_states, *args, **kwargs)
        finally:
            swap.evict(index)
    return run


def enable_block_swap(model: nn.Module, count: int, storage_device: str | torch.device = "cpu",
                      pin: bool | None = None) -> BlockSwap | None:
    """Swap the last `count` decoder layers of a NextStepModel (`model.backbone.layers`); returns the BlockSwap
    (also kept as `model.block_swap`). count 0 leaves the model as it is. The layers keep their names."""
    layers = model.backbone.layers
    check_block_swap(count, len(layers))
    disable_block_swap(model)
    if count == 0:
        return None
    indices = range(len(layers) - count, len(layers))
    swap = BlockSwap({i: layers[i] for i in indices}, storage_device, pin)
    for i in indices:
        object.__setattr__(layers[i], "forward", swapped_forward(layers[i], i, swap))
    model.block_swap = swap
    return swap


def disable_block_swap(model: nn.Module) -> None:
    """Make swapped layers plain layers again (their tensors stay in the storage buffer, unpinned)."""
    swap = getattr(model, "block_swap", None)
    if swap is None:
        return
    swap.release()
    for i in swap.order:
        layer = model.backbone.layers[i]
        for module in layer.modules():
            module.__dict__.pop("_apply", None)
        layer.__dict__.pop("forward", None)
    if swap.pinned:
        swap.unpin()
        swap.pinned = False
    model.block_swap = None
