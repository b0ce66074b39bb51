"""What a merge method is: one object that carries everything mergesearch needs to know of it.

A method names its sources (``roles``), whether it takes ratios and a multiplier, its formula
and report text, and its arithmetic in two forms:

- ``comfy``: the chain of ComfyUI's model-merge nodes that computes it. Each node is ComfyUI's
  weight patch on its model1 input, in float32: ``w = model1; w *= a`` (skipped at 1), then
  ``w += b · model2`` (skipped at 0), with (a, b) = (ratio, 1 - ratio) for the vocabulary's
  ratio node (ModelMergeSimple / Blocks / SD1 / SDXL …), (m, -m) for ModelMergeSubtract and
  (1, 1) for ModelMergeAdd. This one declaration is the exact arithmetic (the file merge and
  the engine run it step for step, chunk by chunk) and what the ComfyUI export emits. A method
  ComfyUI's nodes cannot express leaves it empty, overrides ``exact`` (a plain elementwise
  function of float32 tensors) and says why in ``comfy_refusal``.
- ``fast``: the kernel shape the engine runs at memory speed, one ``torch.lerp`` per tensor in
  the working dtype (``Lerp``), or None: ``fast`` arithmetic then runs the exact one.

plus its SuperMerger block-weight meaning (``supermerger``; None: no MBW string) and
``check(recipe)`` for anything the generic checks of roles, ratios and multipliers miss.

Ratio convention everywhere: ComfyUI's — ``ratio`` is model1's share (1.0 = model1 unchanged).
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

F32 = torch.float32
RATIO, SUBTRACT, ADD = "ratio", "subtract", "add"
TARGET = "target"


class MethodError(ValueError):
    """A merge method that cannot be registered or found; the message names it and the fix."""


@dataclass(frozen=True)
class NodeKind:
    """One of ComfyUI's merge nodes: its class for models and for text encoders, its widget."""

    model: str | None  # None: the ratio node of the Recipe's vocabulary
    clip: str
    widget: str | None  # the node's one number input ("ratio", "multiplier"), if any


NODE_KINDS: dict[str, NodeKind] = {
    RATIO: NodeKind(None, "CLIPMergeSimple", "ratio"),
    SUBTRACT: NodeKind("ModelMergeSubtract", "CLIPMergeSubtract", "multiplier"),
    ADD: NodeKind("ModelMergeAdd", "CLIPMergeAdd", None),
}


@dataclass(frozen=True)
class Node:
    """One ComfyUI model-merge node of a method's chain: ``kind`` patches ``model1`` with
    ``model2`` (each a role or an earlier node's ``name``). The last node's result is the merge.
    """

    kind: str
    model1: str
    model2: str
    name: str = "result"
    title: str = ""

    def strengths(self, ratio: float, multiplier: float) -> tuple[float, float]:
        """ComfyUI's (strength_model, strength_patch) for this node."""
        if self.kind == RATIO:
            return ratio, 1.0 - ratio
        if self.kind == SUBTRACT:
            return multiplier, -multiplier
        return 1.0, 1.0

    def widget_value(self, ratio: float, multiplier: float) -> dict[str, float]:
        widget = NODE_KINDS[self.kind].widget
        return {} if widget is None else {widget: ratio if self.kind == RATIO else multiplier}


@dataclass(frozen=True)
class Target:
    """A source the engine builds once when it binds: ``fn`` of the ``roles``' float32 values,
    rounded once to the held precision (add-difference's ``model1 + (model2 - base)``)."""

    roles: tuple[str, ...]
    fn: Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Lerp:
    """The fast kernel: ``torch.lerp(start, end, weight(ratio, multiplier))`` per tensor in the
    working dtype. ``start`` / ``end`` are roles, or ``"target"`` built by ``target``."""

    start: str
    end: str
    weight: Callable[[float, float], float]
    target: Target | None = None

    @property
    def roles(self) -> tuple[str, str]:
        return self.start, self.end


@dataclass(frozen=True)
class SuperMerger:
    """A method's SuperMerger block-weight form: SuperMerger's merge ``mode`` and its alpha,
    ``(1 - ratio)``, times the multiplier when ``scaled_by_multiplier``. ``text_encoder_refusal``
    says why BASE cannot carry a text-encoder merge ("" = BASE is CLIPMergeSimple's ratio)."""

    mode: str
    scaled_by_multiplier: bool = False
    text_encoder_refusal: str = ""

    def scale(self, multiplier: float) -> float:
        return multiplier if self.scaled_by_multiplier else 1.0

    def alpha(self, ratio: float, multiplier: float) -> float:
        return (1.0 - ratio) * self.scale(multiplier)


def patch(w1: torch.Tensor, w2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """ComfyUI's weight patch on ``w1``, in float32: ``*= a`` (skipped at 1), ``+= b · w2``
    (skipped at 0)."""
    out = w1.to(F32, copy=True)
    if a != 1.0:
        out *= a
    if b != 0.0:
        out += b * w2.to(F32)
    return out


class MergeMethod:
    """A merge method. Subclass, set the class attributes, decorate with ``@register_method``.

    Example:
        >>> from merge_backend.methods import METHODS
        >>> import torch
        >>> METHODS["weighted_sum"].merge([torch.ones(2), torch.zeros(2)], ratio=0.25)
        tensor([0.2500, 0.2500])
        >>> [n.kind for n in METHODS["add_difference"].comfy]
        ['subtract', 'add', 'ratio']
    """

    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ("model1", "model2")
    uses_ratio: ClassVar[bool] = True
    uses_multiplier: ClassVar[bool] = False
    formula: ClassVar[str] = ""  # one line; ratio r = model1's share, m = multiplier
    ratio_zero: ClassVar[str] = "model2"  # what a block at ratio 0 holds (reports)
    comfy: ClassVar[tuple[Node, ...]] = ()
    comfy_refusal: ClassVar[str] = ""
    fast: ClassVar[Lerp | None] = None
    supermerger: ClassVar[SuperMerger | None] = None

    def exact(self, tensors: Sequence[torch.Tensor], ratio: float, multiplier: float
              ) -> torch.Tensor:
        """The ComfyUI-exact result in float32, from tensors in ``roles`` order. The default
        runs the node chain; a method without one overrides this with an elementwise function
        (the engine calls it on float32 chunks of flat buffers)."""
        values: dict[str, torch.Tensor] = dict(zip(self.roles, tensors))
        for node in self.comfy:
            values[node.name] = patch(values[node.model1], values[node.model2],
                                      *node.strengths(ratio, multiplier))
        return values[self.comfy[-1].name]

    def check(self, recipe: Any) -> None:
        """Raise ``RecipeError`` naming the field for a ``Recipe`` this method cannot merge
        (its roles, ratios and multiplier are checked already). (Typed Any: the Recipe module
        imports this one.)"""

    # ------------------------------------------------------------------ derived
    def merge(self, tensors: Sequence[torch.Tensor], ratio: float = 1.0, multiplier: float = 1.0,
              *, arithmetic: str = "comfy", work_dtype: torch.dtype = F32) -> torch.Tensor:
        """The merge of whole tensors (in ``roles`` order): float32 for ``comfy`` arithmetic
        (and for ``fast`` when the method has no fast kernel), ``work_dtype`` for ``fast``."""
        if arithmetic == "fast" and self.fast is not None:
            return lerp_fast(self.fast, dict(zip(self.roles, tensors)), ratio, multiplier,
                             work_dtype)
        if self.comfy:
            return self.exact(tensors, ratio, multiplier)
        return self.exact([t.to(F32) for t in tensors], ratio, multiplier)

    @property
    def clip_node(self) -> str | None:
        """The CLIPMerge node this method is on text encoders (a one-node chain over model1
        and model2), or None: it cannot merge text encoders."""
        if len(self.comfy) != 1 or (self.fast is not None and self.fast.target is not None):
            return None
        node = self.comfy[0]
        return NODE_KINDS[node.kind].clip if (node.model1, node.model2) == self.roles[:2] \
            and len(self.roles) == 2 else None

    def __repr__(self) -> str:
        return f"<merge method {self.name}: {self.formula}>"


def lerp_fast(fast: Lerp, values: Mapping[str, torch.Tensor], ratio: float, multiplier: float,
              work_dtype: torch.dtype) -> torch.Tensor:
    """The fast kernel on whole tensors: sources cast to the working dtype, the target built
    from those values in float32 and rounded once, one lerp (which on fp16 / bf16 computes in
    float32 and rounds once, as the engine's float32 scratch path does)."""
    work = {role: t.to(work_dtype) for role, t in values.items()}
    if fast.target is not None:
        work[TARGET] = fast.target.fn(*(work[r].float() for r in fast.target.roles)).to(work_dtype)
    return torch.lerp(work[fast.start], work[fast.end], fast.weight(ratio, multiplier))


def check_method(method: MergeMethod) -> None:
    """Refuse a method whose declaration is incomplete or inconsistent (MethodError)."""
    where = f"merge method {type(method).__name__}"
    name = method.name
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise MethodError(f"{where}: name {name!r} must be a plain identifier (snake_case)")
    where = f"merge method {name!r} ({type(method).__module__}.{type(method).__name__})"
    roles = tuple(method.roles)
    if not roles or roles[0] != "model1" or len(set(roles)) != len(roles) or TARGET in roles:
        raise MethodError(f"{where}: roles {roles} must start with model1 (whose keys and "
                          f"layout the output keeps), be distinct and not be {TARGET!r}")
    if not method.formula:
        raise MethodError(f"{where}: formula is empty; write the merge in one line")
    _check_chain(method, where)
    if method.fast is not None:
        known = set(roles) | ({TARGET} if method.fast.target is not None else set())
        if not set(method.fast.roles) <= known or (method.fast.target is not None
                                                   and not set(method.fast.target.roles) <= set(roles)):
            raise MethodError(f"{where}: fast kernel {method.fast} reads sources the method "
                              f"does not have (roles {roles})")


def _check_chain(method: MergeMethod, where: str) -> None:
    if not method.comfy:
        if type(method).exact is MergeMethod.exact:
            raise MethodError(f"{where}: give a ComfyUI node chain (comfy) or override exact()")
        if not method.comfy_refusal:
            raise MethodError(f"{where}: without a ComfyUI node chain, say why in comfy_refusal "
                              "(the ComfyUI export shows it)")
        return
    known = set(method.roles)
    for i, node in enumerate(method.comfy):
        if node.kind not in NODE_KINDS:
            raise MethodError(f"{where}: comfy[{i}].kind {node.kind!r} is not one of "
                              f"{', '.join(NODE_KINDS)}")
        missing = [v for v in (node.model1, node.model2) if v not in known]
        if missing:
            raise MethodError(f"{where}: comfy[{i}] reads {', '.join(missing)}, neither a role "
                              "nor an earlier node's name")
        known.add(node.name)
