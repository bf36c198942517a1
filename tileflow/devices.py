"""Device table: the few numbers tileflow's cost models need about a target device.

Tile plans (`tileflow/tiles.py`), and later the nano-batch and disaggregation planners, reason
about a device through a `DeviceInfo`: how many cores run tiles in parallel, the dense peak rate by
dtype, memory bandwidth and size, on-chip memory per core, and a rough hourly price. The numbers
are vendor datasheet figures (dense, i.e. without 2:4 sparsity), so plans are deterministic and do
not depend on the machine they are computed on; measured per-tile times can refine a plan later.

This module imports nothing heavy: `detect_device` imports torch only when it is called.
"""

from __future__ import annotations

import math

import re
from dataclasses import dataclass, field, replace
from typing import Any

KINDS: tuple[str, ...] = ("gpu", "npu", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """Static description of one accelerator (or the host CPU) for tileflow's cost models.

    Attributes:
        name: table key, e.g. `"H100-SXM"` (or the reported name for an unlisted GPU).
        kind: `"gpu"`, `"npu"` or `"cpu"`; selects the tile-shape family.
        cores: units that each run one output tile at a time (SMs, Ascend AI cube cores, CPU
            cores).
        peak_tflops: dense peak TFLOP/s by dtype name (`"bfloat16"`, `"float16"`, `"float32"`,
            optionally `"float64"`). On NVIDIA float32 is the IEEE fp32 rate of the CUDA cores,
            not TF32's tensor cores: tileflow's fp32 kernels keep exact fp32 products
            (`input_precision="ieee"`), as torch's matmul does by default.
        mem_bw_gbs: main-memory (HBM) bandwidth in GB/s.
        mem_gb: main-memory size in GB.
        smem_kib_per_core: shared memory / L1 buffer per core in KiB; bounds tile pipelining.
        price_per_hour: rough public-cloud USD per device-hour, or None when unknown.

    The dataclass is frozen so it can key caches; `peak_tflops` is left out of the hash (a dict
    is not hashable) but still compared. Do not mutate it.
    """

    name: str
    kind: str
    cores: int
    peak_tflops: dict[str, float] = field(hash=False)
    mem_bw_gbs: float
    mem_gb: float
    smem_kib_per_core: int
    price_per_hour: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DeviceInfo.kind={self.kind!r} is not valid; use one of {KINDS}")
        if self.cores <= 0:
            raise ValueError(f"DeviceInfo.cores must be positive, got {self.cores}")
        # `not 0 < x < inf` also refuses NaN: every figure below divides or is divided by these.
        if not (0 < self.mem_bw_gbs < math.inf and 0 < self.smem_kib_per_core < math.inf):
            raise ValueError("DeviceInfo.mem_bw_gbs and smem_kib_per_core must be positive and finite")
        if not self.peak_tflops or any(not 0 < v < math.inf for v in self.peak_tflops.values()):
            raise ValueError("DeviceInfo.peak_tflops needs at least one entry, each positive and finite")
        # The planners divide by both: a zero price made the equal-cost device count divide by
        # zero (an infinite one gave inf / inf), and a zero or negative size made every placement
        # "not fit" without saying why.
        if not 0 < self.mem_gb < math.inf:
            raise ValueError(f"DeviceInfo.mem_gb must be positive and finite, got {self.mem_gb}")
        if self.price_per_hour is not None and not 0 < self.price_per_hour < math.inf:
            raise ValueError(f"DeviceInfo.price_per_hour must be positive and finite, or None (unknown), "
                             f"got {self.price_per_hour}")

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s of the whole device for `dtype` (a dtype name).

        Raises ValueError naming the dtypes the device table knows for this device.
        """
        try:
            return self.peak_tflops[dtype] * 1e12
        except KeyError:
            raise ValueError(
                f"device {self.name!r} has no peak rate for dtype {dtype!r}; "
                f"known dtypes: {sorted(self.peak_tflops)}"
            ) from None

    @property
    def mem_bw_bytes(self) -> float:
        """Main-memory bandwidth in bytes/s."""
        return self.mem_bw_gbs * 1e9

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for reports and archives)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "cores": self.cores,
            "peak_tflops": dict(self.peak_tflops),
            "mem_bw_gbs": self.mem_bw_gbs,
            "mem_gb": self.mem_gb,
            "smem_kib_per_core": self.smem_kib_per_core,
            "price_per_hour": self.price_per_hour,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceInfo":
        """Inverse of `to_dict`."""
        return cls(**{**data, "peak_tflops": dict(data["peak_tflops"])})


# Prices are rough on-demand USD per device-hour seen on public GPU clouds in 2024-25; they only
# rank options in a cost planner and are not quotes.
DEVICES: dict[str, DeviceInfo] = {
    "H100-SXM": DeviceInfo(
        name="H100-SXM",
        kind="gpu",
        cores=132,  # NVIDIA H100 datasheet / Hopper whitepaper: 132 SMs (SXM5)
        peak_tflops={
            "bfloat16": 989.0,  # H100 SXM datasheet: 1979 with sparsity -> 989 dense
            "float16": 989.0,  # same as bf16 (datasheet)
            "float32": 67.0,  # datasheet FP32 (CUDA cores; TF32 tensor cores: 494 dense)
            "float64": 67.0,  # datasheet FP64 tensor core
        },
        mem_bw_gbs=3350.0,  # H100 SXM datasheet: 3.35 TB/s HBM3
        mem_gb=80.0,  # datasheet: 80 GB
        smem_kib_per_core=228,  # Hopper tuning guide: up to 228 KB shared memory per SM
        price_per_hour=3.0,  # rough cloud on-demand price (~$2.5-4)
    ),
    "H200": DeviceInfo(
        name="H200",
        kind="gpu",
        cores=132,  # same GH100 die as H100 SXM (H200 datasheet)
        peak_tflops={
            "bfloat16": 989.0,  # H200 datasheet: 1979 sparse -> 989 dense
            "float16": 989.0,  # H200 datasheet
            "float32": 67.0,  # H200 datasheet FP32 (CUDA cores; TF32: 494 dense)
            "float64": 67.0,  # H200 datasheet FP64 tensor core
        },
        mem_bw_gbs=4800.0,  # H200 datasheet: 4.8 TB/s HBM3e
        mem_gb=141.0,  # H200 datasheet: 141 GB
        smem_kib_per_core=228,  # Hopper: 228 KB shared memory per SM
        price_per_hour=3.8,  # rough cloud on-demand price (~$3.5-4.5)
    ),
    "A100-SXM": DeviceInfo(
        name="A100-SXM",
        kind="gpu",
        cores=108,  # A100 datasheet / Ampere whitepaper: 108 SMs
        peak_tflops={
            "bfloat16": 312.0,  # A100 datasheet: 312 dense (624 sparse)
            "float16": 312.0,  # A100 datasheet
            "float32": 19.5,  # A100 datasheet FP32 (CUDA cores; TF32: 156 dense)
            "float64": 19.5,  # A100 datasheet FP64 tensor core
        },
        mem_bw_gbs=2039.0,  # A100 80GB SXM datasheet: 2039 GB/s HBM2e
        mem_gb=80.0,  # datasheet: 80 GB variant
        smem_kib_per_core=164,  # Ampere tuning guide: up to 164 KB shared memory per SM
        price_per_hour=1.8,  # rough cloud on-demand price (~$1.3-2.5)
    ),
    "H20": DeviceInfo(
        name="H20",
        kind="gpu",
        cores=78,  # H20 (China-market Hopper) spec sheets: 78 SMs
        peak_tflops={
            "bfloat16": 148.0,  # H20 spec sheet: 148 TFLOP/s dense bf16/fp16
            "float16": 148.0,  # H20 spec sheet
            "float32": 44.0,  # H20 spec sheet: 44 TFLOP/s FP32 (CUDA cores; TF32: 74 dense)
        },
        mem_bw_gbs=4000.0,  # H20 spec sheet: 4.0 TB/s HBM3 (also quoted by the Lamina paper)
        mem_gb=96.0,  # H20 spec sheet: 96 GB
        smem_kib_per_core=228,  # Hopper SM: 228 KB shared memory
        price_per_hour=1.3,  # estimate: ~45% of the H100 price (list-price ratio); rarely rented
    ),
    "Ascend-910B": DeviceInfo(
        name="Ascend-910B",
        kind="npu",
        cores=24,  # Atlas 800T A2 / 910B product pages: 24 AI (cube) cores (910B3 bin)
        peak_tflops={
            "bfloat16": 320.0,  # 910B product pages: ~313-376 TFLOP/s fp16/bf16 by bin; ~320
            "float16": 320.0,  # same
            "float32": 80.0,  # estimate: cube fp32 (HF32) ~1/4 of fp16; no datasheet figure
        },
        mem_bw_gbs=1600.0,  # 910B product pages: ~1.6 TB/s HBM2e
        mem_gb=64.0,  # 910B product pages: 64 GB HBM2e
        smem_kib_per_core=512,  # Ascend C docs (Atlas A2): 512 KB L1 buffer per AI core
        price_per_hour=None,  # no widely listed public on-demand price
    ),
    "cpu": DeviceInfo(
        name="cpu",
        kind="cpu",
        cores=2,  # generic small host (CI runners: 2 vCPUs); keeps CPU-path plans deterministic
        peak_tflops={
            "bfloat16": 0.1,  # rough: bf16 is widened to fp32 on a generic AVX2 host
            "float16": 0.1,  # rough, as bf16
            "float32": 0.2,  # rough: 2 cores x 3 GHz x 32 FLOP/cycle (AVX2 FMA)
            "float64": 0.1,  # rough: half the fp32 rate
        },
        mem_bw_gbs=20.0,  # rough: one or two DDR4 channels
        mem_gb=8.0,  # rough: small CI host
        smem_kib_per_core=32,  # rough: typical 32 KiB L1d per core
        price_per_hour=0.05,  # rough: small cloud VM
    ),
}

# Short spellings people use for the table's entries (matched case-insensitively).
_ALIASES: dict[str, str] = {
    "h100": "H100-SXM",
    "a100": "A100-SXM",
    "910b": "Ascend-910B",
    "ascend": "Ascend-910B",
}


def get_device(name: str) -> DeviceInfo:
    """The table entry called `name` (exact, case-insensitive, or a short alias like `"H100"`).

    Raises ValueError listing the valid names for an unknown one.
    """
    if name in DEVICES:
        return DEVICES[name]
    lowered = name.lower()
    for key, info in DEVICES.items():
        if key.lower() == lowered:
            return info
    if lowered in _ALIASES:
        return DEVICES[_ALIASES[lowered]]
    raise ValueError(
        f"unknown device {name!r}; valid names are {sorted(DEVICES)} "
        f"(aliases: {sorted(_ALIASES)})"
    )


# Substrings of torch.cuda.get_device_name() -> table entry. Word boundaries matter: "H20" must not
# match "H200", so the patterns are regexes anchored on non-alphanumerics.
_CUDA_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?<![A-Za-z0-9])H200(?![0-9])", "H200"),
    (r"(?<![A-Za-z0-9])H100(?![0-9])", "H100-SXM"),
    (r"(?<![A-Za-z0-9])H20(?![0-9])", "H20"),
    (r"(?<![A-Za-z0-9])A100(?![0-9])", "A100-SXM"),
)


def _match_cuda_name(reported: str) -> DeviceInfo | None:
    """Table entry whose model name appears in a CUDA device name, else None."""
    for pattern, key in _CUDA_NAME_PATTERNS:
        if re.search(pattern, reported):
            return DEVICES[key]
    return None


def _scale_cores(entry: DeviceInfo, cores: int, name: str) -> DeviceInfo:
    """`entry` with a different core count (PCIe bins, MIG slices), keeping its per-core rate."""
    scale = cores / entry.cores
    return replace(
        entry,
        name=name,
        cores=cores,
        peak_tflops={k: v * scale for k, v in entry.peak_tflops.items()},
    )


def detect_device(device_type: str = "cuda") -> DeviceInfo:
    """DeviceInfo for the current device of `device_type` (`"cuda"`, `"npu"` or `"cpu"`).

    On CUDA the reported name is matched against the table (H100, H200, A100, H20). When the
    device differs from the matched entry in SM count, memory or memory bandwidth (an H100 PCIe
    or NVL, an A100 40GB, a MIG slice), the entry is rescaled to the real SM count at the same
    per-SM rate and renamed to the reported name (so the entry's shipped tile times do not apply
    to it). A MIG slice (fewer SMs and less memory than the entry) gets the memory it reports and
    its share of the entry's bandwidth; another variant gets its reported memory and the
    bandwidth its memory clock and bus width give (`_reported_bandwidth_gbs`). An unlisted GPU
    gets an entry built from `torch.cuda.get_device_properties`: H100-like per-SM rates, and its
    own memory, shared memory and bandwidth (the H100's where torch does not report the memory
    clock). Without a usable CUDA (or NPU) device the generic `cpu` entry is returned, so plans
    stay deterministic.
    """
    import torch  # local: keep `import tileflow.devices` fast

    dev = torch.device(device_type)
    if dev.type == "cpu":
        return DEVICES["cpu"]
    if dev.type == "npu":
        npu = getattr(torch, "npu", None)  # present only once torch_npu is imported
        if npu is not None and npu.is_available():
            return DEVICES["Ascend-910B"]
        return DEVICES["cpu"]
    if dev.type != "cuda":
        raise ValueError(f"unknown device type {device_type!r}; use one of ('cuda', 'npu', 'cpu')")
    if not torch.cuda.is_available():
        return DEVICES["cpu"]
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    reported = torch.cuda.get_device_name(index)
    props = torch.cuda.get_device_properties(index)
    sms = int(props.multi_processor_count)
    entry = _match_cuda_name(reported)
    mem_gb = round(props.total_memory / 1e9, 1)
    bandwidth = _reported_bandwidth_gbs(props)
    if entry is not None:
        # The table's figures are one part's (80 GB A100, SXM H100): a part of the same name with
        # other memory (an A100 40GB: 1.55 TB/s, or an H100 NVL: 3.9 TB/s) is not that part, and
        # must not plan from its figures nor take its shipped tile times.
        same_memory = mem_gb >= entry.mem_gb and (
            bandwidth is None or abs(bandwidth - entry.mem_bw_gbs) <= _SAME_BANDWIDTH * entry.mem_bw_gbs)
        if sms == entry.cores and same_memory:
            return entry
        if sms < entry.cores and mem_gb < entry.mem_gb:
            # A MIG slice also holds only a part of the memory, with its share of the HBM
            # bandwidth (the entry's 80 GB and 3.35 TB/s on a 10 GB 1g slice made every memory
            # figure 8x too large).
            return replace(_scale_cores(entry, sms, reported), mem_gb=mem_gb,
                           mem_bw_gbs=entry.mem_bw_gbs * mem_gb / entry.mem_gb)
        # Another bin of the chip (an H100 PCIe: 114 SMs and 2.0 TB/s of HBM2e, not 3.35 TB/s).
        return replace(_scale_cores(entry, sms, reported), mem_gb=mem_gb,
                       mem_bw_gbs=bandwidth if bandwidth is not None else entry.mem_bw_gbs)
    # Unknown GPU: H100 per-SM compute; real SM count, memory, smem and bandwidth (an L4's
    # 0.3 TB/s planned as the H100's 3.35 TB/s made every memory-bound tile look 11x faster).
    base = _scale_cores(DEVICES["H100-SXM"], sms, reported)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) // 1024
    return replace(
        base,
        mem_gb=mem_gb,
        mem_bw_gbs=bandwidth if bandwidth is not None else base.mem_bw_gbs,
        smem_kib_per_core=int(smem) if smem > 0 else base.smem_kib_per_core,
        price_per_hour=None,
    )


# Relative difference between a device's reported peak bandwidth and its table entry's within
# which it is that entry's part: the figure from the reported memory clock may differ from the
# datasheet's by a few percent; another part of the same name differs by 15% or more (A100 40GB
# against 80GB: 24%; H100 NVL against SXM: 16%).
_SAME_BANDWIDTH = 0.1


def _reported_bandwidth_gbs(props: Any) -> float | None:
    """Peak memory bandwidth in GB/s from CUDA device properties: two transfers per memory clock
    (kHz) over the bus (bits), as NVIDIA's "How to Query Device Properties" computes it; None when
    torch does not report them (older torch, or a CUDA that no longer reports the memory clock)."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return None
    return 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9
