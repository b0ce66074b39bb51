"""Sampler names users know (A1111 / ComfyUI style) mapped to diffusers scheduler classes.

The table is data: a name gives a diffusers class and the keyword arguments that make the
variant (karras sigmas, solver order, algorithm). Every variant states the switches that tell
it apart explicitly, because ``from_config`` inherits everything else from the pipeline's
current scheduler config (a pipeline saved with karras sigmas would otherwise make "euler"
karras too).

Example:
    >>> SCHEDULERS["dpm++_2m_karras"].class_name
    'DPMSolverMultistepScheduler'
    >>> scheduler = make_scheduler("euler_a", pipe.scheduler)     # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    """One named sampler: a diffusers scheduler class, its kwargs and optional dependencies."""

    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # importable modules the class needs at run time
    flow: bool = False  # a flow-matching sampler (SD3, Flux); the others are for noise prediction


_NO_KARRAS = {"use_karras_sigmas": False}
_KARRAS = {"use_karras_sigmas": True}
_DPM2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPM2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", _NO_KARRAS),
    "euler_karras": SchedulerSpec("EulerDiscreteScheduler", _KARRAS),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", _NO_KARRAS),
    "heun_karras": SchedulerSpec("HeunDiscreteScheduler", _KARRAS),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler", _NO_KARRAS),
    "dpm2_karras": SchedulerSpec("KDPM2DiscreteScheduler", _KARRAS),
    "dpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler", _NO_KARRAS),
    "dpm2_a_karras": SchedulerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "dpm++_2m": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPM2M, **_NO_KARRAS}),
    "dpm++_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPM2M, **_KARRAS}),
    "dpm++_2m_sde": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPM2M_SDE, **_NO_KARRAS}),
    "dpm++_2m_sde_karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPM2M_SDE, **_KARRAS}),
    "dpm++_2s": SchedulerSpec("DPMSolverSinglestepScheduler", {**_DPM2M, **_NO_KARRAS}),
    "dpm++_2s_karras": SchedulerSpec("DPMSolverSinglestepScheduler", {**_DPM2M, **_KARRAS}),
    "dpm++_sde": SchedulerSpec("DPMSolverSDEScheduler", _NO_KARRAS, requires=("torchsde",)),
    "dpm++_sde_karras": SchedulerSpec("DPMSolverSDEScheduler", _KARRAS, requires=("torchsde",)),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", _NO_KARRAS),
    "deis": SchedulerSpec("DEISMultistepScheduler", _NO_KARRAS),
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    # PLMS, as SD1.x checkpoints configure it (PNDM with the PRK warm-up fails below ~4 steps).
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler", requires=("scipy",)),
    "lcm": SchedulerSpec("LCMScheduler"),
    # flow-matching models (SD3, Flux): their pipelines' own sampler family
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", flow=True),
    "flow_heun": SchedulerSpec("FlowMatchHeunDiscreteScheduler", flow=True),
}


def check_scheduler_name(name: str) -> str:
    """Return ``name`` if it is in the table and its dependencies import; raise ValueError."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(sorted(SCHEDULERS))}")
    missing = [m for m in SCHEDULERS[name].requires if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"scheduler {name!r} needs {', '.join(missing)} "
                         f"(pip install {' '.join(missing)})")
    return name


def make_scheduler(name: str, current: Any) -> Any:
    """Build scheduler ``name`` from the config of the pipeline's ``current`` scheduler."""
    spec = SCHEDULERS[check_scheduler_name(name)]
    import diffusers

    current_flow = type(current).__name__.startswith("FlowMatch")
    if spec.flow != current_flow:
        kind = "a flow-matching" if current_flow else "a noise-prediction"
        fits = ", ".join(n for n, s in SCHEDULERS.items() if s.flow == current_flow)
        raise ValueError(f"scheduler {name!r} does not fit this pipeline: it is {kind} model "
                         f"({type(current).__name__}); choose one of {fits}")
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(current.config, **spec.kwargs)
