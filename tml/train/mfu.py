"""Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak.

The peak per device is ``trainer.peak_tflops`` when set; otherwise bf16 dense peak for known GPUs (H100 / H200
SXM: 989 TFLOP/s), and on CPU a short measured fp32 matmul rate of this process (its thread count)."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (no sparsity), from the vendor data sheets, in FLOP/s.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def measure_matmul_peak(n: int = 512, seconds: float = 0.3) -> float:
    """fp32 FLOP/s of repeated n x n matmuls on this CPU process (the best of short rounds)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops_per_device(peak_tflops: float = 0.0) -> tuple[float, str]:
    """(FLOP/s, where the number came from)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "trainer.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{key} bf16 dense"
        raise ValueError(f"no known peak for GPU {name!r}: set trainer.peak_tflops (per device, TFLOP/s)")
    return measure_matmul_peak(), "measured CPU fp32 matmul"
