"""LoRA files in, one representation out: kohya, diffusers / PEFT and ComfyUI LoraSave.

Every module of a LoRA becomes a ``LoraModule`` attached to a ``Target`` — the original
full weight key it changes (see ``names.py``). The delta of a module is
``up @ down · (alpha / r)`` computed in float32 (a missing alpha means alpha = r), plus a
full ``.diff`` where the file has one; ``.diff_b`` changes the bias.

Example:
    >>> lora = read_lora("style.safetensors")                      # doctest: +SKIP
    >>> lora.arch.name, lora.format, len(lora.modules)             # doctest: +SKIP
    ('sd1', 'kohya', 264)
    >>> lora.modules[0].target.key                                 # doctest: +SKIP
    'model.diffusion_model.input_blocks.1.1.proj_in.weight'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from merge_backend.architectures import ARCHITECTURES, Architecture
from merge_backend.checkpoint import all_finite
from merge_backend.output_files import check_new_output
from merge_backend.safetensors_io import (
    PlannedTensor,
    SafetensorsError,
    read_header,
    read_tensor,
    stream_safetensors,
)
from merge_backend.source_files import check_source

from .names import NameTable, Target, module_shapes, name_table
from .svd import threads_for

# suffix in the file -> (role, format). Longest suffixes are tried first.
_SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_up.weight": ("up", "kohya"), ".lora_down.weight": ("down", "kohya"),
    ".lora_B.weight": ("up", "peft"), ".lora_A.weight": ("down", "peft"),
    ".lora_B.default.weight": ("up", "peft"), ".lora_A.default.weight": ("down", "peft"),
    ".lora.up.weight": ("up", "peft"), ".lora.down.weight": ("down", "peft"),
    ".lora_linear_layer.up.weight": ("up", "peft"), ".lora_linear_layer.down.weight": ("down", "peft"),
    ".alpha": ("alpha", "kohya"), ".diff": ("diff", "kohya"), ".diff_b": ("diff_b", "kohya"),
    # LyCORIS (kohya key layout): LoHa, LoKr and LoCon's Tucker middle
    ".hada_w1_a": ("hada_w1_a", "loha"), ".hada_w1_b": ("hada_w1_b", "loha"),
    ".hada_w2_a": ("hada_w2_a", "loha"), ".hada_w2_b": ("hada_w2_b", "loha"),
    ".hada_t1": ("hada_t1", "loha"), ".hada_t2": ("hada_t2", "loha"),
    ".lokr_w1": ("lokr_w1", "lokr"), ".lokr_w1_a": ("lokr_w1_a", "lokr"),
    ".lokr_w1_b": ("lokr_w1_b", "lokr"), ".lokr_w2": ("lokr_w2", "lokr"),
    ".lokr_w2_a": ("lokr_w2_a", "lokr"), ".lokr_w2_b": ("lokr_w2_b", "lokr"),
    ".lokr_t2": ("lokr_t2", "lokr"), ".lora_mid.weight": ("mid", "locon"),
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
_UNSUPPORTED = (".dora_scale", ".oft_blocks", ".lora_magnitude_vector", ".oft_diag",
                ".a1.weight", ".on_input",
                ".lora_B.bias", ".w_norm", ".b_norm")
_SHOW = 4
# Metadata fields that may name the architecture (a name, or one of the file's lora.hints).
_HINT_FIELDS = ("mergesearch.arch", "ss_base_model_version", "modelspec.architecture")


class LoraError(ValueError):
    """A LoRA that cannot be used; the message names the file and the module or key."""


@dataclass
class LoraModule:
    """One module of a LoRA: low-rank factors and/or full differences for one ``Target``.

    ``up`` is (out, r) or (out, r, 1, 1), ``down`` (r, in) or (r, in, kh, kw); ``alpha``
    None means alpha = r (scale 1). ``diff`` is a full weight difference, ``diff_b`` a bias
    difference. Shapes follow the diffusers module (q/k/v chunks, untransposed projections).

    Example:
        >>> import torch
        >>> from merge_backend.lora.names import Target
        >>> m = LoraModule(Target("unet", "conv_in", "k.weight"), up=torch.ones(4, 2),
        ...                down=torch.ones(2, 3), alpha=1.0)
        >>> m.delta()[0, 0].item()
        1.0
    """

    target: Target
    up: Tensor | None = None
    down: Tensor | None = None
    alpha: float | None = None
    diff: Tensor | None = None
    diff_b: Tensor | None = None
    name: str = ""

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r (1.0 without alpha)."""
        return 1.0 if self.alpha is None or not self.rank else float(self.alpha) / self.rank

    def delta(self, device: torch.device | str | None = None) -> Tensor | None:
        """The weight difference in float32 (diffusers-module shape), or None for bias-only."""
        out = None
        if self.up is not None:
            up = self.up.to(device=device, dtype=torch.float32)
            down = self.down.to(device=device, dtype=torch.float32)
            with threads_for(down):
                flat = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            out = flat.reshape(up.shape[0], *down.shape[1:]) * self.scale
        if self.diff is not None:
            diff = self.diff.to(device=device, dtype=torch.float32)
            out = diff if out is None else out + diff.reshape(out.shape)
        return out


@dataclass
class LoraFile:
    """A LoRA read into memory: its modules keyed by ``Target.slot``, for one architecture.

    Example:
        >>> lora = read_lora("style.safetensors", arch="sd1")        # doctest: +SKIP
        >>> sorted({m.target.component for m in lora.modules.values()})  # doctest: +SKIP
        ['te', 'unet']
    """

    arch: Architecture
    modules: dict[tuple[str, int], LoraModule]
    path: Path | None = None
    format: str = "kohya"
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # module names left out (strict=False)
    ignored: list[str] = field(default_factory=list)  # modules left out as ComfyUI ignores them

    def notes(self) -> list[str]:
        """What reading left out on purpose, to be shown to the user."""
        if not self.ignored:
            return []
        table = name_table(self.arch.name)
        why = "; ".join(dict.fromkeys(table.comfy_only(n) or "" for n in self.ignored))
        return [f"{self.source}: ignored {len(self.ignored)} module(s) "
                f"({', '.join(self.ignored)}): {why}"]

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<LoRA in memory>"

    def by_key(self) -> dict[str, list[tuple[LoraModule, str]]]:
        """Original key -> the modules changing it, each with 'weight' or 'bias'."""
        out: dict[str, list[tuple[LoraModule, str]]] = {}
        for module in self.modules.values():
            if module.up is not None or module.diff is not None:
                out.setdefault(module.target.key, []).append((module, "weight"))
            if module.diff_b is not None and module.target.bias_key:
                out.setdefault(module.target.bias_key, []).append((module, "bias"))
        return out


# ---------------------------------------------------------------------------- reading


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    check_source(path, error=LoraError, what="LoRA file")  # FIFOs, devices, folders, symlink loops
    if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile pickle raises
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LoraError(f"{path}: not a plain weights file ({first}); mergesearch never "
                            "unpickles code, convert it to .safetensors") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
        metadata: dict[str, str] = {}
    else:
        try:
            table, metadata = read_header(path)
            tensors = {k: read_tensor(path, info) for k, info in table.items()}
        except SafetensorsError as exc:
            raise LoraError(str(exc)) from None
    return tensors, metadata


def _check_values(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """A LoRA is small: every value is checked when it is read (floats, no NaN or inf)."""
    for key, value in tensors.items():
        if not value.is_floating_point() and not (key.endswith(".alpha") and value.numel() == 1):
            raise LoraError(f"{path}: tensor {key!r} is {str(value.dtype).removeprefix('torch.')}"
                            ", not floating point; LoRA weights are floats (only an alpha may "
                            "be an integer)")
        if not all_finite(value):
            raise LoraError(f"{path}: tensor {key!r} holds NaN or infinite values; the LoRA is "
                            "damaged or was saved from a diverged training run")


def _split(key: str) -> tuple[str, str, str] | None:
    """(module name, role, format) of a file key, or None for an unknown suffix."""
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            role, fmt = _SUFFIXES[suffix]
            name = key[: -len(suffix)].removeprefix("base_model.model.")
            if fmt == "kohya" and name.startswith(("diffusion_model.", "text_encoders.")):
                fmt = "comfyui"
            return name, role, fmt
    return None


def _group(path: Path, tensors: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], str]:
    groups: dict[str, dict[str, Tensor]] = {}
    formats: dict[str, int] = {}
    unknown = []
    for key, value in tensors.items():
        parts = _split(key)
        if parts is None:
            unknown.append(key)
            continue
        name, role, fmt = parts
        groups.setdefault(name, {})[role] = value
        formats[fmt] = formats.get(fmt, 0) + 1
    if unknown:
        odd = [k for k in unknown if k.endswith(_UNSUPPORTED)]
        what = ("DoRA / OFT / BOFT / IA3 / GLoRA modules are not supported yet (LoRA, "
                "LoCon, LoHa and LoKr are)" if odd else
                "these keys are not LoRA weights (is it a checkpoint or an embedding?)")
        raise LoraError(f"{path}: {len(unknown)} key(s) are not understood: "
                        f"{', '.join(sorted(unknown)[:_SHOW])}; {what}")
    return groups, max(formats, key=formats.get) if formats else "kohya"


def _hinted(metadata: Mapping[str, str]) -> str | None:
    """The architecture the metadata names, if any."""
    for field_name in _HINT_FIELDS:
        hint = str(metadata.get(field_name, ""))
        if hint in ARCHITECTURES:
            return hint
        for arch in ARCHITECTURES.values():
            if hint and hint.startswith(arch.lora.hints):
                return arch.name
    return None


def _shape_fit(arch: Architecture, table: NameTable, groups: Mapping[str, dict[str, Tensor]]
               ) -> int:
    """How many modules' factors fit the module shapes of one of the architecture's configs
    (SD1 and SD2 share every name; the shapes tell them apart)."""
    best = 0
    for size in arch.configs:
        shapes = module_shapes(arch.name, size)
        fit = 0
        for name, parts in groups.items():
            target = table.resolve(name)
            shape = shapes.get((target.component, target.module)) if target else None
            if shape is None:
                continue
            up, down, diff = parts.get("up"), parts.get("down"), parts.get("diff")
            if up is not None and down is not None:
                fit += up.shape[0] == shape[0] and down.shape[1] == shape[1]
            elif diff is not None:
                fit += tuple(diff.shape) == shape
        best = max(best, fit)
    return best


def detect_lora_arch(groups: Mapping[str, dict[str, Tensor]], metadata: Mapping[str, str]
                     ) -> tuple[str, dict[str, int]]:
    """The architecture a LoRA was made for, and how many names each one resolves."""
    scores = {a: sum(name_table(a).resolve(n) is not None for n in groups) for a in ARCHITECTURES}
    hinted = _hinted(metadata)
    if hinted is not None:
        return hinted, scores
    best = max(scores.values())
    tied = [a for a, s in scores.items() if s == best]
    if len(tied) > 1:
        fits = {a: _shape_fit(ARCHITECTURES[a], name_table(a), groups) for a in tied}
        return max(tied, key=lambda a: fits[a]), scores
    return tied[0], scores


def _alpha_of(value: Tensor | None, metadata_alpha: float | None) -> float | None:
    if value is not None:
        return float(value.reshape(-1)[0].item())
    return metadata_alpha


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, object]:
    raw = metadata.get("lora_adapter_metadata")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _peft_alpha(peft: Mapping[str, object], name: str) -> float | None:
    """lora_alpha of a module from diffusers' 'lora_adapter_metadata' (prefix.alpha_pattern)."""
    prefix, _, module = name.partition(".")
    pattern = peft.get(f"{prefix}.alpha_pattern") or {}
    for suffix, alpha in dict(pattern).items():
        if module == suffix or module.endswith("." + suffix):
            return float(alpha)
    alpha = peft.get(f"{prefix}.lora_alpha")
    return float(alpha) if alpha is not None else None


_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _tucker(core: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Tucker rebuild: W[p, q, ...] = Σ_ij up[i, p] core[i, j, ...] down[j, q]."""
    return torch.einsum("ij...,jq,ip->pq...", core.float(), down.float().flatten(1),
                        up.float().flatten(1))


def _lycoris_delta(path: Path, name: str, parts: dict[str, Tensor],
                   metadata_alpha: float | None) -> Tensor | None:
    """The full float32 delta of a LoHa / LoKr / Tucker-LoCon module, or None for others.

    LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = rows of w1b (Tucker: each factor rebuilt
    through hada_t1 / hada_t2, w1a then (r, out)). LoKr: kron(w1, w2), each full or a·b
    (w2 Tucker through lokr_t2), scaled by alpha/r only when a factor is decomposed.
    LoCon Tucker: up · lora_mid · down · alpha/r. A conv delta without Tucker is returned as
    (out, in·kh·kw) and reshaped to the checkpoint's weight when applied.
    """
    alpha_t = parts.get("alpha")
    try:
        if any(k in parts for k in _LOHA):
            missing = [k for k in _LOHA if k not in parts]
            if missing:
                raise LoraError(f"{path}: LoHa module {name!r} lacks {', '.join(missing)}")
            w1a, w1b, w2a, w2b = (parts[k].float() for k in _LOHA)
            rank = int(w1b.shape[0])
            if "hada_t1" in parts and "hada_t2" in parts:
                w1 = _tucker(parts["hada_t1"], w1b, w1a)
                w2 = _tucker(parts["hada_t2"], w2b, w2a)
            else:
                w1 = w1a.flatten(1) @ w1b.flatten(1)
                w2 = w2a.flatten(1) @ w2b.flatten(1)
            alpha = _alpha_of(alpha_t, metadata_alpha)
            return w1 * w2 * (1.0 if alpha is None else alpha / rank)
        if any(k.startswith("lokr_") for k in parts):
            rank = None
            if "lokr_w1" in parts:
                w1 = parts["lokr_w1"].float()
            elif "lokr_w1_a" in parts and "lokr_w1_b" in parts:
                w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
                rank = int(parts["lokr_w1_b"].shape[0])
            else:
                raise LoraError(f"{path}: LoKr module {name!r} has neither lokr_w1 nor "
                                "lokr_w1_a + lokr_w1_b")
            if "lokr_w2" in parts:
                w2 = parts["lokr_w2"].float()
            elif "lokr_w2_a" in parts and "lokr_w2_b" in parts:
                a, b = parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float()
                rank = int(b.shape[0])
                w2 = _tucker(parts["lokr_t2"], b, a) if "lokr_t2" in parts else a @ b.flatten(1)
            else:
                raise LoraError(f"{path}: LoKr module {name!r} has neither lokr_w2 nor "
                                "lokr_w2_a + lokr_w2_b")
            if w2.ndim == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            alpha = _alpha_of(alpha_t, metadata_alpha)
            scale = 1.0 if alpha is None or rank is None else alpha / rank
            return torch.kron(w1.contiguous(), w2.contiguous()) * scale
        if "mid" in parts:
            up, down = parts.get("up"), parts.get("down")
            if up is None or down is None:
                raise LoraError(f"{path}: LoCon module {name!r} has a lora_mid but no "
                                "lora_up / lora_down")
            rank = int(down.shape[0])
            alpha = _alpha_of(alpha_t, metadata_alpha)
            return _tucker(parts["mid"], down, up.flatten(1).T) * (1.0 if alpha is None else alpha / rank)
    except RuntimeError as exc:  # factor shapes that do not chain
        first = str(exc).strip().splitlines()[0]
        raise LoraError(f"{path}: module {name!r}: its factors do not fit together ({first})"
                        ) from None
    return None


def _module(path: Path, name: str, parts: dict[str, Tensor], target: Target,
            metadata_alpha: float | None) -> LoraModule:
    lyco = _lycoris_delta(path, name, parts, metadata_alpha)
    if lyco is not None:
        diff = parts.get("diff")
        if diff is not None:
            lyco = lyco + diff.float().reshape(lyco.shape)
        return LoraModule(target, diff=lyco, diff_b=parts.get("diff_b"), name=name)
    up, down = parts.get("up"), parts.get("down")
    if (up is None) != (down is None):
        raise LoraError(f"{path}: module {name!r} has only a lora_{'up' if up is not None else 'down'}")
    if up is not None:
        if up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
            raise LoraError(f"{path}: module {name!r}: up {list(up.shape)} and down "
                            f"{list(down.shape)} do not share a rank")
    alpha = _alpha_of(parts.get("alpha"), metadata_alpha) if up is not None else None
    return LoraModule(target, up, down, alpha, parts.get("diff"), parts.get("diff_b"), name)


def read_lora(path: str | Path, arch: str | Architecture | None = None, *,
              strict: bool = True) -> LoraFile:
    """Read a LoRA file of any supported format (see module docstring).

    ``arch`` is the architecture it must fit (detected from names and metadata when None).
    Raises ``LoraError`` naming the file and example keys when modules match nothing of
    ``arch`` — a LoRA for another architecture — or when a module's tensors disagree. With
    ``strict=False`` unmatched modules are left out and listed in ``LoraFile.unmatched``.
    """
    path = Path(path)
    tensors, metadata = _load_tensors(path)
    groups, fmt = _group(path, tensors)
    if not groups:
        raise LoraError(f"{path}: holds no LoRA modules")
    _check_values(path, tensors)
    names = list(groups)
    detected, scores = detect_lora_arch(groups, metadata)
    arch_obj = ARCHITECTURES[detected] if arch is None else (
        ARCHITECTURES[arch] if isinstance(arch, str) else arch)
    table = name_table(arch_obj.name)
    peft = _peft_alphas(metadata)
    modules: dict[tuple[str, int], LoraModule] = {}
    unmatched, ignored = [], []
    for name, parts in groups.items():
        target = table.resolve(name)
        if target is None:
            (ignored if table.comfy_only(name) is not None else unmatched).append(name)
            continue
        if target.slot in modules:
            raise LoraError(f"{path}: modules {modules[target.slot].name!r} and {name!r} both "
                            f"change {target.key}; the file holds one module twice")
        modules[target.slot] = _module(path, name, parts, target, _peft_alpha(peft, name))
    if unmatched and (strict or not modules):
        raise _unmatched_error(path, arch_obj, unmatched, len(names), scores, _hinted(metadata))
    if not modules:
        raise LoraError(f"{path}: holds no module of {arch_obj.title} but "
                        f"{', '.join(ignored)}, which "
                        f"{'; '.join(dict.fromkeys(table.comfy_only(n) for n in ignored))}")
    return LoraFile(arch_obj, modules, path, fmt, dict(metadata), sorted(unmatched),
                    sorted(ignored))


def _unmatched_error(path: Path, arch: Architecture, unmatched: list[str],
                     total: int, scores: Mapping[str, int], hinted: str | None = None
                     ) -> LoraError:
    # names shared by several families (CLIP-L's) tie: the file's metadata picks among them
    top = [a for a, s in scores.items() if s == max(scores.values())]
    best = hinted if hinted in top else top[0]
    hint = ""
    if best != arch.name and scores[best] > scores[arch.name]:
        hint = (f" It looks like a LoRA for {ARCHITECTURES[best].title} ({scores[best]} of "
                f"{total} modules match that), not {arch.title}.")
    return LoraError(f"{path}: {len(unmatched)} of {total} LoRA modules match no {arch.title} "
                     f"module, e.g. {', '.join(sorted(unmatched)[:_SHOW])}.{hint}")


# ---------------------------------------------------------------------------- writing

WRITE_FORMATS = ("kohya", "comfyui")


def kohya_alpha(modules: Iterable[LoraModule]) -> float:
    """The one alpha a kohya file gets: the largest rank (diffusers needs one alpha for all)."""
    return float(max((m.rank for m in modules), default=1) or 1)


def lora_entries(table: NameTable, module: LoraModule, fmt: str, dtype: torch.dtype,
                 alpha: float | None = None) -> list[tuple[str, Tensor]]:
    """The (file key, tensor) pairs ``fmt`` stores for ``module``, cast to ``dtype``.

    Each module's own scale is folded into ``up``: kohya files get the same ``alpha`` in every
    module (up scaled by r / alpha so the delta is unchanged), ComfyUI files none (scale 1).
    Works on meta tensors too, which gives a file's layout before any value is computed.
    """
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"cannot write LoRA format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    name = table.name(module.target, fmt)
    out: list[tuple[str, Tensor]] = []
    if module.up is not None:
        fold = module.scale
        if fmt == "kohya":
            alpha = float(alpha if alpha is not None else module.rank)
            fold *= module.rank / alpha
            out.append((f"{name}.alpha", torch.tensor(alpha, dtype=dtype, device=module.up.device)))
        up = module.up.float() * fold if fold != 1.0 else module.up
        out += [(f"{name}.lora_down.weight", module.down.to(dtype).contiguous()),
                (f"{name}.lora_up.weight", up.to(dtype).contiguous())]
    if module.diff is not None:
        out.append((f"{name}.diff", module.diff.to(dtype).contiguous()))
    if module.diff_b is not None:
        out.append((f"{name}.diff_b", module.diff_b.to(dtype).contiguous()))
    return out


def lora_metadata(arch: Architecture, fmt: str, title: str, rank: int | None,
                  alpha: float | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """modelspec.* and kohya's ss_* keys that LoRA browsers and loaders read."""
    architecture = arch.checkpoint_save.architecture_for(arch.checkpoint_save.predict_key.default)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture or arch.name}/lora",
        "modelspec.title": title,
        "mergesearch.arch": arch.name,
        "mergesearch.format": fmt,
    }
    if fmt == "kohya":
        meta["ss_network_module"] = "networks.lora"
        if arch.lora.kohya_base_model:
            meta["ss_base_model_version"] = arch.lora.kohya_base_model
        if rank is not None:
            meta["ss_network_dim"] = str(rank)
        if alpha is not None:
            meta["ss_network_alpha"] = f"{alpha:g}"
    meta.update(extra or {})
    return meta


def save_lora(lora: LoraFile, path: str | Path, *, fmt: str = "kohya",
              dtype: torch.dtype = torch.float16, metadata: Mapping[str, str] | None = None,
              overwrite: bool = False) -> Path:
    """Write ``lora`` atomically as a kohya (default) or ComfyUI LoraSave file."""
    path = Path(path)
    check_lora_output(path, overwrite)
    table = name_table(lora.arch.name)
    modules = list(lora.modules.values())
    alpha = kohya_alpha(modules) if fmt == "kohya" else None
    entries = [e for m in modules for e in lora_entries(table, m, fmt, dtype, alpha)]
    planned = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in entries]
    meta = lora_metadata(lora.arch, fmt, path.stem, max((m.rank for m in modules), default=0) or None,
                         alpha, metadata)
    stream_safetensors(path, planned, (v.cpu() for _, v in entries), meta)
    return path


def check_lora_output(path: Path, overwrite: bool) -> None:
    if path.suffix != ".safetensors":
        raise LoraError(f"output {path} must end in .safetensors")
    check_new_output(path, overwrite, LoraError)
