"""Point-to-point messages between ranks on torch.distributed, with a timeout on every receive.

Every value travels as a small int64 header (what it is, dtype, shape) followed by its payload, so
a receiver never needs to know a shape in advance. Messages between two ranks match in the order
they were sent (no tags, no any-source receives: NCCL supports neither). Sends are non-blocking;
receives wait at most `timeout_s` and turn any failure (timeout, closed connection) into a
`PeerError` naming the peer and what was awaited, so a dead or stuck rank never hangs the others.
"""

from __future__ import annotations

import datetime
import numbers
from typing import Any

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.int8)
# uint8 messages are reserved for failure reports: any receive can be answered by one.
_ERROR_DTYPE = torch.uint8
_HEADER = 12  # kind, dtype, ndim, up to 9 dims
_MAX_DIMS = _HEADER - 3
# What a payload holds: a tensor as it is, a Python int or float, a complex tensor as its real
# view (a last dim of 2: Llama-4's and DeepSeek's RoPE factors), or a bool tensor as int8.
_KIND_TENSOR, _KIND_INT, _KIND_FLOAT, _KIND_COMPLEX, _KIND_BOOL = range(5)


class PeerError(RuntimeError):
    """Another rank died, stopped answering, or aborted the run."""


class RunAborted(PeerError):
    """Another rank failed and told this one so: nothing left to tell the others. `src`: that rank."""

    def __init__(self, message: str, src: int | None = None) -> None:
        super().__init__(message)
        self.src = src


def check_timeout(timeout_s: Any) -> float:
    """`timeout_s` when it is a finite number of seconds > 0, else a ValueError saying so (NaN
    would fail every wait; torch's store reports 0 or less as a socket timed out after 0ms)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return timeout_s


class Transport:
    """Self-describing tensor (and int) messages, matched in send order, with receive timeouts."""

    def __init__(self, timeout_s: float, device: torch.device | str = "cpu") -> None:
        self.timeout_s = check_timeout(timeout_s)
        # NCCL moves device tensors only: headers and receive buffers live where the data does.
        self.device = torch.device(device)
        self.rank = dist.get_rank()
        self._pending: list[tuple[Any, tuple[torch.Tensor, ...]]] = []

    def send(self, value: torch.Tensor | int | float, dst: int) -> None:
        """Send a tensor (any layout; sent contiguous), an int or a float to rank `dst`, without
        waiting."""
        if isinstance(value, torch.Tensor) and value.dtype == _ERROR_DTYPE:
            raise TypeError("uint8 tensors are reserved for failure reports (send_failure); send another dtype")
        self._send(value, dst)

    def send_failure(self, reason: str, dst: int) -> None:
        """Answer rank `dst`'s next receive from this rank with a failure: it raises `RunAborted`
        with `reason` instead of returning a value."""
        self._send(torch.tensor(list(reason.encode()[:4000]), dtype=_ERROR_DTYPE), dst)

    def _send(self, value: torch.Tensor | int | float, dst: int) -> None:
        if isinstance(value, torch.Tensor):
            kind, payload = _KIND_TENSOR, value.detach()
            if payload.is_complex():
                kind, payload = _KIND_COMPLEX, torch.view_as_real(payload.resolve_conj())
            elif payload.dtype == torch.bool:
                kind, payload = _KIND_BOOL, payload.to(torch.int8)
            if payload.dtype not in _DTYPES:
                raise TypeError(f"cannot send dtype {value.dtype}; supported: {_DTYPES}, complex and bool")
            if payload.dim() > _MAX_DIMS:
                raise ValueError(f"cannot send a {value.dim()}-D tensor (at most {_MAX_DIMS} dims, complex ones "
                                 f"{_MAX_DIMS - 1})")
            payload = payload.to(self.device).contiguous()
        elif isinstance(value, numbers.Integral):  # numpy's and bool too, received as an int
            kind, payload = _KIND_INT, torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        elif isinstance(value, numbers.Real):
            kind, payload = _KIND_FLOAT, torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        else:
            raise TypeError(f"cannot send a {type(value).__name__}: only tensors, ints and floats travel")
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1], header[2] = kind, _DTYPES.index(payload.dtype), payload.dim()
        header[3 : 3 + payload.dim()] = torch.tensor(payload.shape, dtype=torch.int64)
        header = header.to(self.device)
        try:
            for t in (header, payload):
                self._pending.append((dist.isend(t, dst), (header, payload)))
        except RuntimeError as exc:
            raise PeerError(f"rank {self.rank}: sending to rank {dst} failed ({_first_line(exc)}); that rank died") from exc
        self._reap()

    def recv(self, src: int, what: str, timeout_s: float | None = None) -> Any:
        """Receive the next value rank `src` sent to this rank; `what` names it in errors.
        `timeout_s` overrides the transport's timeout (for idle waits between steps). Raises
        `RunAborted` when `src` sent a failure report instead."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        self._recv_into(header, src, what, timeout_s)
        kind, dtype, ndim, *dims = header.tolist()
        payload = torch.empty(dims[:ndim], dtype=_DTYPES[dtype], device=self.device)
        self._recv_into(payload, src, what, timeout_s)
        if payload.dtype == _ERROR_DTYPE:
            reason = bytes(payload.tolist()).decode(errors="replace")
            raise RunAborted(f"rank {self.rank}: rank {src} reported a failure instead of {what}: {reason}", src)
        if kind == _KIND_INT:
            return int(payload[0])
        if kind == _KIND_FLOAT:
            return float(payload[0])
        if kind == _KIND_COMPLEX:
            return torch.view_as_complex(payload)
        return payload.bool() if kind == _KIND_BOOL else payload

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every send to complete; raises the first failure after waiting for all."""
        pending, self._pending = self._pending, []
        first: PeerError | None = None
        for work, _ in pending:
            # Keep going past a failed send (a dead peer): the sends to live peers still complete.
            try:
                self._wait(work, "a send to complete", None, timeout_s)
            except PeerError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _recv_into(self, buffer: torch.Tensor, src: int, what: str, timeout_s: float | None) -> None:
        # Posting the receive can fail already (gloo reads a reset connection at once): the same
        # PeerError as a failed wait.
        try:
            work = dist.irecv(buffer, src)
        except RuntimeError as exc:
            raise self._peer_error(what, src, timeout_s, exc) from exc
        self._wait(work, what, src, timeout_s)

    def _wait(self, work: Any, what: str, peer: int | None, timeout_s: float | None = None) -> None:
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s))
        except RuntimeError as exc:
            raise self._peer_error(what, peer, timeout_s, exc) from exc

    def _peer_error(self, what: str, peer: int | None, timeout_s: float | None, exc: BaseException) -> PeerError:
        who = f"rank {peer}" if peer is not None else "a peer"
        limit = self.timeout_s if timeout_s is None else timeout_s
        return PeerError(
            f"rank {self.rank}: waiting for {what} from {who} failed (limit {limit:g}s): "
            f"{_first_line(exc)}; that rank died or is stuck"
        )

    def _reap(self) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
