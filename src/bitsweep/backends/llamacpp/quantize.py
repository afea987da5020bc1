"""``llama-quantize`` from the converted GGUF (with the importance matrix where the scheme asks for one)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from bitsweep.backends.base import Applied, BaseQuantizer, QuantizeRequest
from bitsweep.backends.llamacpp import llamacpp_type
from bitsweep.backends.llamacpp.calibrate import IMATRIX_FILE
from bitsweep.backends.llamacpp.convert import gguf_file
from bitsweep.backends.llamacpp.tools import run_tool, tool_path


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """What a GGUF file really holds: tensor types applied (with counts) and bits per weight.

    llama.cpp falls back to other types for tensors whose rows don't fit a type's block size (e.g. 576-wide
    rows cannot hold 256-element K-quant blocks), so the type name alone does not give the size.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    types: Counter[str] = Counter()
    params_by_type: Counter[str] = Counter()
    n_bytes = n_params = 0
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        types[name] += 1
        params_by_type[name] += int(tensor.n_elements)
        n_bytes += int(tensor.n_bytes)
        n_params += int(tensor.n_elements)
    return {
        "tensor_types": dict(sorted(types.items())),
        "params_by_type": dict(sorted(params_by_type.items())),
        "n_params": n_params,
        "tensor_bytes": n_bytes,
        "bpw": 8 * n_bytes / n_params,
    }


class Quantizer(BaseQuantizer):
    name: ClassVar[str] = "llamacpp"

    def versions(self) -> dict[str, str]:
        import llama_cpp

        return {"llama_cpp_python": llama_cpp.__version__}

    def apply(self, request: QuantizeRequest) -> Applied:
        options = request.scheme.options
        qtype = llamacpp_type(options["type"])
        out_file = request.out / f"model-{qtype.name}.gguf"
        args: list[Any] = [tool_path("llama-quantize")]
        if request.scheme.needs_calibration:
            args += ["--imatrix", request.calibration_input() / IMATRIX_FILE]
        if options.get("pure"):
            args.append("--pure")
        args += [*map(str, options.get("extra_args", []))]
        args += [gguf_file(request.src), out_file, qtype.name, request.threads]
        run_tool(args)
        return Applied(
            out_file.name, {"type": qtype.name, "nominal_bpw": qtype.bpw, **gguf_summary(out_file)}
        )
