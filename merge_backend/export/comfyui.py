"""A ComfyUI workflow that rebuilds a Recipe's merge from its source checkpoints.

The workflow uses only ComfyUI's own nodes, with input names exactly as they define them:

    CheckpointLoaderSimple (one per source; ckpt_name = the source's file name)
      -> the method's node chain (merge_backend.methods: its ``comfy``), whose ratio node is
         ModelMergeSimple (single) | ModelMergeBlocks (blocks) | the architecture's own node,
         ModelMergeSD1 / SD2 / SDXL … (comfy; mbw converted to those sliders, exactly):
         weighted_sum: the ratio node; subtract: ModelMergeSubtract; add: ModelMergeAdd;
         add_difference: ModelMergeSubtract(model2, base, multiplier) -> ModelMergeAdd(model1, .)
                         -> the ratio node(model1, .): ratio r gives A + (1-r)*m*(B - C)
         (mergesearch's comfy arithmetic runs the same chain step for step). A method without
         a chain is refused with its reason.
      -> CLIPMergeSimple / Subtract / Add when the recipe merges the text encoders
         (mbw BASE -> CLIPMergeSimple)
      -> LoraLoader per LoRA of the recipe, in order (lora_name = the file name; strength_model
         = its strength, strength_clip = its text-encoder strength). ComfyUI adds LoRA patches
         after the merge patches, in float32, as mergesearch does. Per-block LoRA strengths
         need custom nodes, so recipes with them are refused.
      -> CheckpointSave
    plus the probe prompt: CLIPTextEncode x2 -> KSampler -> VAEDecode -> PreviewImage.

The checkpoint it saves is the Recipe's when ComfyUI holds the UNet and the text encoders in
the Recipe's ``unet_dtype`` / ``text_encoder_dtype`` (``comfy_settings`` names the launch flags;
the editor format carries that line in ``extra.mergesearch.settings``).

``ComfyWorkflow.api()`` is the API format (``{id: {class_type, inputs}}``, what ComfyUI's
``/prompt`` takes); ``ComfyWorkflow.ui()`` is the format the editor saves and loads (nodes,
links, ``widgets_values``). Ratios are ComfyUI's (model1's share), as in the Recipe. ComfyUI's
sliders stop at [0, 1] and its multipliers at [-10, 10]: recipes past them are refused.

The sampler chain is a preview, not a replica of the probe images: ComfyUI draws its noise
differently from diffusers, so the same seed gives a different picture.

Example:
    >>> wf = comfy_workflow(recipe, prompt=ComfyPrompt("a red apple", seed=7))  # doctest: +SKIP
    >>> wf.api()["3"]["class_type"]                                            # doctest: +SKIP
    'ModelMergeSD1'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_backend.architectures import ARCHITECTURES, SINGLE, SLIDERS, convert_ratios
from merge_backend.atomic_files import atomic_write_text
from merge_backend.methods import METHODS, NODE_KINDS
from merge_backend.recipe import LoraSpec, Recipe

Link = tuple[int, int]  # (node id, output slot)

# class_type -> (link inputs [(name, type)], outputs [(name, type)]), as ComfyUI defines them.
_MERGE_IO = ((("model1", "MODEL"), ("model2", "MODEL")), (("MODEL", "MODEL"),))
_CLIP_IO = ((("clip1", "CLIP"), ("clip2", "CLIP")), (("CLIP", "CLIP"),))
NODE_IO: dict[str, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = {
    "CheckpointLoaderSimple": ((), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    "UNETLoader": ((), (("MODEL", "MODEL"),)),
    "DualCLIPLoader": ((), (("CLIP", "CLIP"),)),
    "TripleCLIPLoader": ((), (("CLIP", "CLIP"),)),
    "VAELoader": ((), (("VAE", "VAE"),)),
    "ModelSave": ((("model", "MODEL"),), ()),
    "EmptySD3LatentImage": ((), (("LATENT", "LATENT"),)),
    **{name: _MERGE_IO for name in ("ModelMergeSimple", "ModelMergeBlocks", "ModelMergeSubtract",
                                    "ModelMergeAdd")},
    **{name: _CLIP_IO for name in ("CLIPMergeSimple", "CLIPMergeSubtract", "CLIPMergeAdd")},
    "LoraLoader": ((("model", "MODEL"), ("clip", "CLIP")), (("MODEL", "MODEL"), ("CLIP", "CLIP"))),
    "CheckpointSave": ((("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")), ()),
    "CLIPTextEncode": ((("clip", "CLIP"),), (("CONDITIONING", "CONDITIONING"),)),
    "EmptyLatentImage": ((), (("LATENT", "LATENT"),)),
    "KSampler": ((("model", "MODEL"), ("positive", "CONDITIONING"),
                  ("negative", "CONDITIONING"), ("latent_image", "LATENT")),
                 (("LATENT", "LATENT"),)),
    "VAEDecode": ((("samples", "LATENT"), ("vae", "VAE")), (("IMAGE", "IMAGE"),)),
    "PreviewImage": ((("images", "IMAGE"),), ()),
}


def node_io(class_type: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """A node's (link inputs, outputs); the architectures' model-specific merge nodes
    (ModelMergeSD1, ModelMergeFlux1, …) take two models like ModelMergeSimple."""
    if class_type in NODE_IO:
        return NODE_IO[class_type]
    if any(v.node == class_type for a in ARCHITECTURES.values() for v in a.vocabularies.values()):
        return _MERGE_IO
    raise KeyError(f"internal: no inputs known for ComfyUI node {class_type}")


# The editor stores a "control after generate" value right after these widgets.
_CONTROL_AFTER = {"KSampler": "seed"}
MULTIPLIER_RANGE = (-10.0, 10.0)
LORA_STRENGTH_RANGE = (-100.0, 100.0)  # LoraLoader's strength_model / strength_clip

# Probe-set scheduler names (evaluators.schedulers) -> ComfyUI (sampler_name, scheduler).
SAMPLERS: dict[str, tuple[str, str]] = {
    "euler": ("euler", "normal"), "euler_karras": ("euler", "karras"),
    "euler_a": ("euler_ancestral", "normal"), "heun": ("heun", "normal"),
    "heun_karras": ("heun", "karras"), "dpm2": ("dpm_2", "normal"),
    "dpm2_karras": ("dpm_2", "karras"), "dpm2_a": ("dpm_2_ancestral", "normal"),
    "dpm2_a_karras": ("dpm_2_ancestral", "karras"), "dpm++_2m": ("dpmpp_2m", "normal"),
    "dpm++_2m_karras": ("dpmpp_2m", "karras"), "dpm++_2m_sde": ("dpmpp_2m_sde", "normal"),
    "dpm++_2m_sde_karras": ("dpmpp_2m_sde", "karras"),
    "dpm++_2s": ("dpmpp_2s_ancestral", "normal"),  # ComfyUI's only 2S sampler is ancestral
    "dpm++_2s_karras": ("dpmpp_2s_ancestral", "karras"),
    "dpm++_sde": ("dpmpp_sde", "normal"), "dpm++_sde_karras": ("dpmpp_sde", "karras"),
    "unipc": ("uni_pc", "normal"), "deis": ("deis", "normal"), "ddim": ("ddim", "ddim_uniform"),
    "ddpm": ("ddpm", "normal"), "pndm": ("euler", "normal"), "lms": ("lms", "normal"),
    "lcm": ("lcm", "sgm_uniform"),
    "flow_euler": ("euler", "simple"), "flow_heun": ("heun", "simple"),
}
# The ComfyUI launch flags that hold the UNet / text encoders in each precision. ComfyUI's
# defaults: the UNet in fp32 on the CPU and fp16 on most GPUs; the text encoders in fp16.
UNET_FLAGS = {"fp32": "--fp32-unet", "fp16": "--fp16-unet", "bf16": "--bf16-unet"}
TEXT_ENCODER_FLAGS = {"fp32": "--fp32-text-enc", "fp16": "--fp16-text-enc",
                      "bf16": "--bf16-text-enc"}


class ComfyExportError(ValueError):
    """A recipe ComfyUI's own nodes cannot express; the message names the field."""


@dataclass(frozen=True)
class ComfyPrompt:
    """What the workflow's sampler chain draws (one prompt, one seed)."""

    text: str = "a photograph"
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None  # None: the architecture's native size
    height: int | None = None
    sampler_name: str = "euler"
    scheduler: str = "normal"

    @classmethod
    def from_probe_set(cls, probe_set: Mapping[str, Any]) -> ComfyPrompt:
        """The first prompt and seed of a probe-set config dict (prompts already a list)."""
        first = probe_set["prompts"][0]
        first = {"text": first} if isinstance(first, str) else first
        negative = first.get("negative")
        if negative is None:
            negative = probe_set.get("negative_prompt", "")
        sampler, scheduler = SAMPLERS.get(probe_set.get("scheduler", "euler"), ("euler", "normal"))
        return cls(text=first["text"], negative=negative,
                   seed=int(probe_set.get("seeds", [0])[0]), steps=int(probe_set.get("steps", 20)),
                   cfg=float(probe_set.get("cfg", 7.0)), width=probe_set.get("width"),
                   height=probe_set.get("height"), sampler_name=sampler, scheduler=scheduler)


@dataclass
class ComfyNode:
    id: int
    class_type: str
    title: str
    links: dict[str, Link]
    widgets: dict[str, Any]


@dataclass
class ComfyWorkflow:
    """A node graph in both of ComfyUI's formats. Build it with ``comfy_workflow``."""

    nodes: list[ComfyNode]
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, class_type: str, title: str, links: Mapping[str, Link] | None = None,
            widgets: Mapping[str, Any] | None = None) -> int:
        links = dict(links or {})
        expected = [name for name, _ in node_io(class_type)[0]]
        if list(links) != expected:
            raise ValueError(f"internal: {class_type} takes links {expected}, got {list(links)}")
        node = ComfyNode(len(self.nodes) + 1, class_type, title, links, dict(widgets or {}))
        self.nodes.append(node)
        return node.id

    def api(self) -> dict[str, dict[str, Any]]:
        """The API format: ``{"id": {"class_type", "inputs", "_meta": {"title"}}}``."""
        return {str(n.id): {"class_type": n.class_type,
                            "inputs": {**{k: [str(src), slot] for k, (src, slot) in n.links.items()},
                                       **n.widgets},
                            "_meta": {"title": n.title}} for n in self.nodes}

    def ui(self) -> dict[str, Any]:
        """The editor format (LiteGraph, version 0.4): nodes, links and widgets_values."""
        links: list[list[Any]] = []
        out_links: dict[Link, list[int]] = {}
        inputs: dict[int, list[dict[str, Any]]] = {}
        for n in self.nodes:
            inputs[n.id] = []
            for slot, (name, kind) in enumerate(node_io(n.class_type)[0]):
                link_id = len(links) + 1
                src = n.links[name]
                links.append([link_id, src[0], src[1], n.id, slot, kind])
                out_links.setdefault(src, []).append(link_id)
                inputs[n.id].append({"name": name, "type": kind, "link": link_id})
        positions = _layout(self.nodes)
        nodes = [_ui_node(n, order, inputs[n.id], out_links, positions[n.id])
                 for order, n in enumerate(self.nodes)]
        return {"last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": nodes,
                "links": links, "groups": [], "config": {}, "extra": dict(self.extra),
                "version": 0.4}


def _ui_node(n: ComfyNode, order: int, inputs: list, out_links: Mapping[Link, list[int]],
             pos: tuple[float, float]) -> dict[str, Any]:
    outputs = [{"name": name, "type": kind, "links": out_links.get((n.id, slot)) or None,
                "slot_index": slot}
               for slot, (name, kind) in enumerate(node_io(n.class_type)[1])]
    values: list[Any] = []
    for name, value in n.widgets.items():
        values.append(value)
        if _CONTROL_AFTER.get(n.class_type) == name:
            values.append("fixed")
    return {"id": n.id, "type": n.class_type, "title": n.title, "pos": list(pos),
            "size": [340, _height(n)], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": n.class_type}, "widgets_values": values}


def _height(n: ComfyNode) -> int:
    io = max(len(node_io(n.class_type)[0]), len(node_io(n.class_type)[1]))
    return 30 + 22 * io + 24 * len(n.widgets)


def _layout(nodes: list[ComfyNode]) -> dict[int, tuple[float, float]]:
    """Columns by distance from the loaders; nodes stacked within a column."""
    depth: dict[int, int] = {}
    for n in nodes:  # nodes are added after their inputs
        depth[n.id] = 1 + max((depth[src] for src, _ in n.links.values()), default=-1)
    pos, column_y = {}, {}
    for n in nodes:
        y = column_y.get(depth[n.id], 40.0)
        pos[n.id] = (40.0 + 400.0 * depth[n.id], y)
        column_y[depth[n.id]] = y + _height(n) + 40
    return pos


# ---------------------------------------------------------------------------- building


def blend_node(recipe: Recipe) -> tuple[str, dict[str, float]]:
    """The ratio node for the recipe's vocabulary and its slider values, in the node's order."""
    arch = ARCHITECTURES[recipe.arch]
    r = recipe.ratios
    if recipe.vocabulary == SINGLE:
        return "ModelMergeSimple", {"ratio": r["all"]}
    vocab = arch.vocabulary(recipe.vocabulary)
    if vocab.node is not None and vocab.names:  # a node whose inputs are the block names
        return vocab.node, {n: r[n] for n in vocab.names}
    node = arch.vocabularies[SLIDERS].node  # grouped (mbw): the same ratios as sliders, exactly
    if node is None:
        raise ComfyExportError(f"recipe.vocabulary: {arch.title} has no ComfyUI merge node")
    return node, convert_ratios(arch, r, recipe.vocabulary, SLIDERS)[0]


def lora_strengths(spec: LoraSpec) -> tuple[float, float]:
    """LoraLoader's (strength_model, strength_clip) for one of the recipe's LoRAs."""
    return spec.strength, spec.strength if spec.te_strength is None else spec.te_strength


def _check_loras(recipe: Recipe) -> None:
    names = [Path(spec.path).name for spec in recipe.loras]
    if len(set(names)) < len(names):
        raise ComfyExportError(f"recipe.loras: LoRAs share a file name ({names}); ComfyUI finds "
                               "LoRAs by name, so rename one")
    for i, spec in enumerate(recipe.loras):
        blocks = {k: v for k, v in (spec.block_strengths or {}).items() if v != 1.0}
        if blocks:
            raise ComfyExportError(
                f"recipe.loras[{i}].block_strengths: {blocks}: ComfyUI's LoraLoader has one "
                "strength for the model and one for the text encoders (per-block LoRA weights "
                "need custom nodes); export the checkpoint instead")
        lo, hi = LORA_STRENGTH_RANGE
        for what, value in zip(("strength", "te_strength"), lora_strengths(spec)):
            if not lo <= value <= hi:
                raise ComfyExportError(f"recipe.loras[{i}].{what} = {value} is outside "
                                       f"LoraLoader's range [{lo}, {hi}]")
        differs = comfyui_differences(spec, recipe.arch)
        if differs:
            raise ComfyExportError(f"recipe.loras[{i}]: {spec.path}: ComfyUI's LoraLoader does "
                                   f"not apply {'; '.join(differs)} as mergesearch (and the "
                                   "format's own writer) does; export the checkpoint instead")


# Weight-dependent kinds ComfyUI (comfy/weight_adapter, v0.3.77) applies differently: no IA3
# adapter; OFT / BOFT take the file's alpha itself as the constraint (LyCORIS: alpha × output
# width), OFT ignores ``rescale`` and scales by strength twice; PEFT's lora_magnitude_vector
# is not read; DoRA per output row is normalised by ‖W‖ instead of ‖W + ΔW‖.
_COMFY_DIFFERS = {"IA3": "IA3 (no IA3 adapter)",
                  "OFT": "OFT (constraint, rescale and strength rules differ)",
                  "BOFT": "BOFT (its constraint rule differs)"}


def comfyui_differences(spec: LoraSpec, arch: str) -> list[str]:
    """The module kinds of a LoRA that ComfyUI's LoraLoader applies differently."""
    from merge_backend.lora import read_lora
    from merge_backend.lora.adapters import Dora

    lora = read_lora(spec.path, arch, partial=spec.partial)
    out = [_COMFY_DIFFERS[k] for k in lora.kinds() if k in _COMFY_DIFFERS]
    doras = [m.adapter for m in lora.modules.values() if isinstance(m.adapter, Dora)]
    if any(d.peft for d in doras):
        out.append("PEFT DoRA (lora_magnitude_vector is not read)")
    elif any(d.on_out for d in doras):
        out.append("DoRA normalised per output row (ComfyUI divides by the norm of the base "
                   "weight, not of the weight plus the LoRA)")
    return out


def _check_ranges(recipe: Recipe) -> None:
    _check_loras(recipe)
    if recipe.merge_method.uses_ratio:
        bad = {k: v for k, v in recipe.ratios.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ComfyExportError(f"recipe.ratios: {bad} lie outside ComfyUI's [0, 1] sliders; "
                                   "export the checkpoint instead")
    clip = recipe.effective_clip()
    limits = [("recipe.multiplier", recipe.multiplier if recipe.merge_method.uses_multiplier else 0.0,
               MULTIPLIER_RANGE)]
    if clip is not None:
        limits += [("recipe.clip.ratio", clip.ratio, (0.0, 1.0)),
                   ("recipe.clip.multiplier", clip.multiplier, MULTIPLIER_RANGE)]
    for where, value, (lo, hi) in limits:
        if not lo <= value <= hi:
            raise ComfyExportError(f"{where} = {value} is outside ComfyUI's range [{lo}, {hi}]")


def _model_nodes(wf: ComfyWorkflow, recipe: Recipe, loaders: Mapping[str, int]) -> Link:
    """The method's node chain (merge_backend.methods), wired from the loaders' models."""
    outputs: dict[str, Link] = {role: (loaders[role], 0) for role in recipe.merge_method.roles}
    for node in recipe.merge_method.comfy:
        kind = NODE_KINDS[node.kind]
        if kind.model is None:
            class_type, widgets = blend_node(recipe)
        else:
            class_type, widgets = kind.model, node.widget_value(1.0, recipe.multiplier)
        outputs[node.name] = wf.add(class_type, node.title or class_type,
                                    {"model1": outputs[node.model1], "model2": outputs[node.model2]},
                                    widgets), 0
    return outputs[recipe.merge_method.comfy[-1].name]


def _clip_nodes(wf: ComfyWorkflow, recipe: Recipe, loaders: Mapping[str, int]) -> Link:
    c1, c2 = (loaders["model1"], 1), (loaders["model2"], 1)
    clip = recipe.effective_clip()
    if clip is None:
        return c1  # ComfyUI's model merges keep model1's text encoders
    node = METHODS[clip.method].comfy[0]
    return wf.add(NODE_KINDS[node.kind].clip, "text encoders", {"clip1": c1, "clip2": c2},
                  node.widget_value(clip.ratio, clip.multiplier)), 0


def _sampler_nodes(wf: ComfyWorkflow, arch: str, prompt: ComfyPrompt, model: Link, clip: Link,
                   vae: Link) -> None:
    size = ARCHITECTURES[arch].native_size
    positive = wf.add("CLIPTextEncode", "probe prompt", {"clip": clip}, {"text": prompt.text})
    negative = wf.add("CLIPTextEncode", "negative prompt", {"clip": clip},
                      {"text": prompt.negative})
    latent_node = ARCHITECTURES[arch].checkpoint_save.latent_node
    latent = wf.add(latent_node, "Empty Latent Image", {},
                    {"width": prompt.width or size, "height": prompt.height or size,
                     "batch_size": 1})
    sampler = wf.add("KSampler", "KSampler",
                     {"model": model, "positive": (positive, 0), "negative": (negative, 0),
                      "latent_image": (latent, 0)},
                     {"seed": prompt.seed, "steps": prompt.steps, "cfg": prompt.cfg,
                      "sampler_name": prompt.sampler_name, "scheduler": prompt.scheduler,
                      "denoise": 1.0})
    decoded = wf.add("VAEDecode", "VAE Decode", {"samples": (sampler, 0), "vae": vae})
    wf.add("PreviewImage", "Preview Image", {"images": (decoded, 0)})


def comfy_workflow(recipe: Recipe, *, prompt: ComfyPrompt | None = None, name: str = "merged",
                   extra: Mapping[str, Any] | None = None) -> ComfyWorkflow:
    """The workflow that rebuilds ``recipe`` in ComfyUI (see the module docstring).

    ``name`` becomes CheckpointSave's ``checkpoints/<name>`` prefix; ``extra`` is stored in the
    editor format's ``extra.mergesearch`` (with the Recipe).
    """
    recipe.validate()
    if not recipe.merge_method.comfy:
        raise ComfyExportError(f"recipe.method: {recipe.method} has no ComfyUI node chain: "
                               f"{recipe.merge_method.comfy_refusal}; export the checkpoint "
                               "instead (a CheckpointLoaderSimple loads it)")
    _check_ranges(recipe)
    wf = ComfyWorkflow([], {"mergesearch": {"recipe": recipe.to_dict(),
                                            "settings": comfy_settings(recipe), **(extra or {})}})
    roles = recipe.merge_method.roles
    names = {role: Path(recipe.models[role].path).name for role in roles}
    paths = {Path(recipe.models[role].path) for role in roles}
    if len(set(names.values())) < len(paths):
        raise ComfyExportError(f"recipe.models: sources share a file name ({names}); ComfyUI "
                               "finds checkpoints by name, so rename one")
    loaded = {role: _loader_nodes(wf, recipe, role, name) for role, name in names.items()}
    separate = [role for role in loaded if _layout_of(Path(recipe.models[role].path)) is not None]
    if recipe.effective_clip() is not None and separate:
        raise ComfyExportError("recipe.clip: a source holds only the diffusion model (another "
                               "layout), so ComfyUI has no text encoders of it to merge")
    loaders = {role: node for role, (node, _, _) in loaded.items()}
    model = _model_nodes(wf, recipe, loaders)
    clip = _clip_nodes(wf, recipe, loaders)
    own_clip, own_vae = loaded["model1"][1], loaded["model1"][2]
    vae = (loaders["model1"], 2)
    if own_clip is not None:  # separate text-encoder and VAE files (a model-only layout)
        clip, vae = own_clip, own_vae
    for spec in recipe.loras:
        lora_name = Path(spec.path).name
        strength_model, strength_clip = lora_strengths(spec)
        lora = wf.add("LoraLoader", f"LoRA: {lora_name}", {"model": model, "clip": clip},
                      {"lora_name": lora_name, "strength_model": strength_model,
                       "strength_clip": strength_clip})
        model, clip = (lora, 0), (lora, 1)
    if own_clip is not None:  # model1 holds only the diffusion model: so does the merge
        wf.add("ModelSave", "save the merged model", {"model": model},
               {"filename_prefix": f"diffusion_models/{name}"})
    else:
        wf.add("CheckpointSave", "save the merge", {"model": model, "clip": clip, "vae": vae},
               {"filename_prefix": f"checkpoints/{name}"})
    _sampler_nodes(wf, recipe.arch, prompt or ComfyPrompt(), model, clip, vae)
    return wf


def _layout_of(path: Path):
    """The other layout a source file is stored in (None: the architecture's own, or a file
    not here to look at)."""
    from merge_backend.checkpoint import CheckpointError, open_checkpoint

    try:
        return open_checkpoint(path).layout
    except (CheckpointError, OSError):
        return None


def _loader_nodes(wf: ComfyWorkflow, recipe: Recipe, role: str, name: str
                  ) -> tuple[int, Link | None, Link | None]:
    """A source's loader node, and the links of the text encoders and VAE its layout loads from
    separate files (None: the loader's own CLIP and VAE outputs 1 and 2)."""
    layout = _layout_of(Path(recipe.models[role].path))
    if layout is None or layout.comfyui is None:
        return (wf.add("CheckpointLoaderSimple", f"{role}: {name}", {}, {"ckpt_name": name}),
                None, None)
    spec = layout.comfyui
    model = wf.add(spec.model.node, f"{role}: {name}", {},
                   {spec.model.file_input: name, **spec.model.widgets})
    clip = vae = None
    if role != "model1":  # the merge's text encoders and VAE are model1's
        return model, None, None
    if spec.clip is not None:
        clip = (wf.add(spec.clip.node, f"{role}: text encoders", {}, dict(spec.clip.widgets)), 0)
    if spec.vae is not None:
        vae = (wf.add(spec.vae.node, f"{role}: VAE", {}, dict(spec.vae.widgets)), 0)
    return model, clip, vae


def comfy_settings(recipe: Recipe) -> str:
    """Which ComfyUI settings rebuild ``recipe``'s checkpoint from its workflow, and how exactly.

    Example:
        >>> comfy_settings(recipe)                       # doctest: +SKIP
        'ComfyUI started with --fp32-unet --fp16-text-enc rebuilds this merge bit for bit'
    """
    flags = f"{UNET_FLAGS[recipe.unet_dtype]} {TEXT_ENCODER_FLAGS[recipe.text_encoder_dtype]}"
    if recipe.arithmetic == "comfy":
        how = "bit for bit"
    else:
        how = (f"to float32 rounding: the fast arithmetic is one lerp per tensor in "
               f"{recipe.unet_dtype}, the nodes compute the same sum in their own float32 order "
               "(in an fp16 file about one value in 1,000 may differ by one fp16 step)")
    if recipe.loras and (len(recipe.loras) > 1 or recipe.arithmetic == "comfy"):
        how += ("; LoRAs: ComfyUI adds them one after the other, mergesearch their sum "
                "(float32 rounding apart with more than one, or alpha != rank)")
    return f"ComfyUI started with {flags} rebuilds this merge {how}"


def write_comfy_workflow(workflow: ComfyWorkflow, ui_path: Path, api_path: Path,
                         replace: bool = True) -> None:
    """Write the editor format to ``ui_path`` and the API format to ``api_path``, atomically
    (``replace``: see ``file_sinks.move_into_place``)."""
    atomic_write_text(Path(ui_path), json.dumps(workflow.ui(), indent=2) + "\n", replace)
    atomic_write_text(Path(api_path), json.dumps(workflow.api(), indent=2) + "\n", replace)
