"""Full-size checkpoints with random weights, built from the default configs (no download).

Images from them are noise; they are for speed, memory and format checks only.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_backend.architectures import ARCHITECTURES
from merge_backend.devices import cpu_name
from merge_backend.naming import to_original
from merge_backend.pipeline import build_components, write_config_folder

CACHE = Path(__file__).resolve().parent / ".cache"


def full_size_state(arch: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An original-layout state dict of a full-size model (UNet, text encoders, VAE)."""
    folder = write_config_folder(arch, size="full")
    torch.manual_seed(seed)
    modules = build_components(arch, folder, seed=seed)
    state: dict[str, torch.Tensor] = {}
    for component, module in modules.items():
        config = dict(module.config) if component in ("unet", "vae") else None
        part = to_original(ARCHITECTURES[arch], component, module.state_dict(), config)
        state.update({k: v.detach().to(dtype).contiguous() for k, v in part.items()})
        del module
    return state


def full_size_files(arch: str = "sd1", n: int = 2, dtype: torch.dtype = torch.float16,
                    folder: Path = CACHE) -> list[Path]:
    """n full-size single files (cached between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = str(dtype).rsplit(".", 1)[-1]
    paths = [folder / f"{arch}_{tag}_{i}.safetensors" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.exists():
            state = full_size_state(arch, seed=i, dtype=dtype)
            save_file(state, str(path))
            del state
    return paths


def run_measured(code: str) -> tuple[float, int, str]:
    """Run python code in a fresh process: (wall seconds, peak RSS bytes, stdout)."""
    # VmHWM is this process's own peak (ru_maxrss survives exec and would report the parent's).
    wrapper = (code + "\nfor line in open('/proc/self/status'):\n"
               "    if line.startswith('VmHWM:'): print('PEAK_RSS_KB', line.split()[1])\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines()
                if line.startswith("PEAK_RSS_KB"))
    return wall, peak * 1024, proc.stdout


def goal(name: str, measured: float, target: float, higher_is_better: bool = False,
         fmt: str = "{:.3f}") -> bool:
    met = measured >= target if higher_is_better else measured <= target
    op = ">=" if higher_is_better else "<="
    print(f"GOAL {name} measured={fmt.format(measured)} target{op}{fmt.format(target)} "
          f"{'met' if met else 'missed'}")
    return met


def machine() -> str:
    import platform
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} {platform.machine()} {cpu_name()}, {torch.get_num_threads()} threads, "
            f"{gpu}")


__all__ = ["full_size_files", "full_size_state", "run_measured", "goal", "machine", "resource"]
