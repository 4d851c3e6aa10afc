"""Peak memory growth of the timed steps, what memory is available, and what counts as out of memory.

Growth is the peak during the steps minus the memory in use just before them, with the inputs
allocated and no gradients: it counts the gradients of the inputs plus every scratch buffer.
- CUDA: torch.cuda.max_memory_allocated() after torch.cuda.reset_peak_memory_stats(), minus
  torch.cuda.memory_allocated() before (tensors of the caching allocator).
- CPU (Linux): the process's resident-memory high-water mark (VmHWM in /proc/self/status), reset
  to the current resident size just before the steps (writing 5 to /proc/self/clear_refs), minus
  the resident size then (VmRSS). Freed heap memory is first handed back to the OS (glibc
  malloc_trim) so that reusing it cannot hide growth. This counts every byte the process touches,
  also scratch a C++ extension takes from malloc rather than from torch. Elsewhere: not measured.
"""
import ctypes
import os

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(field: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trim_heap() -> None:
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if malloc_trim is not None:
        malloc_trim(0)


def cpu_peak_supported() -> bool:
    """Whether this process can reset and read its resident-memory high-water mark."""
    return os.access(_CLEAR_REFS, os.W_OK) and os.path.exists(_STATUS)


class PeakMemoryGrowth:
    """Context manager: after the block, .bytes is the peak memory growth during it (None where it
    cannot be measured)."""

    def __init__(self, device: str):
        self.device = device
        self.bytes = None
        self._baseline = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
        elif cpu_peak_supported():
            _trim_heap()
            with open(_CLEAR_REFS, "w") as clear_refs:
                clear_refs.write("5")
            self._baseline = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc_info):
        if self._baseline is None or exc_info[0] is not None:
            return False
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._baseline
        else:
            self.bytes = _status_bytes("VmHWM") - self._baseline
        return False


def available_bytes(device: str) -> int:
    """Memory a new allocation can still get: free GPU memory, or MemAvailable of the machine."""
    if device == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, MemoryError, or a RuntimeError of an allocator that ran out."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
