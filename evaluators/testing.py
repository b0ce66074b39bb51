"""Tiny models with random weights, written in the real file formats, for tests and demos.

Every scorer loads its *real* file format from these files (open_clip ``.safetensors``, the
LAION head's ``.pth`` with its real key names, an HPS-style ``{'state_dict': ...}`` ``.pt``, a
transformers CLIP folder for PickScore). Weights are random and seed-fixed: images are noise,
which is fine for plumbing and numbers, never for judging quality. (Tiny diffusion pipelines
come from the architecture files' tiny configs: ``merge_backend.pipeline.empty_pipeline(arch,
"tiny")``.)

Example:
    >>> files = write_tiny_scorer_files(tmp_path)            # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from evaluators._aesthetic_head import AestheticHead

TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Number of BPE merges the CLIP tokenizer uses (lines 1 … 48894 of open_clip's BPE file).
_CLIP_MERGES = 49152 - 256 - 2


@dataclass(frozen=True)
class TinyScorerFiles:
    """Paths of every tiny scorer model written by :func:`write_tiny_scorer_files`."""

    clip_config: Path  # open_clip model-config JSON (its stem is the model name)
    clip_weights: Path  # .safetensors
    aesthetic_clip_config: Path  # quick_gelu variant, like ViT-L-14-quickgelu
    aesthetic_clip_weights: Path
    aesthetic_head: Path  # .pth, keys layers.{0,2,4,6,7}.*
    hps_config: Path
    hps_checkpoint: Path  # .pt holding {'state_dict': ...}
    pickscore_dir: Path  # transformers CLIPModel folder with tokenizer + preprocessor config


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, built in memory from open_clip's wheel (ids match open_clip)."""
    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77,
                         pad_token=pad_token)


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write the real CLIP tokenizer files (vocab, merges, tokenizer config) to ``folder``."""
    tokenizer = clip_tokenizer(pad_token)
    tokenizer.save_pretrained(folder)
    return tokenizer


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab = dict(open_clip.tokenizer.SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _CLIP_MERGES + 1]
    return vocab, tuple(tuple(line.split()) for line in lines)


def write_tiny_open_clip(
    folder: Path, name: str = "tiny-clip", seed: int = 0, quick_gelu: bool = False
) -> tuple[Path, Path]:
    """Write a tiny open_clip model config JSON and random weights; return (config, weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config = dict(TINY_OPEN_CLIP_CONFIG, quick_gelu=quick_gelu)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights_path = folder / f"{name}.safetensors"
    save_file(_tiny_open_clip_state(config_path, seed), str(weights_path))
    return config_path, weights_path


def write_tiny_hps(folder: Path, name: str = "tiny-hps", seed: int = 2) -> tuple[Path, Path]:
    """Write a tiny open_clip config and an HPS-style ``{'state_dict': ...}`` ``.pt`` checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG, indent=2), encoding="utf-8")
    checkpoint_path = folder / f"{name}.pt"
    torch.save({"state_dict": _tiny_open_clip_state(config_path, seed)}, checkpoint_path)
    return config_path, checkpoint_path


def write_tiny_aesthetic_head(path: Path, in_features: int = 32, seed: int = 1) -> Path:
    """Write a LAION-style aesthetic head (real layer structure and key names) as ``.pth``."""
    torch.manual_seed(seed)
    head = AestheticHead(in_features)
    torch.save(head.state_dict(), path)
    return Path(path)


def write_tiny_pickscore(folder: Path, seed: int = 3) -> Path:
    """Write a tiny transformers CLIPModel folder (weights, tokenizer, preprocessor config)."""
    folder = Path(folder)
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "gelu",
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": "gelu"}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 64},
                                   crop_size={"height": 64, "width": 64})
    processor.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def write_tiny_scorer_files(folder: Path) -> TinyScorerFiles:
    """Write every tiny scorer model under ``folder`` (about a second on 2 CPU cores)."""
    folder = Path(folder)
    clip_config, clip_weights = write_tiny_open_clip(folder / "clip", "tiny-clip", seed=0)
    aes_config, aes_weights = write_tiny_open_clip(
        folder / "aesthetic", "tiny-clip-quickgelu", seed=4, quick_gelu=True
    )
    head = write_tiny_aesthetic_head(folder / "aesthetic" / "tiny-head.pth", in_features=32)
    hps_config, hps_checkpoint = write_tiny_hps(folder / "hps", "tiny-hps")
    pickscore = write_tiny_pickscore(folder / "pickscore")
    return TinyScorerFiles(clip_config, clip_weights, aes_config, aes_weights, head,
                           hps_config, hps_checkpoint, pickscore)


def _tiny_open_clip_state(config_path: Path, seed: int) -> dict[str, torch.Tensor]:
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(config_path.stem, pretrained=None)
    return {k: v.contiguous() for k, v in model.state_dict().items()}
