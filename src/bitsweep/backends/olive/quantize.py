"""Olive: a real Olive workflow (``olive.workflows.run``) generated from our Hydra scheme, on our ONNX export.

The workflow is Olive's graph optimisation (``OnnxPeepholeOptimizer``: constant folding, fusions, dead-node
removal) followed by one of Olive's quantization passes; Olive's cache and output stay inside the artifact
folder (``olive/``) so nothing leaks between variants. Olive evaluates nothing here: the output model is scored
by bitsweep's own metrics through the same ONNX Runtime runner as the ``onnxruntime`` backend.

Olive starts from the same untied-head export as ``onnxruntime`` (see bitsweep.backends.onnx_family.untie_lm_head),
so the two backends' rows differ only by what Olive's passes do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from bitsweep.backends.base import Applied, QuantizeRequest
from bitsweep.backends.onnx_family import MODEL_ONNX, OnnxQuantizer, prepared_source, save_model
from bitsweep.backends.ort_linear import linear_rewriter

log = logging.getLogger(__name__)


def quantization_pass(fmt: str, options: dict[str, Any]) -> dict[str, Any]:
    """Olive's pass config for one of our formats (OLIVE_FORMATS)."""
    if fmt == "DYNAMIC_INT8":
        return {"type": "OnnxDynamicQuantization", "weight_type": "QInt8",
                "per_channel": bool(options.get("per_channel", False))}  # fmt: skip
    if fmt in ("RTN_INT4", "RTN_INT8"):
        return {"type": "OnnxBlockWiseRtnQuantization", "bits": int(fmt[-1]),
                "block_size": int(options.get("block_size", 128)),
                "is_symmetric": bool(options.get("symmetric", True))}  # fmt: skip
    raise ValueError(f"no Olive pass for format {fmt!r}")


def workflow_config(source: Path, work: Path, fmt: str, options: dict[str, Any]) -> dict:
    """The Olive run config: input model, CPU target, graph optimisation + the quantization pass."""
    passes: dict[str, Any] = {"graph_optimization": {"type": "OnnxPeepholeOptimizer"}}
    if fmt != "NONE":
        passes["quantization"] = quantization_pass(fmt, options)
    config: dict[str, Any] = {
        "input_model": {"type": "ONNXModel", "model_path": str(source)},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work / "cache"),
        "output_dir": str(work / "output"),
        "evaluate_input_model": False,
        "log_severity_level": 1,
    }  # fmt: skip
    return config


def restore_output_names(model, source) -> dict[str, str]:
    """Give the graph outputs their source names back, in place; returns {olive's name: restored name}.

    Olive 0.13's OnnxBlockWiseRtnQuantization renames a quantized MatMul's output, and the LM head's output is
    the graph output ``logits`` (it becomes ``logits_Q4``); the runner, like every ONNX consumer, asks for
    ``logits``.
    """
    renamed = {}
    for out, want in zip(model.graph.output, source.graph.output, strict=True):
        if out.name != want.name:
            renamed[out.name] = want.name
    for node in model.graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for out in model.graph.output:
        out.name = renamed.get(out.name, out.name)
    return renamed


class Quantizer(OnnxQuantizer):
    name: ClassVar[str] = "olive"

    def versions(self) -> dict[str, str]:
        import olive

        return {"olive-ai": olive.__version__, **super().versions()}

    def apply(self, request: QuantizeRequest) -> Applied:
        from olive.workflows import run as olive_run

        os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
        options = request.scheme.options
        fmt = str(options["format"]).upper()
        work = request.out / "olive"
        # NONE: the export as is (tied head), like onnxruntime's fp32 row; else the untied copy quantizers need
        source = (
            request.src / MODEL_ONNX
            if fmt == "NONE"
            else prepared_source(request.src / MODEL_ONNX, request.out)
        )
        config = workflow_config(source, work, fmt, options)
        passes = [p["type"] for p in config["passes"].values()]  # olive_run rewrites config in place
        work.mkdir(parents=True, exist_ok=True)
        (work / "workflow.json").write_text(json.dumps(config, indent=2))
        with linear_rewriter():  # the peephole pass's pattern matching, without its quadratic walk
            olive_run(config)
        produced = sorted((work / "output").rglob("*.onnx"))
        if not produced:  # olive.workflows.run logs a failed pass and returns; it does not raise
            raise RuntimeError(f"Olive produced no model; see the log and {work / 'workflow.json'}")
        import onnx

        model = onnx.load(str(produced[0]))
        renamed = restore_output_names(model, onnx.load(str(source), load_external_data=False))
        save_model(model, request.out / MODEL_ONNX)
        shutil.rmtree(work / "cache", ignore_errors=True)  # Olive's intermediate models: ~1 GB per variant
        for path in (work / "output").rglob("*.onnx*"):
            path.unlink()
        extra = {"olive_passes": passes, "renamed_outputs": renamed}
        return self.finish(request, fmt, extra)
