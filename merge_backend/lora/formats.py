"""LoRA files in, one representation out: kohya, diffusers / PEFT, ComfyUI LoraSave, LyCORIS.

Every module of a LoRA becomes a ``LoraModule`` attached to a ``Target`` — the original
full weight key it changes (see ``names.py``; which key means what: ``keys.py``). The delta
of a module is ``up @ down · (alpha / r)`` computed in float32 (a missing alpha means
alpha = r), LoHa / LoKr / Tucker factors rebuilt (``factors.py``), plus a full ``.diff``
where the file has one; ``.diff_b`` changes the bias. DoRA, OFT / BOFT, IA3 and GLoRA
modules change a weight by a rule that depends on it (``LoraModule.adapter``, see
``adapters.py``).

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

from . import keys
from .adapters import Adapter
from .errors import LoraError
from .factors import ADAPTER_ROLES, adapter_of, alpha_of, lycoris_delta
from .names import NameTable, Target, module_shapes, name_table
from .svd import threads_for

_SHOW = 4
# Metadata fields that may name the architecture (a name, or one of the file's lora.hints).
_HINT_FIELDS = ("mergesearch.arch", "ss_base_model_version", "modelspec.architecture")


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
    # DoRA / OFT / BOFT / IA3 / GLoRA: a change that depends on the weight (adapters.py)
    adapter: Adapter | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r (1.0 without alpha)."""
        return 1.0 if self.alpha is None or not self.rank else float(self.alpha) / self.rank

    def delta(self, device: torch.device | str | None = None) -> Tensor | None:
        """The weight difference in float32 (diffusers-module shape), or None for bias-only.
        A weight-dependent module (``adapter``) has none: see ``difference``."""
        if self.adapter is not None:
            raise LoraError(f"module {self.name!r} is {self.adapter.kind}: its change depends on "
                            "the weight it is applied to, so it has no fixed difference (apply it "
                            "to a checkpoint or pipeline; it cannot be added to other LoRAs, "
                            "resized or saved as a plain LoRA)")
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

    def difference(self, weight: Tensor) -> Tensor | None:
        """The weight difference at strength 1 when applied to ``weight`` (float32, the
        diffusers module's shape), or None for bias-only."""
        if self.adapter is None:
            return self.delta(weight.device)
        return self.adapter.difference(weight)


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
    skipped: list[str] = field(default_factory=list)  # what partial reading left out, described

    def notes(self) -> list[str]:
        """What reading left out on purpose, to be shown to the user."""
        out = [f"{self.source}: {note}" for note in self.skipped]
        if not self.ignored:
            return out
        table = name_table(self.arch.name)
        why = "; ".join(dict.fromkeys(table.comfy_only(n) or "" for n in self.ignored))
        return out + [f"{self.source}: ignored {len(self.ignored)} module(s) "
                      f"({', '.join(self.ignored)}): {why}"]

    def kinds(self) -> dict[str, int]:
        """How many modules of each weight-dependent kind (DoRA, OFT, …) the file holds."""
        out: dict[str, int] = {}
        for m in self.modules.values():
            if m.adapter is not None:
                out[m.adapter.kind] = out.get(m.adapter.kind, 0) + 1
        return out

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<LoRA in memory>"

    def by_key(self) -> dict[str, list[tuple[LoraModule, str]]]:
        """Original key -> the modules changing it, each with 'weight' or 'bias'."""
        out: dict[str, list[tuple[LoraModule, str]]] = {}
        for module in self.modules.values():
            if module.up is not None or module.diff is not None or module.adapter is not None:
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
        if not value.is_floating_point() and not (key.endswith((".alpha", ".on_input"))
                                                  and value.numel() == 1):
            raise LoraError(f"{path}: tensor {key!r} is {str(value.dtype).removeprefix('torch.')}"
                            ", not floating point; LoRA weights are floats (only an alpha may "
                            "be an integer, or IA3's on_input flag)")
        if not all_finite(value):
            raise LoraError(f"{path}: tensor {key!r} holds NaN or infinite values; the LoRA is "
                            "damaged or was saved from a diverged training run")


def _group(path: Path, tensors: Mapping[str, Tensor], partial: bool
           ) -> tuple[dict[str, dict[str, Tensor]], str, list[str]]:
    """Modules by name, the file's main format, and what ``partial`` reading skips."""
    groups, formats, unknown = keys.group(tensors)
    skipped: dict[str, list[str]] = {}
    for key in unknown:
        skipped.setdefault(keys.recognise(key) or "", []).append(key)
    if unknown and (not partial or not groups):
        known = [w for w in skipped if w]
        if not groups and not known:
            raise LoraError(f"{path}: {len(unknown)} key(s) are not LoRA weights, e.g. "
                            f"{', '.join(unknown[:_SHOW])} (is it a checkpoint or an embedding?)")
        what = "; ".join(f"{w or 'keys of no known LoRA format'}: first key {ks[0]!r}"
                         for w, ks in skipped.items())
        fix = ("" if not groups else "; pass --partial (a study's LoRA entry: partial: true) "
               "to apply the rest and skip these")
        raise LoraError(f"{path}: {len(unknown)} key(s) mergesearch cannot apply — {what}{fix}")
    notes = [f"skipped {len(ks)} key(s) of {w or 'no known LoRA format'} (first {ks[0]!r})"
             + (": mergesearch has no textual-inversion path; use the embedding in the UI "
                "that loads the LoRA" if w.startswith("bundled") else "")
             for w, ks in skipped.items()]
    return groups, max(formats, key=formats.get) if formats else "kohya", notes


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


# auxiliary roles and the role they belong to (a file key suffix to name in errors)
_NEEDS = {"rescale": "oft_blocks", "on_input": "ia3", "a2": "a1", "b1": "a1", "b2": "a1",
          "bm": "a1"}
_ROLE_KEYS = {"oft_blocks": "oft_blocks", "ia3": "IA3 weight", "a1": "a1.weight"}


def _module(path: Path, name: str, parts: dict[str, Tensor], target: Target,
            metadata_alpha: float | None) -> LoraModule:
    for role, needs in _NEEDS.items():
        if role in parts and needs not in parts:
            raise LoraError(f"{path}: module {name!r} has a {role} but no {_ROLE_KEYS[needs]}")
    module = _fixed_module(path, name, parts, target, metadata_alpha)
    if not any(role in parts for role in ADAPTER_ROLES):
        return module
    fixed = module.delta() if module.up is not None or module.diff is not None else None
    adapter = adapter_of(path, name, parts, metadata_alpha, fixed)
    return LoraModule(target, diff_b=module.diff_b, name=name, adapter=adapter)


def _fixed_module(path: Path, name: str, parts: dict[str, Tensor], target: Target,
                  metadata_alpha: float | None) -> LoraModule:
    """The module's fixed difference: LoRA / LoCon factors, LoHa, LoKr, full ``diff``."""
    lyco = lycoris_delta(path, name, parts, metadata_alpha)
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
    alpha = alpha_of(parts.get("alpha"), metadata_alpha) if up is not None else None
    module = LoraModule(target, up, down, alpha, parts.get("diff"), parts.get("diff_b"), name)
    if "up_bias" in parts:  # PEFT lora_bias: lora_B's bias, scaled like the weight
        if up is None:
            raise LoraError(f"{path}: module {name!r} has a lora_B.bias but no lora_A / lora_B")
        bias = parts["up_bias"].float() * module.scale
        module.diff_b = bias if module.diff_b is None else module.diff_b.float() + bias
    return module


def read_lora(path: str | Path, arch: str | Architecture | None = None, *,
              strict: bool = True, partial: bool = False) -> LoraFile:
    """Read a LoRA file of any supported format (see module docstring).

    ``arch`` is the architecture it must fit (detected from names and metadata when None).
    Raises ``LoraError`` naming the file and example keys when modules match nothing of
    ``arch`` — a LoRA for another architecture — or when a module's tensors disagree. With
    ``strict=False`` unmatched modules are left out and listed in ``LoraFile.unmatched``.
    Keys of a format mergesearch cannot apply (bundled embeddings, PEFT OFT, …) raise a
    ``LoraError`` naming the format and the first key; with ``partial=True`` they are skipped
    and described in ``LoraFile.notes()``.
    """
    path = Path(path)
    tensors, metadata = _load_tensors(path)
    groups, fmt, skipped = _group(path, tensors, partial)
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
                    sorted(ignored), skipped)


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
    if module.adapter is not None:
        module.delta()  # raises: a weight-dependent module has no LoRA factors to write
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
    stream_safetensors(path, planned, (v.cpu() for _, v in entries), meta, replace=overwrite)
    return path


def check_lora_output(path: Path, overwrite: bool) -> None:
    if path.suffix != ".safetensors":
        raise LoraError(f"output {path} must end in .safetensors")
    check_new_output(path, overwrite, LoraError)
