"""Diffusers config folders as data: the public config values of SD1.5, SD2.1-v and SDXL base,
and of the tiny SD1 / SDXL families (same topology, a few hundred times smaller).

``CONFIG_FOLDERS[(arch_name, size)]`` maps a file's path inside the folder to its JSON content.
Tokenizer vocabularies are not data: ``pipeline.write_config_folder`` writes them from
open_clip's bundled CLIP BPE. Values are those of the public diffusers repositories
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0); the safety checker and feature extractor are left
out (``[null, null]``) so nothing needs to be downloaded.
"""

from __future__ import annotations

from typing import Any

SIZES = ("full", "tiny")

_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
PNDM = {"_class_name": "PNDMScheduler", **_BETAS}
DDIM_V = {"_class_name": "DDIMScheduler", **_BETAS, "prediction_type": "v_prediction"}
EULER = {
    "_class_name": "EulerDiscreteScheduler",
    **_BETAS,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

_SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_CLIP = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "torch_dtype": "float32",
}
CLIP_L = {
    **_CLIP,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
# SD2's OpenCLIP-H: the file has 24 layers; SD2 uses the penultimate layer, so diffusers keeps 23.
OPEN_CLIP_H = {
    **_CLIP,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
OPEN_CLIP_BIG_G = {
    **_CLIP,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

_TOKENIZER = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# SD2's and SDXL's OpenCLIP tokenizers pad with "!" (OpenCLIP pads with id 0).
_TOKENIZER_BANG = {**_TOKENIZER, "pad_token": "!"}

_SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD1_FULL = {
    "model_index.json": _SD_INDEX,
    "scheduler/scheduler_config.json": PNDM,
    "unet/config.json": _SD_UNET,
    "vae/config.json": _SD_VAE,
    "text_encoder/config.json": CLIP_L,
    "tokenizer/tokenizer_config.json": _TOKENIZER,
}

SD2_FULL = {
    "model_index.json": {**_SD_INDEX, "scheduler": ["diffusers", "DDIMScheduler"]},
    "scheduler/scheduler_config.json": DDIM_V,
    "unet/config.json": {
        **_SD_UNET,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "upcast_attention": True,
        "use_linear_projection": True,
        "sample_size": 96,
    },
    "vae/config.json": {**_SD_VAE, "sample_size": 768},
    "text_encoder/config.json": OPEN_CLIP_H,
    "tokenizer/tokenizer_config.json": _TOKENIZER_BANG,
}

SDXL_FULL = {
    "model_index.json": _SDXL_INDEX,
    "scheduler/scheduler_config.json": EULER,
    "unet/config.json": {
        **_SD_UNET,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
    },
    "vae/config.json": {
        **_SD_VAE,
        "force_upcast": True,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
    },
    "text_encoder/config.json": CLIP_L,
    "text_encoder_2/config.json": OPEN_CLIP_BIG_G,
    "tokenizer/tokenizer_config.json": _TOKENIZER,
    "tokenizer_2/tokenizer_config.json": _TOKENIZER_BANG,
}

# ---------------------------------------------------------------------------- tiny (OFFLINE.md)

_TINY_VAE = {
    **_SD_VAE,
    "block_out_channels": [16, 16, 32, 32],
    "norm_num_groups": 8,
    "sample_size": 64,
}
_TINY_CLIP = {
    **_CLIP,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SD1_TINY = {
    **SD1_FULL,
    "scheduler/scheduler_config.json": EULER,
    "model_index.json": {**_SD_INDEX, "scheduler": ["diffusers", "EulerDiscreteScheduler"]},
    "unet/config.json": {
        **_SD_UNET,
        "block_out_channels": [32, 32, 64, 64],
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "sample_size": 8,
    },
    "vae/config.json": _TINY_VAE,
    "text_encoder/config.json": _TINY_CLIP,
}

SDXL_TINY = {
    **SDXL_FULL,
    # cross_attention_dim = te1 width + te2 width; the add-embedding input = te2 projection + 6 * 8
    "unet/config.json": {
        **SDXL_FULL["unet/config.json"],
        "block_out_channels": [32, 64, 64],
        "norm_num_groups": 8,
        "transformer_layers_per_block": [1, 2, 2],
        "attention_head_dim": [2, 4, 4],
        "addition_time_embed_dim": 8,
        "addition_embed_type_num_heads": 64,
        "cross_attention_dim": 96,
        "projection_class_embeddings_input_dim": 64 + 6 * 8,
        "sample_size": 8,
    },
    "vae/config.json": {**_TINY_VAE, "force_upcast": True, "scaling_factor": 0.13025},
    "text_encoder/config.json": _TINY_CLIP,
    # te2 must be wider than te1 (diffusers picks the converter by width) and have >= 10 layers
    # (SDXL is recognised by '...model.transformer.resblocks.9.' keys).
    "text_encoder_2/config.json": {
        **_TINY_CLIP,
        "architectures": ["CLIPTextModelWithProjection"],
        "hidden_act": "gelu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 10,
        "projection_dim": 64,
    },
}

CONFIG_FOLDERS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("sd1", "full"): SD1_FULL,
    ("sd2", "full"): SD2_FULL,
    ("sdxl", "full"): SDXL_FULL,
    ("sd1", "tiny"): SD1_TINY,
    ("sdxl", "tiny"): SDXL_TINY,
}

# Which tokenizer folders get vocab.json / merges.txt written beside their tokenizer_config.json.
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
