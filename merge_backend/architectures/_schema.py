"""The typed form of an architecture file (see README.md in this folder for the fields).

Every file is parsed into an ``Architecture``; anything wrong is reported with the file and the
field path before any checkpoint is touched. The objects are frozen: derived tables (slider ->
block maps, per-key block caches) are computed once per process.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

ROLES = ("diffusion", "text_encoder", "vae")
SINGLE = "single"  # ModelMergeSimple's one ratio: every architecture has it
SLIDERS = "comfy"  # the vocabulary every other one groups: ComfyUI's model-specific node


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def expand(items: Any) -> Any:
    """Expand ``{repeat: N | [start, stop], ...}`` list items: every string in the item is
    formatted with ``i`` for each index (``"IN{i:02d}"``); an item whose only other field is
    ``name`` becomes that string."""
    if not isinstance(items, list):
        return items
    out: list[Any] = []
    for item in items:
        if not (isinstance(item, dict) and "repeat" in item):
            out.append(item)
            continue
        span = item["repeat"]
        indices = range(span) if isinstance(span, int) else range(*span)
        body = {k: v for k, v in item.items() if k != "repeat"}
        for i in indices:
            done = _format(body, i)
            out.append(done["name"] if set(done) == {"name"} else done)
    return out


def _format(value: Any, i: int) -> Any:
    if isinstance(value, str):
        return value.format(i=i)
    if isinstance(value, list):
        return [_format(v, i) for v in value]
    if isinstance(value, dict):
        return {k: _format(v, i) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- parts


class LoraName(_Data):
    """How one LoRA format names a component's modules: ``prefix`` + a path. ``paths``:
    ``diffusers`` (the diffusers / transformers module path) or ``original`` (the single-file
    path after the component prefix). kohya writes the path with '.' as '_'."""

    prefix: str
    paths: Literal["diffusers", "original"] = "diffusers"


class ComfyOnly(_Data):
    """Modules (diffusers paths) of a weight only ComfyUI's own model holds: LoraSave writes
    them, no checkpoint stores them; they are read, left out, and reported with ``why``."""

    modules: tuple[str, ...]
    why: str


class ComponentLora(_Data):
    kohya: LoraName | None = None
    comfyui: LoraName | None = None
    peft: LoraName | None = None
    bare: bool = False  # also read names that are the bare diffusers path (old diffusers LoRAs)
    kohya_also: tuple[str, ...] = ()  # more kohya-style prefixes read (not written)
    comfyui_only: ComfyOnly | None = None

    def format(self, fmt: str) -> LoraName | None:
        return getattr(self, fmt, None)


class FileModule(_Data):
    """How the module a file stores differs from the one diffusers loads (SD2's text encoder)."""

    class_: str | None = Field(None, alias="class")  # a transformers / diffusers class name
    extra_layers: int = 0


class Component(_Data):
    """One weighted part of a checkpoint (UNet / transformer, a text encoder, the VAE)."""

    name: str
    prefix: str
    role: Literal["diffusion", "text_encoder", "vae"]
    folder: str  # the diffusers pipeline attribute and sub-folder
    # merge_backend.naming: how original names map to diffusers' names (None: no map yet, so
    # merges and detection only: no pipeline, engine or LoRA)
    converter: str | None = None
    comfy_clip: str | None = None  # ComfyUI's name for a text encoder: clip_l, clip_g, t5xxl…
    lora: ComponentLora = ComponentLora()
    file_module: FileModule | None = None
    # weights (diffusers names) the original model holds as identity matrices: ComfyUI's CLIP-L
    # text_projection, which diffusers' SD3 loader also sets to the identity
    identity: tuple[str, ...] = ()


class Rename(_Data):
    """Another spelling of a key: a key starting with ``old`` (and not ``new``, when they
    differ) and ending with ``old_end`` is read as ``new`` + the middle + ``new_end``."""

    old: str
    new: str
    old_end: str = ""
    new_end: str = ""

    def apply(self, key: str) -> str | None:
        """The key renamed, or None when this rule does not apply to it."""
        if not key.startswith(self.old) or not key.endswith(self.old_end):
            return None
        if self.old != self.new and key.startswith(self.new):
            return None
        middle = key[len(self.old):len(key) - len(self.old_end)]
        return self.new + middle + self.new_end

    def unapply(self, key: str) -> str | None:
        """The key as this spelling writes it (the inverse of ``apply``), or None."""
        if not key.startswith(self.new) or not key.endswith(self.new_end):
            return None
        return self.old + key[len(self.new):len(key) - len(self.new_end)] + self.old_end


class ExtraTensor(_Data):
    """A tensor that is not a weight, as real files carry it. ``fill``: ``arange`` or a
    number; ``dtype``: int64, or float (float32 in written families, the output's in merges).
    ``checkpoint_save``: what ComfyUI's CheckpointSave does with it: keep (copied when model1
    has it), drop, always (written with ``fill``, whatever model1 holds), if_absent."""

    key: str
    fill: Literal["arange"] | float
    dtype: Literal["int64", "float"] = "float"
    shape: tuple[int, ...] = ()
    checkpoint_save: Literal["keep", "drop", "always", "if_absent"] = "keep"


class Detect(_Data):
    prefixes: tuple[str, ...]  # each starts some key
    absent: tuple[str, ...] = ()  # none starts any key
    keys: tuple[str, ...] = ()  # exact keys present
    priority: int = 0  # when two architectures match, the higher wins (equal: an error)

    def matches(self, keys: list[str], keyset: set[str]) -> bool:
        if not all(any(k.startswith(p) for k in keys) for p in self.prefixes):
            return False
        if self.absent and any(k.startswith(self.absent) for k in keys):
            return False
        return all(k in keyset for k in self.keys)


class ComfyLoader(_Data):
    """A ComfyUI loader node: its class, the input that takes the file name (None: the
    ``widgets`` name the files), and its other widget values."""

    node: str
    file_input: str | None = None
    widgets: dict[str, Any] = {}


class ComfyLoaders(_Data):
    """How ComfyUI loads a file of a layout: the model's loader, and the text encoders' and the
    VAE's (separate files, named in their widgets) when the layout holds none."""

    model: ComfyLoader
    clip: ComfyLoader | None = None
    vae: ComfyLoader | None = None


class Layout(_Data):
    """Another way files of this architecture are stored (Black Forest Labs' bare transformer
    file for Flux): recognised by ``detect``, its keys read as ``renames`` say (after which the
    architecture's own renames apply). Such a file holds only the components it names."""

    name: str
    detect: Detect
    renames: tuple[Rename, ...]
    components: tuple[str, ...]
    title: str = ""
    comfyui: ComfyLoaders | None = None  # None: CheckpointLoaderSimple


class Group(_Data):
    """One block of a grouped vocabulary: the ComfyUI sliders it covers. Converting sliders
    that differ into this block keeps the first slider's value (``lossy: first``) or their
    mean (``lossy: mean``)."""

    block: str
    sliders: tuple[str, ...]
    lossy: Literal["first", "mean"] = "first"

    @field_validator("sliders", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return expand(value)


class Vocabulary(_Data):
    """Block names users merge by. ``names``: a key belongs to the longest name that starts it
    (after the diffusion prefix), else to the first name — ComfyUI's rule for ModelMergeBlocks
    and its model-specific nodes. ``groups``: blocks made of the ``comfy`` sliders (SuperMerger's
    MBW). ``text_encoders``: a block holding no diffusion key, the text encoders' ratio."""

    name: str = ""
    node: str | None = None
    names: tuple[str, ...] = ()
    groups: tuple[Group, ...] = ()
    text_encoders: str | None = None
    unused: tuple[str, ...] = ()  # sliders no key of this architecture starts with

    @field_validator("names", "groups", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return expand(value)

    @model_validator(mode="after")
    def _one_rule(self) -> Vocabulary:
        if bool(self.names) == bool(self.groups):
            raise ValueError("give either names (a prefix rule) or groups (of the comfy sliders)")
        return self

    @property
    def block_names(self) -> tuple[str, ...]:
        head = (self.text_encoders,) if self.text_encoders else ()
        return head + (self.names or tuple(g.block for g in self.groups))

    def prefix_block(self, inner_key: str) -> str:
        """ComfyUI's rule: the longest name that starts the key; none: the first name."""
        best, best_len = self.names[0], 0
        for name in self.names:
            if len(name) > best_len and inner_key.startswith(name):
                best, best_len = name, len(name)
        return best


class PredictRule(_Data):
    key: str
    value: str
    std_above: float | None = None  # the key's population std must exceed this


class PredictKey(_Data):
    """``modelspec.predict_key`` of a file without one: the first rule that holds, else
    ``default`` (None: not written, as for flow-matching models)."""

    default: str | None = "epsilon"
    rules: tuple[PredictRule, ...] = ()


class CheckpointSave(_Data):
    """What ComfyUI's CheckpointSave writes besides the weights (None: that key is not written).
    ``latent_node``: the empty-latent node ComfyUI's own workflows use for this family."""

    latent_node: str = "EmptyLatentImage"

    modelspec_architecture: str | dict[str, str] | None = None  # one, or one per predict_key
    modelspec_implementation: str | None = None
    predict_key: PredictKey = PredictKey()

    def architecture_for(self, predict_key: str | None) -> str | None:
        spec = self.modelspec_architecture
        if spec is None or isinstance(spec, str):
            return spec
        return spec.get(predict_key, next(iter(spec.values())))


class LoraFacts(_Data):
    hints: tuple[str, ...] = ()  # metadata values naming this architecture (prefix match)
    kohya_base_model: str | None = None  # ss_base_model_version written in kohya files


class Tokenizer(_Data):
    kind: str  # how its vocabulary files are written offline (pipeline.TOKENIZER_WRITERS)


class Tiny(_Data):
    finetunes: dict[str, tuple[str, ...]]  # fine-tune -> diffusion key prefixes it changes


# ---------------------------------------------------------------------------- the whole


class Architecture(_Data):
    """The facts of one model family, read from one data file (see README.md beside it).

    Example:
        >>> from merge_backend.architectures import ARCHITECTURES
        >>> arch = ARCHITECTURES["sd1"]
        >>> arch.diffusion.prefix, [te.name for te in arch.text_encoders]
        ('model.diffusion_model.', ['te'])
        >>> arch.block_of("mbw", "model.diffusion_model.out.2.weight")
        'OUT11'
    """

    name: str
    title: str
    source: str = ""  # the file it was read from
    native_size: int
    detect: Detect
    components: dict[str, Component]
    renames: tuple[Rename, ...] = ()
    layouts: tuple[Layout, ...] = ()
    not_weights: tuple[str, ...] = ()
    extra_tensors: tuple[ExtraTensor, ...] = ()
    vocabularies: dict[str, Vocabulary]
    report_vocabulary: str = SLIDERS
    checkpoint_save: CheckpointSave
    lora: LoraFacts = LoraFacts()
    diffusers_folder: dict[str, dict[str, Any]] = {}
    tokenizers: dict[str, Tokenizer] = {}
    tiny: Tiny | None = None
    # how a single file becomes a pipeline: diffusers' from_single_file, or this project's own
    # converters into the config folder's modules (where diffusers cannot convert the file)
    pipeline_loader: Literal["from_single_file", "converters"] = "from_single_file"
    configs: dict[str, dict[str, dict[str, Any]]]

    _blocks: dict[str, dict[str, str]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_parts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for field in ("components", "vocabularies"):
                parts = data.get(field)
                if isinstance(parts, dict):
                    data[field] = {k: {"name": k, **v} if isinstance(v, dict) else v
                                   for k, v in parts.items()}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Architecture:
        roles = [c.role for c in self.components.values()]
        if roles.count("diffusion") != 1:
            raise ValueError("components: exactly one needs role: diffusion")
        if SLIDERS not in self.vocabularies or not self.vocabularies[SLIDERS].names:
            raise ValueError(f"vocabularies.{SLIDERS}: required, with names (the finest blocks)")
        if SINGLE in self.vocabularies:
            raise ValueError(f"vocabularies.{SINGLE}: built in (ModelMergeSimple); remove it")
        sliders = self.vocabularies[SLIDERS].names
        for vocab in self.vocabularies.values():
            covered = [s for g in vocab.groups for s in g.sliders]
            if vocab.groups and sorted(covered) != sorted(sliders):
                odd = sorted(set(covered) ^ set(sliders)) or sorted(
                    {s for s in covered if covered.count(s) > 1})
                raise ValueError(f"vocabularies.{vocab.name}.groups: must cover every "
                                 f"{SLIDERS} slider exactly once; check {', '.join(odd)}")
        if self.report_vocabulary not in self.vocabularies:
            raise ValueError(f"report_vocabulary: {self.report_vocabulary!r} is not a vocabulary")
        if "full" not in self.configs:
            raise ValueError("configs: needs a 'full' config folder")
        for size, files in self.configs.items():
            for c in self.components.values():
                if f"{c.folder}/config.json" not in files:
                    raise ValueError(f"configs.{size}: no {c.folder}/config.json")
            if "model_index.json" not in files:
                raise ValueError(f"configs.{size}: no model_index.json")
        return self

    def __hash__(self) -> int:  # architectures are looked up by name; configs are not hashable
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Architecture) and (other is self or (
            other.name == self.name and other.source == self.source))

    # ------------------------------------------------------------------ components
    @cached_property
    def diffusion(self) -> Component:
        """The model ComfyUI's model merges touch (a UNet or a transformer)."""
        return next(c for c in self.components.values() if c.role == "diffusion")

    @cached_property
    def text_encoders(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components.values() if c.role == "text_encoder")

    @cached_property
    def prefixes(self) -> dict[str, str]:
        """Component name -> key prefix."""
        return {c.name: c.prefix for c in self.components.values()}

    @cached_property
    def pipeline_class(self) -> str:
        return self.configs["full"]["model_index.json"]["_class_name"]

    def component_class(self, component: str) -> tuple[str, str]:
        """(library, class) of a component's module, from the full config's model_index.json."""
        library, name = self.configs["full"]["model_index.json"][self.components[component].folder]
        return library, name

    # ------------------------------------------------------------------ vocabularies
    @cached_property
    def vocabulary_names(self) -> tuple[str, ...]:
        return (SINGLE, *self.vocabularies)

    def vocabulary(self, name: str) -> Vocabulary:
        if name == SINGLE:
            return Vocabulary(name=SINGLE, node="ModelMergeSimple", names=("all",))
        if name not in self.vocabularies:
            raise ValueError(f"unknown vocabulary {name!r} for {self.name}; choose one of "
                             f"{', '.join(self.vocabulary_names)}")
        return self.vocabularies[name]

    def block_names(self, vocabulary: str) -> tuple[str, ...]:
        return self.vocabulary(vocabulary).block_names

    def slider_block(self, vocabulary: str, slider: str) -> str:
        """The block of ``vocabulary`` that holds the keys of ComfyUI slider ``slider``."""
        return self._slider_blocks(vocabulary)[slider]

    def _slider_blocks(self, vocabulary: str) -> dict[str, str]:
        cache = self._blocks.setdefault(f"sliders:{vocabulary}", {})
        if not cache:
            vocab = self.vocabulary(vocabulary)
            for slider in self.vocabularies[SLIDERS].names:
                if vocabulary == SINGLE:
                    cache[slider] = "all"
                elif vocab.groups:
                    cache[slider] = next(g.block for g in vocab.groups if slider in g.sliders)
                else:
                    cache[slider] = vocab.prefix_block(slider)
        return cache

    def block_of(self, vocabulary: str, key: str) -> str:
        """The block of ``vocabulary`` that owns a diffusion key (a full key, with its prefix)."""
        cache = self._blocks.setdefault(vocabulary, {})
        block = cache.get(key)
        if block is None:
            prefix = self.diffusion.prefix
            if not key.startswith(prefix):
                raise ValueError(f"{key!r} is not a {self.diffusion.name} key "
                                 f"(expected prefix {prefix!r})")
            vocab = self.vocabulary(vocabulary)
            if vocabulary == SINGLE:
                block = "all"
            elif vocab.groups:
                sliders = self.vocabularies[SLIDERS]
                block = self.slider_block(vocabulary, sliders.prefix_block(key[len(prefix):]))
            else:
                block = vocab.prefix_block(key[len(prefix):])
            cache[key] = block
        return block

    def sliders_of(self, vocabulary: str, block: str) -> tuple[str, ...]:
        """The ComfyUI sliders whose keys ``block`` holds, in slider order."""
        return tuple(s for s, b in self._slider_blocks(vocabulary).items() if b == block)

    # ------------------------------------------------------------------ keys
    def canonical_key(self, key: str, layout: Layout | None = None) -> str:
        """The key as CheckpointSave writes it (another layout's and older spellings renamed)."""
        for rename in (*(layout.renames if layout else ()), *self.renames):
            renamed = rename.apply(key)
            if renamed is not None:
                key = renamed
        return key

    def layout(self, name: str) -> Layout:
        return next(lay for lay in self.layouts if lay.name == name)

    def component_of(self, key: str) -> str | None:
        """The component a key belongs to (the longest matching prefix), or None."""
        best, best_len = None, -1
        for c in self.components.values():
            if key.startswith(c.prefix) and len(c.prefix) > best_len:
                best, best_len = c.name, len(c.prefix)
        return best

    def is_model_key(self, key: str) -> bool:
        """True for weights CheckpointSave keeps (not schedules, EMA copies or loss weights)."""
        return not key.startswith(self.not_weights) if self.not_weights else True
