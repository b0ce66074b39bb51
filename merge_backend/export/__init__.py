"""merge_backend.export: a Recipe written out as files other tools read.

- ``merge_to_file`` (checkpoint) and ``export_diffusers`` (a diffusers pipeline folder);
- ``comfy_workflow``: a ComfyUI workflow (editor and API formats) that rebuilds the merge;
- ``mbw_string`` / ``parse_mbw``: SuperMerger's block-weight line, both ways;
- ``render_report`` / ``render_comparison``: self-contained HTML pages (one merge; merges
  side by side);
- ``plan_exports`` / ``run_exports``: every check first, then every file, atomically.

It knows nothing of Optuna: ``search/cli_export.py`` turns trials into ``ExportItem``s.
"""

from .comfyui import (
    SAMPLERS,
    ComfyExportError,
    ComfyPrompt,
    ComfyWorkflow,
    blend_node,
    comfy_workflow,
    write_comfy_workflow,
)
from .diffusers_export import export_diffusers
from .jobs import (
    FORMATS,
    ExportError,
    ExportItem,
    ExportPlan,
    PlannedOutput,
    check_sources,
    output_paths,
    plan_exports,
    report_images,
    run_exports,
    scores_json,
)
from .mbw import MbwError, mbw_ratios, mbw_string, mbw_to_comfy, parse_mbw
from .report import Column, ReportImage, png_bytes, ratio_chart_svg, render_comparison, render_report

__all__ = [
    "FORMATS", "SAMPLERS", "Column", "ComfyExportError", "ComfyPrompt", "ComfyWorkflow", "ExportError",
    "ExportItem", "ExportPlan", "MbwError", "PlannedOutput", "ReportImage", "blend_node",
    "check_sources", "comfy_workflow", "export_diffusers", "mbw_ratios", "mbw_string",
    "mbw_to_comfy", "output_paths", "parse_mbw", "plan_exports", "png_bytes", "ratio_chart_svg",
    "render_comparison", "render_report", "report_images", "run_exports", "scores_json",
    "write_comfy_workflow",
]
