"""Name rules shared by the converters, and the DiT converters' rules (SD3's MMDiT, Flux.1,
T5): diffusers path -> original path, built from the diffusers keys (see ``naming``)."""

from __future__ import annotations

import re
from collections.abc import Iterable

# A rule: diffusers prefix (ending in '.') or whole key -> (original prefix or key, transform,
# index, parts[, sizes]). Tables hold names relative to the component prefix.
Rule = tuple
Table = dict[str, Rule]


def same(original: str) -> Rule:
    """A rule that renames only."""
    return (original, "id", 0, 1)


def index_count(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest N among keys 'prefix<N>.…' (0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0



# Rules of one transformer block of SD3's MMDiT and Flux's double / single blocks, diffusers
# path -> original path (whole keys where the last name differs). A qkv entry is split in three.
_QKV = ("to_q.", "to_k.", "to_v.")
_ADD_QKV = ("add_q_proj.", "add_k_proj.", "add_v_proj.")
_MMDIT_BLOCK = (("attn.to_out.0.", "x_block.attn.proj."),
                ("attn.to_add_out.", "context_block.attn.proj."),
                ("attn.norm_q.", "x_block.attn.ln_q."), ("attn.norm_k.", "x_block.attn.ln_k."),
                ("attn.norm_added_q.", "context_block.attn.ln_q."),
                ("attn.norm_added_k.", "context_block.attn.ln_k."),
                ("attn2.to_out.0.", "x_block.attn2.proj."),
                ("attn2.norm_q.", "x_block.attn2.ln_q."), ("attn2.norm_k.", "x_block.attn2.ln_k."),
                ("norm1.linear.", "x_block.adaLN_modulation.1."),
                ("ff.net.0.proj.", "x_block.mlp.fc1."), ("ff.net.2.", "x_block.mlp.fc2."),
                ("ff_context.net.0.proj.", "context_block.mlp.fc1."),
                ("ff_context.net.2.", "context_block.mlp.fc2."))
_MMDIT_FIXED = (("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj.", "x_embedder.proj."),
                ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
                ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
                ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
                ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
                ("context_embedder.", "context_embedder."), ("proj_out.", "final_layer.linear."))
_FLUX_FIXED = (("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
               ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
               ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
               ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
               ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
               ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
               ("context_embedder.", "txt_in."), ("x_embedder.", "img_in."),
               ("proj_out.", "final_layer.linear."))
_FLUX_DOUBLE = (("norm1.linear.", "img_mod.lin."), ("norm1_context.linear.", "txt_mod.lin."),
                ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
                ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
                ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
                ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
                ("ff.net.0.proj.", "img_mlp.0."), ("ff.net.2.", "img_mlp.2."),
                ("ff_context.net.0.proj.", "txt_mlp.0."), ("ff_context.net.2.", "txt_mlp.2."),
                ("attn.to_out.0.", "img_attn.proj."), ("attn.to_add_out.", "txt_attn.proj."))
_FLUX_SINGLE = (("norm.linear.", "modulation.lin."),
                ("attn.norm_q.weight", "norm.query_norm.scale"),
                ("attn.norm_k.weight", "norm.key_norm.scale"), ("proj_out.", "linear2."))
# Flux's single blocks fuse q, k, v and the MLP input (mlp_ratio 4, fixed in diffusers' and
# BFL's FluxSingleTransformerBlock) into one linear1.
_FLUX_LINEAR1 = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")
_FLUX_LINEAR1_SIZES = (1, 1, 1, 4)
_SWAPPED = "final_layer.adaLN_modulation.1."  # (shift, scale) in the original, swapped in diffusers


def _add_qkv(table: Table, diffusers: str, names: tuple[str, ...], original: str) -> None:
    for index, name in enumerate(names):
        table[diffusers + name] = (original, "chunk", index, len(names))


def mmdit_table(keys: list[str]) -> Table:
    """SD3 / SD3.5's MMDiT (MMDiT-X's second self-attention ``attn2`` included)."""
    table: Table = {d: same(o) for d, o in _MMDIT_FIXED}
    table["norm_out.linear."] = (_SWAPPED, "swap", 0, 1)
    layers = index_count(keys, "transformer_blocks.")
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        table.update({d + dd: same(o + oo) for dd, oo in _MMDIT_BLOCK})
        _add_qkv(table, d + "attn.", _QKV, o + "x_block.attn.qkv.")
        _add_qkv(table, d + "attn.", _ADD_QKV, o + "context_block.attn.qkv.")
        _add_qkv(table, d + "attn2.", _QKV, o + "x_block.attn2.qkv.")
        # the last block's context stream only modulates (pre-only): an AdaLayerNormContinuous
        last = i == layers - 1
        table[d + "norm1_context.linear."] = (o + "context_block.adaLN_modulation.1.",
                                              "swap" if last else "id", 0, 1)
    return table


def flux_table(keys: list[str]) -> Table:
    """Flux.1's transformer in Black Forest Labs' layout (dev and schnell)."""
    table: Table = {d: same(o) for d, o in _FLUX_FIXED}
    table["norm_out.linear."] = (_SWAPPED, "swap", 0, 1)
    for i in range(index_count(keys, "transformer_blocks.")):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table.update({d + dd: same(o + oo) for dd, oo in _FLUX_DOUBLE})
        _add_qkv(table, d + "attn.", _QKV, o + "img_attn.qkv.")
        _add_qkv(table, d + "attn.", _ADD_QKV, o + "txt_attn.qkv.")
    for i in range(index_count(keys, "single_transformer_blocks.")):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        table.update({d + dd: same(o + oo) for dd, oo in _FLUX_SINGLE})
        for index, name in enumerate(_FLUX_LINEAR1):
            table[d + name] = (o + "linear1.", "chunk", index, len(_FLUX_LINEAR1),
                               _FLUX_LINEAR1_SIZES)
    return table


def t5_table(keys: list[str]) -> Table:
    """T5's encoder as transformers and ComfyUI store it; ``encoder.embed_tokens`` is
    transformers' tied copy of ``shared``."""
    return {"shared.": same("shared."), "encoder.embed_tokens.weight": ("shared.weight", "tied", 0, 1),
            "encoder.": same("encoder.")}
