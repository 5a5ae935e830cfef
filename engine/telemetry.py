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
    """CPU and RSS of the engine process and its children (vLLM workers).

    psutil's cpu_percent(None) is the CPU used since the previous call *on the same Process
    object*: the objects are kept across samples (a child's first sample reads 0, after that
    its real share). A pid reused by a new process is told apart by its create time.
    """

    def __init__(self, pid: int | None = None):
        self.proc = psutil.Process(pid or os.getpid())
        self.proc.cpu_percent(None)
        self.children: dict[int, psutil.Process] = {}
        self.peak_rss = 0

    def _children(self) -> list[psutil.Process]:
        try:
            found = self.proc.children(recursive=True)
        except psutil.Error:
            found = []
        kept = {}
        for child in found:
            known = self.children.get(child.pid)
            if known is not None:
                try:
                    same = known.create_time() == child.create_time()
                except psutil.Error:
                    same = False
                if same:
                    child = known
            kept[child.pid] = child
        self.children = kept
        return list(kept.values())

    def sample(self) -> dict:
        children = self._children()
        cpu = rss = 0.0
        alive = 0
        for p in [self.proc, *children]:
            try:
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
                alive += 1
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, int(rss))
        return {"cpu_percent": round(cpu, 1), "rss": int(rss), "peak_rss": self.peak_rss, "processes": alive,
                "children": max(0, alive - 1)}
