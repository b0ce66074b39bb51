"""diffusers config folders (no weights), written from the architecture files' ``configs``.

An architecture file holds each of its config folders (``full``: the public model's, ``tiny``:
the test family's) as a mapping from a file's path inside the folder to its JSON content. A
folder is written once under ``cache_dir()`` and reused; tokenizer vocabularies are not in the
files but written offline by the tokenizer's ``kind`` (``TOKENIZER_WRITERS``), so nothing is
ever downloaded.

Example:
    >>> folder = write_config_folder("sd1", size="tiny")                 # doctest: +SKIP
    >>> sorted(p.name for p in folder.iterdir())[:3]                      # doctest: +SKIP
    ['model_index.json', 'scheduler', 'text_encoder']
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from merge_backend.architectures import ARCHITECTURES
from merge_backend.atomic_files import atomic_write_text

CACHE_ENV = "MERGESEARCH_CACHE"
_N_MERGES = 49152 - 256 - 2  # CLIP's BPE: 48894 merges after the version line


def cache_dir() -> Path:
    """Where config folders go by default: $MERGESEARCH_CACHE, else ~/.cache/mergesearch."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergesearch"


def sizes(arch_name: str) -> tuple[str, ...]:
    """The config folders an architecture file holds ('full', 'tiny', …)."""
    return tuple(ARCHITECTURES[arch_name].configs)


def config_files(arch_name: str, size: str) -> dict[str, dict[str, Any]]:
    """Path inside the folder -> JSON content, for one config folder of one architecture."""
    arch = ARCHITECTURES[arch_name]
    if size not in arch.configs:
        known = ", ".join(f"{a.name}/{s}" for a in ARCHITECTURES.values() for s in a.configs)
        raise ValueError(f"no config folder for arch {arch_name!r} size {size!r}; known: {known}")
    return arch.configs[size]


# ---------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _clip_bpe_files() -> tuple[str, str]:
    """vocab.json and merges.txt text of the real CLIP BPE, from open_clip's bundled copy."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renames.get(token, token): i for token, i in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = "#version: 0.2\n" + "\n".join(lines[1:_N_MERGES + 1]) + "\n"
    return json.dumps(vocab, ensure_ascii=False), merges


def _write_clip_bpe(folder: Path, config: dict[str, Any]) -> None:
    """CLIP's BPE (SD1/SD2/SDXL tokenizers; ids equal open_clip's)."""
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    _write_if_changed(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    vocab, merges = _clip_bpe_files()
    _write_if_changed(folder / "vocab.json", vocab)
    _write_if_changed(folder / "merges.txt", merges)


@lru_cache(maxsize=1)
def _t5_standin_json() -> str:
    """tokenizer.json of a stand-in for T5's SentencePiece vocabulary, built here: a Unigram
    model over single characters (word-initial '▁x' preferred), T5's special ids (<pad> 0,
    </s> 1, <unk> 2) and its '$A </s>' template. 192 pieces: any text tokenizes, offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + c, -1.0) for c in chars]
             + [(c, -2.0) for c in chars] + [("▁", -3.0)])
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return tok.to_str()


def _write_t5_standin(folder: Path, config: dict[str, Any]) -> None:
    """A T5 tokenizer that needs no download (see ``_t5_standin_json``). T5's real 32k
    SentencePiece vocabulary is not shipped by any package here: a full-size model needs a
    config folder with its own tokenizer (``config_folder``)."""
    special = {k: config[k] for k in ("eos_token", "unk_token", "pad_token")}
    _write_if_changed(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    _write_if_changed(folder / "tokenizer.json", _t5_standin_json())


# tokenizers.<folder>.kind -> writer(folder, tokenizer_config) of the vocabulary files
TOKENIZER_WRITERS: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "clip_bpe": _write_clip_bpe,
    "t5_standin": _write_t5_standin,
}


# ---------------------------------------------------------------------------- folders


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)  # a concurrent reader never sees half a file


def write_config_folder(arch_name: str, folder: Path | None = None, size: str = "full") -> Path:
    """Write the diffusers config folder of ``arch_name`` (no weights) and return its path.

    ``size`` is one of the file's ``configs`` ("full", "tiny"). Without ``folder`` it goes
    under ``cache_dir()``. Idempotent: files already right are not rewritten.
    """
    files = config_files(arch_name, size)
    folder = Path(folder) if folder is not None else cache_dir() / "configs" / f"{arch_name}-{size}"
    for name, content in files.items():
        _write_if_changed(folder / name, json.dumps(content, indent=2, sort_keys=True) + "\n")
    arch = ARCHITECTURES[arch_name]
    for sub, tokenizer in arch.tokenizers.items():
        if tokenizer.kind not in TOKENIZER_WRITERS:
            raise ValueError(f"{arch.source}: tokenizers.{sub}.kind: unknown {tokenizer.kind!r}; "
                             f"known: {', '.join(TOKENIZER_WRITERS)}")
        TOKENIZER_WRITERS[tokenizer.kind](folder / sub, files.get(f"{sub}/tokenizer_config.json", {}))
    return folder


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
