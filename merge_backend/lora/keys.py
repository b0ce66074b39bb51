"""What the keys of a LoRA file mean: module name, role and format — or which format a key
the project cannot apply belongs to, so an error (or ``partial`` reading) can say it.

Example:
    >>> split("lora_unet_conv_in.lora_down.weight")
    ('lora_unet_conv_in', 'down', 'kohya')
    >>> split("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight")
    ('unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0', 'up', 'diffusers-attn-processor')
    >>> recognise("bundle_emb.sks.string_to_param.*")
    'bundled textual-inversion embedding (kohya bundle_emb.*)'
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# suffix in the file -> (role, format). Longest suffixes are tried first.
_SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_up.weight": ("up", "kohya"), ".lora_down.weight": ("down", "kohya"),
    ".lora_B.weight": ("up", "peft"), ".lora_A.weight": ("down", "peft"),
    ".lora_B.bias": ("up_bias", "peft"),
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
    # weight-dependent formats (adapters.py): DoRA (kohya / LyCORIS and PEFT), OFT / BOFT,
    # IA3 (its ".weight" is recognised by the module's ".on_input"), GLoRA
    ".dora_scale": ("dora_scale", "dora"),
    ".lora_magnitude_vector": ("magnitude", "peft-dora"),
    ".lora_magnitude_vector.weight": ("magnitude", "peft-dora"),
    ".lora_magnitude_vector.default.weight": ("magnitude", "peft-dora"),
    ".oft_blocks": ("oft_blocks", "oft"), ".rescale": ("rescale", "oft"),
    ".on_input": ("on_input", "ia3"),
    ".a1.weight": ("a1", "glora"), ".a2.weight": ("a2", "glora"),
    ".b1.weight": ("b1", "glora"), ".b2.weight": ("b2", "glora"), ".bm.weight": ("bm", "glora"),
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)

# Formats recognised but not applied: (key suffix or prefix, what it is).
_KNOWN_UNSUPPORTED = (
    ("bundle_emb.", "bundled textual-inversion embedding (kohya bundle_emb.*)"),
    (".oft_diag", "LyCORIS < 2.0 OFT (oft_diag)"),
    (".oft_r", "PEFT OFT (oft_r)"), (".oft_R.weight", "PEFT OFT (oft_R)"),
    (".boft_R", "PEFT BOFT (boft_R / boft_s)"), (".boft_s", "PEFT BOFT (boft_R / boft_s)"),
    (".ia3_l", "PEFT IA3 (ia3_l)"),
    (".w_norm", "LyCORIS norm module (w_norm / b_norm)"),
    (".b_norm", "LyCORIS norm module (w_norm / b_norm)"),
    (".vera_lambda_b", "PEFT VeRA"), (".vera_lambda_d", "PEFT VeRA"),
    (".lora_embedding_A", "PEFT LoRA on an embedding layer"),
    (".lora_embedding_B", "PEFT LoRA on an embedding layer"),
)

# diffusers < 0.20 attention processors: '<attn>.processor.to_q_lora.down.weight' (UNet) and
# '<self_attn>.to_q_lora.down.weight' (text encoder); diffusers 0.42 loads nothing from them.
_ATTN_PROCESSOR = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _attn_processor(key: str) -> tuple[str, str, str] | None:
    match = _ATTN_PROCESSOR.match(key)
    if match is None:
        return None
    stem, _, proj, role = match.groups()
    if stem.startswith("text_encoder") and "self_attn" in stem:
        module = f"{stem}.{_TEXT_PROJ[proj]}"
    else:
        module = f"{stem}.{proj}" + (".0" if proj == "to_out" else "")
    return module, role, "diffusers-attn-processor"


def split(key: str) -> tuple[str, str, str] | None:
    """(module name, role, format) of a file key, or None for a key of no readable format."""
    processor = _attn_processor(key)
    if processor is not None:
        return processor
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            role, fmt = _SUFFIXES[suffix]
            name = key[: -len(suffix)].removeprefix("base_model.model.")
            if fmt == "kohya" and name.startswith(("diffusion_model.", "text_encoders.")):
                fmt = "comfyui"
            return name, role, fmt
    return None


def recognise(key: str) -> str | None:
    """The format a key the project cannot apply belongs to, when it knows it."""
    for pattern, what in _KNOWN_UNSUPPORTED:
        prefix = not pattern.startswith(".")
        if (key.startswith(pattern) if prefix else pattern in key):
            return what
    return None


def group(tensors: Mapping[str, Tensor]
          ) -> tuple[dict[str, dict[str, Tensor]], dict[str, int], list[str]]:
    """Module name -> {role: tensor}, how many keys each format has, and the keys no
    readable format claims (in file order)."""
    ia3 = {k.removesuffix(".on_input") for k in tensors if k.endswith(".on_input")}
    groups: dict[str, dict[str, Tensor]] = {}
    formats: dict[str, int] = {}
    unknown = []
    for key, value in tensors.items():
        stem = key.removesuffix(".weight")
        if key.endswith(".weight") and stem in ia3:
            parts: tuple[str, str, str] | None = (stem, "ia3", "ia3")
        else:
            parts = split(key)
        if parts is None:
            unknown.append(key)
            continue
        name, role, fmt = parts
        groups.setdefault(name, {})[role] = value
        formats[fmt] = formats.get(fmt, 0) + 1
    return groups, formats, unknown
