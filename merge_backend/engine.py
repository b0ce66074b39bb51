"""The in-memory merge engine: a new candidate written into a live pipeline's weights.

``MergeEngine(pipe, recipe)`` binds the Recipe's sources to the parameters of a live diffusers
pipeline once: the parameters of each block are re-seated as views of one flat buffer, and
the sources are laid out the same way (on the device, or in pinned host memory). Then
``apply(recipe)`` writes a candidate in place — one pass over memory per block, no
allocation, parameter addresses unchanged, blocks whose ratio did not change skipped.

Example:
    >>> pipe = load_pipeline("a.safetensors", config_folder=cfg)           # doctest: +SKIP
    >>> engine = MergeEngine(pipe, recipe, device="cuda", memory="auto")    # doctest: +SKIP
    >>> engine.apply(recipe.replace(ratios={**recipe.ratios, "IN04": 0.3})) # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import engine_kernels as kernels
from .architectures import ARCHITECTURES
from .dtypes import DTYPES, held, rounds_to
from .engine_memory import MemoryPlan, plan_memory
from .merge_file import open_sources
from .methods import METHODS, TARGET
from .naming import convert_value, key_maps, original_value
from .plan import IncompatibleSourcesError, KeyPlan, plan_merge
from .recipe import Recipe, RecipeError

DEFAULT_CHUNK = 1 << 24  # elements per streamed chunk (64 MiB of fp32 scratch)


_ALIGN_BYTES = 64  # each weight starts on a 64-byte boundary of its block's flat buffer


def aligned_offsets(items: list, itemsize: int) -> tuple[list[int], int]:
    """Where each weight of a block starts in its flat buffer (in elements), and the buffer's
    length: every weight aligned as a freshly allocated tensor is, so CPU kernels take the same
    path (and round the same way) as on a pipeline loaded from the file."""
    align = max(1, _ALIGN_BYTES // itemsize)
    offsets, offset = [], 0
    for _, param, _, _ in items:
        offsets.append(offset)
        offset += -(-param.numel() // align) * align
    return offsets, offset


def weights_of(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a file stores of a module, in state-dict order: its parameters and persistent
    buffers (SD3's positional table, which ComfyUI's merges blend too), tied copies once."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    return [(n, params.get(n, buffers.get(n))) for n in module.state_dict(keep_vars=True)
            if n in params or n in buffers]


@dataclass
class BlockGroup:
    """The parameters of one block, seated in one flat live buffer, and their sources."""

    name: str
    component: str
    block: str
    numel: int
    live: torch.Tensor
    sources: dict[str, torch.Tensor] = field(default_factory=dict)
    loras: dict[int, torch.Tensor] = field(default_factory=dict)  # LoRA index -> flat delta
    # original key -> [(parameter, KeyMap)] of the keys LoRAs change when one of them does so
    # by a weight-dependent rule (DoRA, OFT, …): every LoRA of the block then runs after the
    # merge, on the merged weight, in the Recipe's order
    weighted: dict[str, list] = field(default_factory=dict)
    last: tuple | None = None
    held: torch.dtype | None = None  # the precision the block is held in (sources and result)


@dataclass(frozen=True)
class ApplyStats:
    applied: int
    skipped: int
    seconds: float


class MergeEngine:
    """Binds a Recipe's sources to a live pipeline; ``apply`` writes candidates in place."""

    def __init__(self, pipe, recipe: Recipe, *, device: str | torch.device | None = None,
                 memory: str = "auto", chunk_elements: int = DEFAULT_CHUNK):
        recipe.validate()
        self.pipe = pipe
        self.bound = recipe
        self.arch = ARCHITECTURES[recipe.arch]
        self.diffusion = self.arch.diffusion.name  # the UNet (or transformer) component
        live = self.module(self.diffusion)
        self.device = torch.device(device) if device is not None else live.device
        self.chunk = int(chunk_elements)
        sources = open_sources(recipe)
        plan = plan_merge(recipe, sources)  # compatibility and block names fail here, at bind
        by_key = {k.key: k for k in plan.keys}
        self.live_dtype = live.dtype
        layout = self._layout(by_key)
        self.memory: MemoryPlan = plan_memory(memory, self.device, *self._bytes(layout))
        self.groups = [self._bind_group(name, params, sources) for name, params in layout.items()]
        self._bind_loras(layout, sources)
        self._keep_model1_text_encoders(sources)
        largest = max(g.numel for g in self.groups)
        self.runner = kernels.Runner(self.device, self.live_dtype, min(self.chunk, largest))
        rounding = {g.held for g in self.groups if rounds_to(g.held, self.live_dtype)}
        self.runner.allocate(self._needs_staging(), self._needs_scratch(), tuple(rounding))

    # ------------------------------------------------------------------ binding
    def _needs_staging(self) -> int:
        """Source roles a fast op must stage (sources off the device or in another dtype)."""
        return max((len(g.sources) for g in self.groups
                    if any(s.device != self.device or s.dtype != self.live_dtype
                           for s in g.sources.values())), default=0)

    def _needs_scratch(self) -> int:
        """float32 scratch buffers the exact ops, the held precisions and LoRAs need (0 for
        fast-only recipes held in the live dtype)."""
        method = self.bound.merge_method
        fast_only = (kernels.is_fast(method, self.bound.arithmetic) and not self.bound.loras
                     and len(self.merged_components(self.bound)) == 1
                     and all(g.held == self.live_dtype for g in self.groups))
        return 0 if fast_only else kernels.scratch_needed(method)

    def merged_components(self, recipe: Recipe) -> tuple[str, ...]:
        """The components the engine writes: the UNet, and the text encoders when the Recipe
        merges them or has LoRAs (which may change them)."""
        tes = tuple(te.name for te in self.arch.text_encoders)
        merges_te = (recipe.clip is not None or bool(recipe.loras)
                     or (recipe.text_encoder_block is not None and recipe.merge_method.uses_ratio))
        return (self.diffusion,) + (tes if merges_te else ())

    def module(self, component: str) -> torch.nn.Module:
        return getattr(self.pipe, self.arch.components[component].folder)

    def _layout(self, by_key: Mapping[str, KeyPlan]) -> dict[str, list]:
        """Group name -> [(param name, parameter, KeyMap, KeyPlan)], in module order."""
        layout: dict[str, list] = {}
        for component in self.merged_components(self.bound):
            module = self.module(component)
            names = [n for n, _ in weights_of(module)]
            maps = {km.diffusers: km for km in key_maps(self.arch, component, names,
                                                        getattr(module, "config", None))}
            identity = self.arch.components[component].identity
            for name, param in weights_of(module):
                if name in identity:  # the identity diffusers' loader sets, whatever the file says
                    continue
                km = maps[name]
                kp = by_key.get(km.original)
                if component != self.diffusion:  # text encoders: one group each; op chosen per apply
                    layout.setdefault(f"{component}:{component}", []).append((name, param, km, kp))
                    continue
                if kp is None or kp.op == "copy":
                    raise RecipeError(f"{component}.{name} ({km.original}) is not merged by the "
                                      "recipe; the pipeline does not match model1's architecture")
                layout.setdefault(f"{component}:{kp.block}", []).append((name, param, km, kp))
        return layout

    def _roles(self, component: str) -> tuple[str, ...]:
        if component != self.diffusion:
            return ("model1", "model2")
        method = self.bound.merge_method
        if kernels.is_fast(method, self.bound.arithmetic):
            # the fast kernel's sources; a target (add-difference's model1 + (model2 - base))
            # is built at bind, then every candidate is one lerp
            return tuple(dict.fromkeys(method.roles[:1] + method.fast.roles))
        return method.roles

    def held_dtype(self, component: str) -> torch.dtype:
        """The dtype a component's sources are held in (the Recipe's precision)."""
        return DTYPES[self.bound.held_dtype(component)]

    def _bytes(self, layout: Mapping[str, list]) -> tuple[int, int]:
        total = 0
        for g, items in layout.items():
            component = g.split(":")[0]
            item = self.held_dtype(component).itemsize
            total += aligned_offsets(items, self.live_dtype.itemsize)[1] * len(
                self._roles(component)) * item
        item = max(self.held_dtype(c).itemsize for c in self.merged_components(self.bound))
        staging = 2 * 3 * self.chunk * max(item, self.live_dtype.itemsize)
        return total, staging

    def _bind_group(self, name: str, items: list, sources) -> BlockGroup:
        component, block = name.split(":", 1)
        offsets, numel = aligned_offsets(items, self.live_dtype.itemsize)
        live = torch.zeros(numel, dtype=self.live_dtype, device=self.device)  # gaps stay 0
        for (_, param, _, _), offset in zip(items, offsets, strict=True):
            view = live[offset:offset + param.numel()].view(param.shape)
            view.copy_(param.data)
            param.data = view
        group = BlockGroup(name, component, block, numel, live, held=self.held_dtype(component))
        roles = self._roles(component)
        on_host = self.memory.mode == "offload"
        for role in roles:
            if role != TARGET:
                group.sources[role] = self._flat_source(items, sources[role], on_host, group.held)
        if TARGET in roles:
            group.sources[TARGET] = self._flat_target(items, sources, group, on_host)
        return group

    def _flat_source(self, items: list, ckpt, on_host: bool, dtype: torch.dtype) -> torch.Tensor:
        """A source's tensors of one block, held in ``dtype`` (rounded once), laid out flat."""
        offsets, numel = aligned_offsets(items, self.live_dtype.itemsize)
        device = torch.device("cpu") if on_host else self.device
        pin = on_host and self.device.type == "cuda"
        flat = torch.zeros(numel, dtype=dtype, device=device, pin_memory=pin)
        for (_, param, km, _), offset in zip(items, offsets, strict=True):
            value = convert_value(km, ckpt.get(km.original)).reshape(-1)
            if value.numel() != param.numel():
                raise IncompatibleSourcesError(
                    f"{ckpt.path}: {km.original} has {value.numel()} values, the pipeline's "
                    f"parameter has {param.numel()} ({list(param.shape)}): another model variant")
            flat[offset:offset + value.numel()].copy_(value)
        return flat

    def _flat_target(self, items: list, sources, group: BlockGroup, on_host: bool
                     ) -> torch.Tensor:
        # The fast kernel's target (add-difference: model1 + (model2 - base)), rounded once to
        # the held dtype, so each candidate is one lerp towards it.
        target = self.bound.merge_method.fast.target
        flats = [group.sources[r].cpu() if r in group.sources
                 else self._flat_source(items, sources[r], True, group.held) for r in target.roles]
        built = kernels.build_target(target, flats, group.held, self.chunk)
        if on_host:
            return built.pin_memory() if self.device.type == "cuda" else built
        return built.to(self.device)

    def _bind_loras(self, layout: Mapping[str, list], sources) -> None:
        """Dense float32 deltas of each LoRA, laid out like the block buffers they change."""
        self.lora_files: list = []  # the LoRAs read, in the Recipe's order
        if not self.bound.loras:
            return
        from .lora.apply import LoraUse, check_loras, needs_weight, uses_from_recipe

        uses = uses_from_recipe(self.bound)
        check_loras(uses, sources["model1"])
        self.lora_files = [u.lora for u in uses]
        unit = [LoraUse(u.lora, 1.0, None, None, self.bound.vocabulary) for u in uses]
        device = torch.device("cpu") if self.memory.mode == "offload" else self.device
        for group, items in zip(self.groups, layout.values(), strict=True):
            if any(needs_weight(unit, km.original) for _, _, km, _ in items):
                for _, param, km, _ in items:
                    if any(u.entries(km.original) for u in unit):
                        group.weighted.setdefault(km.original, []).append((param, km))
                continue
            for index, use in enumerate(unit):
                flat = self._flat_lora(items, use, sources["model1"])
                if flat is not None:
                    group.loras[index] = flat.to(device)

    def _flat_lora(self, items: list, use, model1) -> torch.Tensor | None:
        from .lora.apply import lora_deltas_for_key

        flat = None
        offsets, numel = aligned_offsets(items, self.live_dtype.itemsize)
        for (_, param, km, _), offset in zip(items, offsets, strict=True):
            delta = lora_deltas_for_key([use], km.original, model1.shape(km.original))
            if delta is not None:
                if flat is None:
                    flat = torch.zeros(numel)
                flat[offset:offset + param.numel()].copy_(convert_value(km, delta).reshape(-1))
        return flat

    def lora_strengths(self, recipe: Recipe, group: BlockGroup) -> tuple[float, ...]:
        """Each LoRA's strength on a group (0.0 where it changes nothing there)."""
        out = []
        for index, spec in enumerate(recipe.loras):
            blocks = spec.block_strengths or {}
            if index not in group.loras and not group.weighted:
                out.append(0.0)
            elif group.component == self.diffusion:
                out.append(spec.strength * blocks.get(group.block, 1.0))
            elif spec.te_strength is not None:
                out.append(spec.te_strength)
            else:
                out.append(spec.strength * blocks.get(recipe.text_encoder_block, 1.0))
        return tuple(out)

    def _keep_model1_text_encoders(self, sources) -> None:
        """Text encoders the Recipe does not merge hold model1's weights, as in ComfyUI."""
        layout = sources["model1"].layout
        if layout is not None and any(te.name not in layout.components
                                      for te in self.arch.text_encoders):
            raise RecipeError(f"model1 {sources['model1'].path} is in the {layout.name} layout "
                              f"({layout.title}): it holds only {', '.join(layout.components)}; a live "
                              "pipeline needs model1's text encoders; use a file with all "
                              "components (as ComfyUI's CheckpointSave writes) as model1")
        merged = self.merged_components(self.bound)
        for te in self.arch.text_encoders:
            if te.name in merged:
                continue
            module = self.module(te.name)
            names = [n for n, _ in weights_of(module)]
            maps = {km.diffusers: km for km in key_maps(self.arch, te.name, names,
                                                        getattr(module, "config", None))}
            with torch.no_grad():
                for name, param in weights_of(module):
                    if name in te.identity:
                        continue
                    value = convert_value(maps[name], sources["model1"].get(maps[name].original))
                    param.data.copy_(held(value, self.held_dtype(te.name)).reshape(param.shape))

    # ------------------------------------------------------------------ applying
    def check_compatible(self, recipe: Recipe) -> None:
        """A candidate must differ from the bound Recipe only in ratios and multipliers."""
        recipe.validate()
        b = self.bound
        same = (recipe.arch, recipe.method, recipe.vocabulary, recipe.arithmetic,
                recipe.unet_dtype, recipe.text_encoder_dtype,
                {r: s.path for r, s in recipe.models.items()}, [x.path for x in recipe.loras])
        bound = (b.arch, b.method, b.vocabulary, b.arithmetic, b.unet_dtype, b.text_encoder_dtype,
                 {r: s.path for r, s in b.models.items()}, [x.path for x in b.loras])
        if same != bound:
            raise RecipeError("this recipe needs a new MergeEngine: only ratios, multipliers, "
                              "LoRA strengths and the text-encoder ratio may change between "
                              "candidates")
        if set(self.merged_components(recipe)) - set(self.merged_components(b)):
            raise RecipeError("this recipe merges text encoders the engine was not bound with; "
                              "bind with a recipe whose clip is set")

    def targets(self, recipe: Recipe) -> dict[str, tuple]:
        """Group name -> (op, ratio, multiplier, LoRA strengths) the recipe asks for."""
        out = {}
        clip = recipe.effective_clip()
        for g in self.groups:
            if g.component == self.diffusion:
                target = (recipe.method, recipe.unet_ratio(g.block), recipe.multiplier)
            elif clip is None:
                target = ("copy", 1.0, 1.0)
            else:
                target = (clip.method, clip.ratio, clip.multiplier)
            out[g.name] = (*target, self.lora_strengths(recipe, g))
        return out

    @torch.no_grad()
    def apply(self, recipe: Recipe, *, force: bool = False) -> ApplyStats:
        """Write ``recipe``'s candidate into the live weights, skipping unchanged blocks."""
        start = time.perf_counter()
        self.check_compatible(recipe)
        applied = skipped = 0
        targets = self.targets(recipe)
        for group in self.groups:
            target = targets[group.name]
            if not force and group.last == target:
                skipped += 1
                continue
            op, ratio, multiplier, strengths = target
            loras = [(group.loras[i], k) for i, k in enumerate(strengths)
                     if k != 0.0 and i in group.loras]
            method = None if op == "copy" else METHODS[op]
            self.runner.run(group, method, ratio, multiplier, recipe.arithmetic, loras,
                            group.held)
            if group.weighted:
                self._apply_weighted(group, recipe)
            group.last = target
            applied += 1
        self.runner.synchronize()
        return ApplyStats(applied, skipped, time.perf_counter() - start)

    def _apply_weighted(self, group: BlockGroup, recipe: Recipe) -> None:
        """The LoRAs of a block with weight-dependent modules, applied to its merged weights
        (the live values, so a live fp16 / bf16 pipeline rounds the merge before the LoRAs;
        the file merge uses the float32 merge), each LoRA on the weight the ones before it
        left."""
        from .lora.apply import LoraUse, lora_deltas_for_key

        uses = [LoraUse(f, s.strength, s.block_strengths, s.te_strength, recipe.vocabulary)
                for f, s in zip(self.lora_files, recipe.loras, strict=True)]
        for key, params in group.weighted.items():
            base = original_value([km for _, km in params], [p.data.float() for p, _ in params])
            delta = lora_deltas_for_key(uses, key, base.shape, device=self.device, base=base)
            if delta is None:
                continue
            value = held(base + delta, group.held)
            for param, km in params:
                param.data.copy_(convert_value(km, value).reshape(param.shape))

    def addresses(self) -> dict[str, int]:
        """data_ptr of every merged parameter (they never change after bind)."""
        out = {}
        for component in self.merged_components(self.bound):
            for name, p in weights_of(self.module(component)):
                out[f"{component}.{name}"] = p.data_ptr()
        return out
