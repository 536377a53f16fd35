"""What every report carries about where it ran: GPU readings through nvidia-ml-py before and after a
timed region (``Telemetry``), and the device, versions, date, git commit and command (``environment``)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch


class Telemetry:
    """NVIDIA GPU readings through nvidia-ml-py, taken before and after a timed region (no sampling
    thread: a thread would steal the GIL from a launch-bound step). ``available`` and ``reason`` say
    whether it works here."""

    def __init__(self, device):
        self.available, self.reason, self.h, self.nvml = False, "", None, None
        device = torch.device(device)
        if device.type != "cuda":
            self.reason = "no NVIDIA GPU: telemetry not available"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
            h = None
            if uuid is not None:
                try:
                    h = pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + str(uuid)).encode())
                except Exception:
                    h = None
            self.h = h if h is not None else pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.nvml = pynvml
            self.available, self.reason = True, "nvidia-ml-py"
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py): telemetry not available"
        except Exception as e:
            self.reason = f"NVML failed ({type(e).__name__}: {e}): telemetry not available"

    def _read(self) -> dict:
        n, h, r = self.nvml, self.h, {}
        for key, fn in (("energy_mJ", lambda: n.nvmlDeviceGetTotalEnergyConsumption(h)),
                        ("power_W", lambda: n.nvmlDeviceGetPowerUsage(h) / 1e3),
                        ("sm_clock_MHz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                        ("utilization_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
                        ("temperature_C", lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                        ("memory_used_MiB", lambda: n.nvmlDeviceGetMemoryInfo(h).used / 2**20)):
            try:
                r[key] = fn()
            except Exception:
                r[key] = None
        r["t"] = time.perf_counter()
        return r

    def begin(self):
        return self._read() if self.available else None

    def end(self, before, n_steps: int) -> Optional[dict]:
        """Readings after the region, and the energy per step and mean power from the energy counter."""
        if not self.available or before is None:
            return None
        after = self._read()
        out = {"before": before, "after": after}
        if before.get("energy_mJ") is not None and after.get("energy_mJ") is not None:
            joules = (after["energy_mJ"] - before["energy_mJ"]) / 1e3
            secs = after["t"] - before["t"]
            out["energy_J"] = joules
            out["energy_per_step_J"] = joules / n_steps if n_steps else None
            out["mean_power_W"] = joules / secs if secs > 0 else None
        return out

    def device_facts(self) -> dict:
        if not self.available:
            return {}
        n = self.nvml
        facts = {}
        for key, fn in (("driver", lambda: n.nvmlSystemGetDriverVersion()),
                        ("nvml_cuda_driver_version", lambda: n.nvmlSystemGetCudaDriverVersion()),
                        ("power_limit_W", lambda: n.nvmlDeviceGetEnforcedPowerLimit(self.h) / 1e3),
                        ("max_sm_clock_MHz", lambda: n.nvmlDeviceGetMaxClockInfo(self.h, n.NVML_CLOCK_SM))):
            try:
                v = fn()
                facts[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:
                pass
        return facts


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except Exception:
        return {"commit": None, "dirty": None}


def environment(device, telemetry: Telemetry, command: str) -> dict:
    """Device, versions, date, git commit and the command: what every report carries."""
    device = torch.device(device)
    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "command": command, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "git": git_commit(),
           "dot_precision": os.environ.get("GROKFAST_DOT_PRECISION", "ieee"),   # the fused kernels' float32 dots
           "gemm_group": os.environ.get("GROKFAST_GEMM_GROUP", "3")}            # products per grouped launch
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"not importable ({type(e).__name__})"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env["cpu"] = cpu
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["cuda"] = torch.version.cuda
        env["sm_count"] = props.multi_processor_count
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env.update(telemetry.device_facts())
        if not env.get("driver"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
            except Exception:
                env["driver"] = None
    else:
        env["device"] = f"CPU: {cpu}" if cpu else "CPU"
        env["cuda"] = None
        env["driver"] = None
    env["telemetry"] = telemetry.reason
    return env
