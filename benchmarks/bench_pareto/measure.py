"""The log line, and what a phase records of the machine, its memory and its time."""

from __future__ import annotations

import os
import platform
import threading
import time

import torch


def log(msg: str) -> None:
    print(f"[bench_pareto {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info(device: str) -> dict:
    import peft
    import psutil
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


class PeakMemory:
    """Peak memory inside a `with` block: RSS sampled by a thread on CPU, `max_memory_allocated` on CUDA."""

    def __init__(self, device: str, interval: float = 0.05) -> None:
        self.device, self.interval = device, interval
        self.peak_rss = 0
        self.start_rss = 0
        self.peak_cuda = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self.device == "cuda":
            self.peak_cuda = torch.cuda.max_memory_allocated()

    def as_dict(self) -> dict:
        return {
            "rss_before_gib": self.start_rss / 2**30,
            "peak_rss_gib": self.peak_rss / 2**30,
            "peak_cuda_allocated_gib": None if self.peak_cuda is None else self.peak_cuda / 2**30,
        }


def process_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
