"""The contract every merge method passes, built in or a plug-in: a pytest class to subclass.

In a test module of yours::

    from merge_backend.methods.contract import MergeMethodContract

    class TestClampedDifference(MergeMethodContract):
        method = "clamped_difference"

        def formula(self, tensors, ratio, multiplier):
            # written out here, independently of the method's own code
            a, b = (t.float() for t in tensors)
            return a + (1 - ratio) * (b - a).clamp(-multiplier, multiplier)

pytest then runs every ``test_*`` below against it:
- the method is registered, listed and well formed;
- its exact arithmetic equals ``formula`` to the bit (float32 and fp16 sources, several ratios
  and multipliers) and is elementwise: whole tensors, slices and the engine's chunked kernel
  agree to the bit; its fast kernel, if it has one, agrees to float32 rounding;
- a Recipe using it validates its roles and survives a JSON round trip;
- merging tiny SD1 checkpoints to a file gives ``formula`` on every UNet tensor, block by
  block (held in float32 and in fp16), and on the text encoders when the method is also a
  CLIPMerge node;
- the in-memory engine equals the file merge, for both arithmetics;
- the ComfyUI export rebuilds the file by ComfyUI's own formulas (``comfyui_reference``) or is
  refused with the method's reason; the SuperMerger string round-trips or is refused; the
  report shows the formula.

The tiny family is written once per class (about 15 s on 2 shared cores); override the
``family`` fixture to reuse one you already have.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_backend.architectures import ARCHITECTURES, block_names
from merge_backend.dtypes import held
from merge_backend.methods import METHODS, MergeMethod
from merge_backend.methods.comfyui_reference import CLIP_SKIPS, evaluate_workflow, strengths
from merge_backend.recipe import ClipMerge, Recipe, RecipeError, Source
from merge_backend.tiny import TinyFamily, write_tiny_family


class MergeMethodContract:
    """Subclass with ``method`` (the registered name) and ``formula`` (see the module)."""

    method: str = ""
    arch: str = "sd1"
    ratios: Sequence[float] = (0.0, 0.3, 1.0)
    multipliers: Sequence[float] = (0.7, 1.0, -0.5)

    def formula(self, tensors: Sequence[torch.Tensor], ratio: float, multiplier: float
                ) -> torch.Tensor:
        """The method's result in float32, from tensors in its roles' order, written out."""
        raise NotImplementedError(f"{type(self).__name__}: write the method's formula out")

    # ------------------------------------------------------------------ fixtures and helpers
    @pytest.fixture(scope="class")
    @classmethod
    def family(cls, tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
        return write_tiny_family(tmp_path_factory.mktemp(f"tiny_{cls.arch}"), cls.arch, seed=0)

    @property
    def merge_method(self) -> MergeMethod:
        return METHODS[self.method]

    def _files(self, family: TinyFamily) -> dict[str, str]:
        """A tiny file per role: model1 = finetune A, model2 = finetune B, base = the base;
        further roles take B and the base in turn."""
        spare = [family.b, family.base]
        named = {"model1": family.a, "model2": family.b, "base": family.base}
        return {role: str(named.get(role) or spare[i % 2])
                for i, role in enumerate(self.merge_method.roles)}

    def _recipe(self, family: TinyFamily, *, arithmetic: str = "comfy", vocabulary: str = "comfy",
                seed: int = 0, **changes) -> Recipe:
        method = self.merge_method
        ratios = {}
        if method.uses_ratio:
            g = torch.Generator().manual_seed(seed)
            names = block_names(ARCHITECTURES[self.arch], vocabulary)
            ratios = {n: round(float(v), 3) for n, v in zip(names, torch.rand(len(names),
                                                                                generator=g))}
        clip = None
        if method.clip_node is not None and vocabulary != "mbw":
            clip = ClipMerge(self.method, ratio=0.4, multiplier=0.6)
        recipe = Recipe(arch=self.arch, method=self.method, vocabulary=vocabulary,
                        models={r: Source(p) for r, p in self._files(family).items()},
                        ratios=ratios, multiplier=0.7 if method.uses_multiplier else 1.0,
                        clip=clip, arithmetic=arithmetic)
        return recipe.replace(**changes)

    def _tensors(self, dtype: torch.dtype = torch.float32, shape=(257, 3), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=g).to(dtype) for _ in self.merge_method.roles]

    def _cases(self):
        method = self.merge_method
        for ratio in self.ratios if method.uses_ratio else (1.0,):
            for multiplier in self.multipliers if method.uses_multiplier else (1.0,):
                yield ratio, multiplier

    # ------------------------------------------------------------------ the method itself
    def test_is_registered_and_listed(self):
        method = self.merge_method
        assert isinstance(method, MergeMethod) and method.name == self.method
        assert self.method in METHODS and self.method in list(METHODS)
        assert method.formula and method.roles[0] == "model1"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_exact_arithmetic_is_the_formula(self, dtype):
        tensors = self._tensors(dtype)
        for ratio, multiplier in self._cases():
            got = self.merge_method.merge(tensors, ratio, multiplier)
            expected = self.formula(tensors, ratio, multiplier)
            assert got.dtype == torch.float32, f"exact arithmetic gives {got.dtype}"
            assert torch.equal(got, expected), (ratio, multiplier)

    def test_exact_arithmetic_is_elementwise_and_chunks_agree(self):
        from merge_backend import engine_kernels as kernels

        method = self.merge_method
        tensors = [t.reshape(-1) for t in self._tensors(shape=(1000,), seed=1)]
        runner = kernels.Runner(torch.device("cpu"), torch.float32, 96)
        runner.allocate(0, kernels.scratch_needed(method))
        for ratio, multiplier in self._cases():
            whole = method.merge(tensors, ratio, multiplier)
            pieces = torch.cat([method.merge([t[s:s + 333] for t in tensors], ratio, multiplier)
                                for s in range(0, 1000, 333)])
            assert torch.equal(whole, pieces), "the result depends on the neighbours"
            chunked = torch.empty(1000)
            kernels.exact(runner, method, chunked, dict(zip(method.roles, tensors)), ratio,
                          multiplier)
            assert torch.equal(whole, chunked), "the engine's chunked kernel differs"

    def test_fast_kernel_agrees_to_float32_rounding(self):
        method = self.merge_method
        tensors = self._tensors()
        for ratio, multiplier in self._cases():
            fast = method.merge(tensors, ratio, multiplier, arithmetic="fast")
            exact = method.merge(tensors, ratio, multiplier)
            torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)
        if method.fast is None:  # no fast kernel: fast arithmetic runs the exact one
            assert torch.equal(method.merge(tensors, 0.3, 0.7, arithmetic="fast"),
                               method.merge(tensors, 0.3, 0.7))

    # ------------------------------------------------------------------ the Recipe
    def test_recipe_checks_roles_and_round_trips_through_json(self, family):
        recipe = self._recipe(family)
        recipe.validate()
        again = Recipe.from_json(recipe.to_json())
        assert again == recipe and again.merge_method is self.merge_method
        for role in self.merge_method.roles:
            short = {r: s for r, s in recipe.models.items() if r != role}
            with pytest.raises(RecipeError, match=f"needs {role}"):
                recipe.replace(models=short).validate()
        extra = {**recipe.models, "stranger": Source(str(family.base))}
        with pytest.raises(RecipeError, match="takes no stranger"):
            recipe.replace(models=extra).validate()
        if not self.merge_method.uses_ratio:
            with pytest.raises(RecipeError, match="takes no ratios"):
                recipe.replace(vocabulary="single", ratios={"all": 0.5}).validate()

    # ------------------------------------------------------------------ files and the engine
    @pytest.mark.parametrize("unet_dtype", ["fp32", "fp16"])
    def test_file_merge_is_the_formula_block_by_block(self, family, tmp_path, unet_dtype):
        from merge_backend import merge_to_file

        recipe = self._recipe(family, unet_dtype=unet_dtype)
        out = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
        got = load_file(str(out))
        arch = ARCHITECTURES[self.arch]
        sources = {r: load_file(p) for r, p in self._files(family).items()}
        prefix = arch.diffusion.prefix
        precision = getattr(torch, {"fp32": "float32", "fp16": "float16"}[unet_dtype])
        checked = 0
        for key in got:
            if not key.startswith(prefix):
                continue
            # ComfyUI's slider rule: the longest slider name the key starts with
            ratio = strengths("ModelMergeSD1", key[len(prefix):], recipe.ratios)[0] \
                if recipe.ratios else 1.0
            tensors = [held(sources[r][key], precision) for r in self.merge_method.roles]
            expected = held(self.formula(tensors, ratio, recipe.multiplier), precision).float()
            assert torch.equal(got[key], expected), key
            checked += 1
        assert checked > 600
        self._check_text_encoders(recipe, got, sources)

    def _check_text_encoders(self, recipe: Recipe, got: dict, sources: dict) -> None:
        arch = ARCHITECTURES[self.arch]
        prefixes = tuple(te.prefix for te in arch.text_encoders)
        keys = [k for k in got if k.startswith(prefixes) and not k.endswith(CLIP_SKIPS)]
        assert keys
        for key in keys:
            expected = sources["model1"][key].float()
            if recipe.clip is not None:
                expected = self.formula([sources["model1"][key], sources["model2"][key]],
                                        recipe.clip.ratio, recipe.clip.multiplier)
            assert torch.equal(got[key], expected), key

    @pytest.mark.parametrize("arithmetic", ["comfy", "fast"])
    def test_engine_equals_the_file_merge(self, family, tmp_path, arithmetic):
        from merge_backend import merge_to_file
        from merge_backend.engine import MergeEngine
        from merge_backend.naming import to_original
        from merge_backend.pipeline import load_pipeline

        arch = ARCHITECTURES[self.arch]
        first, second = (self._recipe(family, arithmetic=arithmetic, seed=s) for s in (0, 1))
        pipe = load_pipeline(family.a, config_folder=family.config_folder)
        engine = MergeEngine(pipe, first, chunk_elements=4096)
        engine.apply(first)
        engine.apply(second.replace(multiplier=second.multiplier * 0.5))
        engine.apply(second)
        ref = load_file(str(merge_to_file(second, tmp_path / "ref.safetensors",
                                          dtype="fp32").output))
        live = {}
        for component in (arch.diffusion.name, *(te.name for te in arch.text_encoders)):
            module = engine.module(component)
            config = dict(module.config) if component == arch.diffusion.name else None
            live.update(to_original(arch, component, module.state_dict(), config))
        shared = [k for k in live if k in ref]
        assert len(shared) > 600
        differ = [k for k in shared if not torch.equal(live[k], ref[k].to(live[k].dtype))]
        assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"

    # ------------------------------------------------------------------ exports
    def test_comfyui_export_rebuilds_the_file_or_refuses(self, family, tmp_path):
        from merge_backend import merge_to_file
        from merge_backend.export import ComfyExportError, comfy_workflow

        recipe = self._recipe(family)
        method = self.merge_method
        if not method.comfy:
            with pytest.raises(ComfyExportError) as refused:
                comfy_workflow(recipe)
            assert self.method in str(refused.value)
            assert method.comfy_refusal in str(refused.value)
            return
        out = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
        arch = ARCHITECTURES[self.arch]
        files = {Path(p).name: Path(p) for p in self._files(family).values()}
        rebuilt = evaluate_workflow(comfy_workflow(recipe).api(), files,
                                    model_prefix=arch.diffusion.prefix,
                                    clip_prefixes=tuple(te.prefix for te in arch.text_encoders))
        exported = load_file(str(out))
        keys = [k for k in exported if k in rebuilt and not k.endswith(CLIP_SKIPS)]
        assert len(keys) > 600
        differ = [k for k in keys if not torch.equal(rebuilt[k].float(), exported[k])]
        assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"

    def test_supermerger_string_round_trips_or_is_refused(self, family):
        from merge_backend.export import MbwError, mbw_ratios, mbw_string, parse_mbw

        method = self.merge_method
        vocabulary = "mbw" if method.uses_ratio else "single"
        recipe = self._recipe(family, vocabulary=vocabulary)
        if method.supermerger is None:
            with pytest.raises(MbwError, match=self.method):
                mbw_string(recipe)
            return
        te_block = recipe.text_encoder_block
        if method.supermerger.text_encoder_refusal and te_block:
            with pytest.raises(MbwError, match="recipe.clip"):
                mbw_string(recipe)  # BASE below 1 merges the text encoders: no such form
            recipe = recipe.replace(ratios={**recipe.ratios, te_block: 1.0})
        text = mbw_string(recipe)
        parsed = parse_mbw(text, self.arch, method=self.method, multiplier=recipe.multiplier)
        assert parsed == pytest.approx(mbw_ratios(recipe)[0], abs=1e-6)

    def test_report_names_the_method_and_its_formula(self, family):
        from merge_backend.export import render_report

        page = render_report(self._recipe(family), title="contract")
        assert html.escape(self.merge_method.formula) in page
        assert html.escape(self.merge_method.ratio_zero) in page
