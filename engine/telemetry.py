"""System samples: GPU memory/utilisation (nvidia-ml-py), engine process tree (psutil)."""

from __future__ import annotations

import os

import psutil


class GpuProbe:
    """NVML access that degrades to a clear 'no NVIDIA GPU' instead of raising."""

    def __init__(self):
        self.error = ""
        self.handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            if not self.handles:
                self.error = "no NVIDIA GPU"
        except Exception as exc:  # noqa: BLE001 - NVML missing, no driver, no device
            self.error = "no NVIDIA GPU" + (f" ({type(exc).__name__})" if not isinstance(exc, ImportError) else "")

    def sample(self) -> list[dict]:
        gpus = []
        for i, handle in enumerate(self.handles):
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                util = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                name = self.nvml.nvmlDeviceGetName(handle)
                gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                             "memory_used": int(mem.used), "memory_total": int(mem.total), "util": int(util.gpu)})
            except Exception as exc:  # noqa: BLE001
                gpus.append({"index": i, "error": str(exc)})
        return gpus


class ProcessProbe:
    """CPU and RSS of the engine process and its children (vLLM workers)."""

    def __init__(self, pid: int | None = None):
        self.proc = psutil.Process(pid or os.getpid())
        self.proc.cpu_percent(None)
        self.peak_rss = 0

    def sample(self) -> dict:
        procs = [self.proc]
        try:
            procs += self.proc.children(recursive=True)
        except psutil.Error:
            pass
        cpu = rss = 0.0
        for p in procs:
            try:
                cpu += p.cpu_percent(None) if p is self.proc else p.cpu_percent(None)
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, int(rss))
        return {"cpu_percent": round(cpu, 1), "rss": int(rss), "peak_rss": self.peak_rss, "processes": len(procs)}
