"""What this machine does: its CPU, read once, and whether bf16 pays on it, measured once.

    cpu()                        model name, flags, cores; $CNNKIT_CPU_FLAGS replaces the flags (a test seam)
    precision_choice(name, dev)  (precision, reason): the one rule behind every use of bf16
    machine_line()               one line naming the machine, for benchmark headers

Why measure: bf16 autocast trains the seed CNNs 1.5-2.6x faster than fp32 on CPUs that run it
natively (AVX512-BF16 on an AMD EPYC, AMX on a Xeon), and 1.7-4.2x slower on an Ice Lake Xeon, whose
AVX-512 has no BF16 instructions, so oneDNN emulates them. torch.ops.mkldnn._is_mkldnn_bf16_supported()
is true on all three, so it cannot decide. The flags settle two cases: AMX-BF16 (bf16), and an x86 CPU
with neither AMX-BF16 nor AVX512-BF16 (fp32: bf16 would be emulated). Everything else (AVX512-BF16
without AMX, ARM, unknown CPUs) gets a probe: a few training steps of a small CNN in each precision,
well under a second, cached per machine in the cache folder, keyed by CPU model, core count and torch
version. bf16 is chosen only when it measures at least PROBE_MARGIN faster.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import CnnkitError
from .utils import write_text_atomic

PRECISIONS = ("auto", "bf16", "fp32")
PROBE_MARGIN = 1.1  # bf16 must be this many times faster than fp32: its rounding is a cost too
PROBE_REPEATS = 7  # timed steps per precision, alternated; the fastest of each is compared


# ----------------------------------------------------------------------------- the CPU
@dataclass(frozen=True)
class CPU:
    model: str  # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", or platform.processor()
    flags: frozenset[str]  # /proc/cpuinfo's flags (x86) or Features (ARM), lower case
    cores: int  # physical cores (distinct core ids), what torch's default thread count follows
    logical: int  # logical CPUs (hyperthreads counted)
    arch: str  # platform.machine(): x86_64, aarch64, arm64

    @property
    def bf16_flags(self) -> list[str]:
        """The flags that bear on bf16 and int8 speed, present or not, for headers."""
        names = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8", "bf16")
        return [n for n in names if n in self.flags]

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "i686", "x86")


def _read_cpuinfo() -> tuple[str, set[str], int, int]:
    model, flags, core_ids, logical = "", set(), set(), 0
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            physical = "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if key == "processor":
                    logical += 1
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    core_ids.add((physical, value))
                elif key in ("model name", "cpu model") and not model:
                    model = value
                elif key in ("flags", "features") and not flags:
                    flags = set(value.lower().split())
    except OSError:  # macOS, Windows: no /proc; the probe decides there
        pass
    logical = logical or os.cpu_count() or 1
    return model, flags, len(core_ids) or logical, logical


@lru_cache(maxsize=1)
def _cpu_cached(flags_override: str | None) -> CPU:
    model, flags, cores, logical = _read_cpuinfo()
    if flags_override is not None:
        flags = set(flags_override.lower().split())
    return CPU(model or platform.processor() or platform.machine() or "unknown CPU", frozenset(flags), cores,
               logical, platform.machine().lower())


def cpu() -> CPU:
    """This machine's CPU. $CNNKIT_CPU_FLAGS (space-separated) stands in for the real flags, so a
    test or a user can see what auto would do on another CPU."""
    return _cpu_cached(os.environ.get("CNNKIT_CPU_FLAGS"))


# ----------------------------------------------------------------------------- the probe
def _probe_step_seconds() -> dict[str, float]:
    """The fastest of PROBE_REPEATS seconds of one training step (forward, backward, SGD) in fp32 and in bf16 autocast,
    on a small CNN shaped like the seed networks: 16 images of 3x32x32, two 3x3 convs, channels-last.
    Runs under a forked RNG so that probing or not never changes a seeded run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),   # (16, 32, 16, 16)
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # (16, 64, 8, 8)
            torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10)).to(memory_format=torch.channels_last)
        x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,))
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step(bf16: bool) -> float:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        step(False), step(True)  # first calls pick and JIT the kernels
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(PROBE_REPEATS):  # alternated, so a busy moment hits both
            times["fp32"].append(step(False))
            times["bf16"].append(step(True))
    # The minimum, not the median: another process can slow a step, never speed it up.
    return {k: min(v) for k, v in times.items()}


def machine_cache_dir() -> Path:
    """Where measured machine facts are kept: $CNNKIT_MACHINE_CACHE, else the per-user cache's machine/."""
    env = os.environ.get("CNNKIT_MACHINE_CACHE")
    if env:
        return Path(env)
    import platformdirs
    return Path(platformdirs.user_cache_dir("cnnkit")) / "machine"


def probe_key(c: CPU) -> str:
    return f"{c.model} | {c.cores} cores | {c.arch} | torch {torch.__version__} | flags {' '.join(c.bf16_flags) or '-'}"


def _read_probe_cache(path: Path) -> dict:
    """The cache file's entries; a missing, unreadable or damaged file is an empty cache."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and entry.get("precision") in ("bf16", "fp32")
            and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0 for k in ("fp32_ms", "bf16_ms")))


def probed_precision(c: CPU) -> tuple[str, str]:
    """The probe's verdict for this CPU, from the cache when it holds one for this key."""
    path = machine_cache_dir() / "precision.json"
    cache = _read_probe_cache(path)
    key = probe_key(c)
    entry = cache.get(key)
    cached = _valid_entry(entry)
    if not cached:
        seconds = _probe_step_seconds()
        fp32_ms, bf16_ms = seconds["fp32"] * 1e3, seconds["bf16"] * 1e3
        entry = {"precision": "bf16" if fp32_ms >= PROBE_MARGIN * bf16_ms else "fp32",
                 "fp32_ms": round(fp32_ms, 3), "bf16_ms": round(bf16_ms, 3),
                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache[key] = entry
        try:
            write_text_atomic(path, json.dumps(cache, indent=1))
        except OSError:  # a read-only home: the choice stands, the next run measures again
            pass
    ratio = entry["fp32_ms"] / entry["bf16_ms"]
    probe = "a cached probe" if cached else "a probe"
    if entry["precision"] == "bf16":
        return "bf16", f"auto: {probe} measured bf16 {ratio:.1f}x faster than fp32 on this CPU"
    return "fp32", (f"auto: {probe} measured bf16 at {1 / ratio:.2f}x the step time of fp32 on this CPU, "
                    f"not {PROBE_MARGIN}x faster")


# ----------------------------------------------------------------------------- the rule
def _onednn_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_choice(name: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """('bf16' | 'fp32', why). name: 'auto', or 'bf16' / 'fp32' to force one."""
    if name not in PRECISIONS:
        raise CnnkitError(f"precision must be auto, bf16 or fp32, not {name!r}")
    if name != "auto":
        return name, f"--precision {name}"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU runs bf16 natively"
        return "fp32", "auto: the GPU has no native bf16"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 on {device.type}"
    c = cpu()
    if "amx_bf16" in c.flags:
        return "bf16", "auto: the CPU has AMX-BF16"
    if c.x86 and "avx512_bf16" not in c.flags:
        return "fp32", "auto: the CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated, slower than fp32"
    if not _onednn_has_bf16():
        return "fp32", "auto: oneDNN has no bf16 kernels for this CPU"
    return probed_precision(c)


def machine_line(device: str = "cpu") -> str:
    """'machine: <CPU>, N cores (M logical), <flags>, torch X, T threads, auto precision P (why)'."""
    c = cpu()
    flags = " ".join(c.bf16_flags) or "no bf16/AMX/VNNI flags"
    line = (f"machine: {c.model}, {c.cores} cores ({c.logical} logical), {flags}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    precision, why = precision_choice("auto", device)
    return f"{line}; auto precision {precision} ({why.removeprefix('auto: ')})"
