"""Host-to-device copies that do not wait for the device.

`tensor.to("cuda")` from ordinary (pageable) host memory synchronizes the host with the current
stream before it returns: the host stops until every kernel queued so far has run. A serving
step uploads its batch layout (token ids, positions, block table, task tables) every step, so
each such copy would stall the host behind the previous step's kernels and the host's work could
never overlap the device's. `to_device` stages the arrays in pinned memory instead and copies
them with `non_blocking=True`: the copy is queued in stream order like a kernel, and PyTorch's
pinned-memory cache keeps each staging buffer until its copy has run.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

_ALIGN_BYTES = 16  # each array starts 16-byte aligned, as Triton's pointer specialization expects


def to_device(device: torch.device | str, *arrays: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`arrays` (numpy arrays or CPU tensors) as tensors on `device`, same shapes and dtypes.

    On a CPU device the tensors share the arrays' memory (no copy). On CUDA, arrays of one dtype
    travel together: one pinned staging buffer and one non-blocking copy per dtype, each result
    a contiguous, 16-byte-aligned view of the device buffer. The copies are queued on the current
    stream: kernels on other streams may read the results only after `wait_for_upload`.
    """
    device = torch.device(device)
    tensors = [torch.from_numpy(np.require(a, requirements="C")) if isinstance(a, np.ndarray) else a for a in arrays]
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        # Nothing to stage: a copy between devices, or to the CPU (a no-op there).
        return tuple(t.to(device) for t in tensors)
    if torch.cuda.is_current_stream_capturing():
        # A copy captured into a graph would replay from a staging buffer that is reused later.
        raise RuntimeError(
            "to_device: a host-to-device copy inside CUDA graph capture; run the step once before "
            "capturing it, so its host metadata is already on the device"
        )
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_dtype[t.dtype].append(i)
    for dtype, members in by_dtype.items():
        step = max(1, _ALIGN_BYTES // dtype.itemsize)
        offsets, size = [], 0
        for i in members:
            offsets.append(size)
            size += -(-tensors[i].numel() // step) * step
        staged = torch.empty(max(size, 1), dtype=dtype, pin_memory=True)
        for i, offset in zip(members, offsets):
            staged[offset : offset + tensors[i].numel()] = tensors[i].reshape(-1)
        buffer = staged.to(device, non_blocking=True)
        for i, offset in zip(members, offsets):
            out[i] = buffer[offset : offset + tensors[i].numel()].view(tensors[i].shape)
    return tuple(out)  # type: ignore[arg-type]


def record_upload(device: torch.device | str) -> torch.cuda.Event | None:
    """An event after the copies `to_device` just queued on `device`'s current stream (None off
    CUDA). A cache that hands uploaded tensors to later calls, which may run on other streams
    (nano-batches), keeps it beside them for `wait_for_upload`."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_for_upload(event: torch.cuda.Event | None, *tensors: torch.Tensor) -> None:
    """Before kernels on the current stream read cached uploaded `tensors`: the stream waits for
    the copy (`event`, from `record_upload`; the host does not wait), and the tensors' memory is
    marked in use by the stream, so the caching allocator cannot hand it out while those kernels
    may still run. Nothing during graph capture: capture begins after a device synchronization,
    so the copy is done, and the graph keeps what it reads alive itself."""
    if event is None or torch.cuda.is_current_stream_capturing():
        return
    stream = torch.cuda.current_stream(tensors[0].device)
    stream.wait_event(event)
    for t in tensors:
        t.record_stream(stream)
