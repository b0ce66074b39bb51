"""ComfyUI's merge arithmetic written out from its source (REFERENCE §1, §2, §6), independently
of mergesearch's kernels: the oracle the method contract and the export tests compare against.

- A merge node is a weight patch on model1's weight, in float32: ``w *= strength_model``
  (skipped at 1), then ``w += strength_patch * other`` (skipped at 0); a patch taken from an
  already patched model is computed first, from that model's own weight.
- ModelMergeSimple / CLIPMergeSimple: (ratio, 1 - ratio); ModelMergeBlocks and its
  model-specific subclasses (ModelMergeSD1 …): the ratio of the longest slider name the key
  (after ``diffusion_model.``) starts with, else the first slider; Subtract: (m, -m); Add:
  (1, 1). CLIPMerge* leave keys ending in ``.position_ids`` / ``.logit_scale`` alone.
- A model is held in one precision: its weights are rounded to it when loaded, and the patched
  result is rounded to it once, when it is saved.
- LoraLoader adds ``strength_model`` times each LoRA delta to the model's weights and
  ``strength_clip`` times it to the text encoders', in float32 (the delta, up @ down · alpha /
  rank, comes from merge_backend.lora, checked against diffusers' own fuse in the tests).
- CheckpointSave keeps the VAE of the loader it is wired to; ModelSave (a model-only layout,
  loaded by UNETLoader, which adds the ``diffusion_model.`` prefix bare files lack) saves the
  diffusion model alone.

Example:
    >>> import torch
    >>> patch(torch.ones(2), torch.zeros(2), 0.25, 0.75)
    tensor([0.2500, 0.2500])
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

CLIP_SKIPS = (".position_ids", ".logit_scale")


def patch(w1: torch.Tensor, w2: torch.Tensor, strength_model: float, strength_patch: float
          ) -> torch.Tensor:
    w = w1.float().clone()
    if strength_model != 1.0:
        w *= strength_model
    if strength_patch != 0.0:
        w += strength_patch * w2.float()
    return w


def held(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight as a model held in ``dtype`` holds it (float32 holds fp16/bf16/fp32 exactly)."""
    return t.to(dtype).float() if t.is_floating_point() else t


def strengths(class_type: str, inner_key: str, widgets: Mapping[str, float]) -> tuple[float, float]:
    """A merge node's (strength_model, strength_patch) for a key (``inner_key``: after the
    diffusion model's prefix)."""
    if class_type in ("ModelMergeSubtract", "CLIPMergeSubtract"):
        return widgets["multiplier"], -widgets["multiplier"]
    if class_type in ("ModelMergeAdd", "CLIPMergeAdd"):
        return 1.0, 1.0
    if class_type in ("ModelMergeSimple", "CLIPMergeSimple"):
        return widgets["ratio"], 1.0 - widgets["ratio"]
    ratio, longest = next(iter(widgets.values())), 0  # ModelMergeBlocks and its subclasses
    for name, value in widgets.items():
        if inner_key.startswith(name) and len(name) > longest:
            ratio, longest = value, len(name)
    return ratio, 1.0 - ratio


def _split(path: Path, model: str, clips: tuple[str, ...]) -> tuple[dict, dict, dict]:
    sd = load_file(str(path))
    return ({k: v for k, v in sd.items() if k.startswith(model)},
            {k: v for k, v in sd.items() if k.startswith(clips)},
            {k: v for k, v in sd.items() if not k.startswith((model, *clips))})


def _add_lora(state: dict, lora_path: Path, strength: float) -> dict:
    from merge_backend.lora import LoraUse, lora_deltas_for_key, read_lora

    lora = [LoraUse(read_lora(lora_path))]
    out = dict(state)
    for key, weight in state.items():
        # weight-dependent kinds (DoRA, GLoRA) patch the weight they are given
        delta = lora_deltas_for_key(lora, key, weight.shape, base=weight)
        if delta is not None and strength != 0.0:
            out[key] = weight.float() + strength * delta
    return out


def evaluate_workflow(api: Mapping[str, dict], files: Mapping[str, Path], *,
                      model_prefix: str = "model.diffusion_model.",
                      clip_prefixes: tuple[str, ...] = ("cond_stage_model.", "conditioner.",
                                                        "text_encoders."),
                      unet: torch.dtype = torch.float32, clip: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """Run the merge part of an API-format workflow; the state dict CheckpointSave gets.

    ``files``: checkpoint and LoRA file name -> path. ``unet`` / ``clip``: the precision
    ComfyUI holds the diffusion model / text encoders in (keys CLIPMerge skips stay as they
    are)."""
    done: dict[str, tuple] = {}

    def hold(state: dict, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> dict:
        return {k: v if k.endswith(skip) else held(v, dtype) for k, v in state.items()}

    def get(link) -> object:
        return run(link[0])[link[1]]

    def run(node_id: str) -> tuple:
        if node_id in done:
            return done[node_id]
        node = api[node_id]
        kind, inputs = node["class_type"], node["inputs"]
        widgets = {k: v for k, v in inputs.items() if not isinstance(v, list)}
        if kind == "UNETLoader":  # a bare diffusion model (BFL's Flux files): ComfyUI prefixes it
            sd = load_file(str(files[inputs["unet_name"]]))
            result = (hold({k if k.startswith(model_prefix) else model_prefix + k: v
                            for k, v in sd.items()}, unet),)
        elif kind in ("DualCLIPLoader", "VAELoader"):  # separate files, not part of the merge
            result = ({},)
        elif kind == "CheckpointLoaderSimple":
            model, text, vae = _split(files[inputs["ckpt_name"]], model_prefix, clip_prefixes)
            result = (hold(model, unet), hold(text, clip, CLIP_SKIPS), vae)
        elif kind.startswith(("ModelMerge", "CLIPMerge")):
            first, second = ("model1", "model2") if kind.startswith("Model") else ("clip1", "clip2")
            a, b = get(inputs[first]), get(inputs[second])
            merged = dict(a)
            for key in b:
                if kind.startswith("CLIP") and key.endswith(CLIP_SKIPS):
                    continue
                merged[key] = patch(a[key], b[key],
                                    *strengths(kind, key[len(model_prefix):], widgets))
            result = (merged,)
        elif kind == "LoraLoader":
            lora = Path(files[inputs["lora_name"]])
            result = tuple(_add_lora(get(inputs[part]), lora, widgets[strength])
                           for part, strength in (("model", "strength_model"),
                                                  ("clip", "strength_clip")))
        elif kind == "ModelSave":
            result = (hold(get(inputs["model"]), unet), {}, {})
        elif kind == "CheckpointSave":
            result = (hold(get(inputs["model"]), unet), hold(get(inputs["clip"]), clip, CLIP_SKIPS),
                      get(inputs["vae"]))
        else:
            raise AssertionError(f"unexpected node {kind} upstream of CheckpointSave")
        done[node_id] = result
        return result

    save = next(i for i, n in api.items() if n["class_type"] in ("CheckpointSave", "ModelSave"))
    model, text, vae = run(save)
    return {**model, **text, **vae}
