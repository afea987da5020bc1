"""Linear-time versions of loops in the ONNX toolchain that are quadratic in the graph's size.

onnxruntime.quantization 1.31 (:func:`linear_quantization`) and onnxscript 0.7's pattern rewriter, which Olive's
``OnnxPeepholeOptimizer`` runs (:func:`linear_rewriter`).

On SmolLM2-135M's ONNX graph (~10k nodes) QNN's W8A16 ``quantize`` took 256 s, of which the calibration run
itself was 9 s: 100 s went to ``ONNXModel.replace_input_of_all_nodes`` (called once per QDQ pair, it calls a
Python function on every node of the graph: 26 M calls), 71 s to ``MinMaxCalibrater.augment_graph`` (for every
calibrated tensor it scans the node list for the tensor's first consumer and rebuilds a dict of every
value_info, twice). :func:`linear_quantization` swaps in versions that do the same edits in one pass, and packs
int4 weights with NumPy instead of a Python loop per byte (``pack_bytes_to_4bit``: 15 s of QNN W4A16's
quantization); the models they produce are byte-identical to onnxruntime's own (tests/test_onnx.py compares them
on a real QDQ quantization), and onnxruntime's other code paths are untouched.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

# the releases whose code these replace line for line; another release runs its own code
ORT_VERSION = "1.31."
ONNXSCRIPT_VERSION = "0.7."


@contextlib.contextmanager
def linear_quantization() -> Iterator[bool]:
    """Within the block, onnxruntime.quantization uses the linear versions; yields whether it does (False on
    an onnxruntime release these were not written against)."""
    import onnxruntime
    from onnxruntime.quantization import base_quantizer, quant_utils
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.onnx_model import ONNXModel

    if not onnxruntime.__version__.startswith(ORT_VERSION):
        yield False
        return
    saved = (ONNXModel.replace_input_of_all_nodes, ONNXModel.replace_output_of_all_nodes,
             MinMaxCalibrater.augment_graph, quant_utils.pack_bytes_to_4bit, base_quantizer.pack_bytes_to_4bit)  # fmt: skip
    ONNXModel.replace_input_of_all_nodes = replace_input_of_all_nodes
    ONNXModel.replace_output_of_all_nodes = replace_output_of_all_nodes
    MinMaxCalibrater.augment_graph = augment_graph
    quant_utils.pack_bytes_to_4bit = base_quantizer.pack_bytes_to_4bit = pack_bytes_to_4bit
    try:
        yield True
    finally:
        (ONNXModel.replace_input_of_all_nodes, ONNXModel.replace_output_of_all_nodes,
         MinMaxCalibrater.augment_graph, quant_utils.pack_bytes_to_4bit, base_quantizer.pack_bytes_to_4bit) = saved  # fmt: skip


def pack_bytes_to_4bit(src_8bit: bytes) -> bytearray:
    """onnxruntime's ``pack_bytes_to_4bit``: element 2i in the low nibble of byte i, element 2i+1 in the high
    one; an odd last element alone in the low nibble."""
    import numpy as np

    values = np.frombuffer(src_8bit, dtype=np.uint8) & 0xF
    if len(values) % 2:
        values = np.append(values, np.uint8(0))
    pairs = values.reshape(-1, 2)
    return bytearray((pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).tobytes())


def replace_input_of_all_nodes(self, old_input_name: str, new_input_name: str) -> None:
    """onnxruntime's, with the membership test in C (protobuf's ``in``) instead of a Python call per node."""
    for node in self.model.graph.node:
        if old_input_name in node.input:
            self.replace_node_input(node, old_input_name, new_input_name)


def replace_output_of_all_nodes(self, old_output_name: str, new_output_name: str) -> None:
    for node in self.model.graph.node:
        if old_output_name in node.output:
            self.replace_node_output(node, old_output_name, new_output_name)


def augment_graph(self) -> None:
    """``MinMaxCalibrater.augment_graph``: a ReduceMin and a ReduceMax (each + Reshape to 1-D) of every tensor
    to calibrate, made graph outputs.

    onnxruntime inserts each pair right before the tensor's first consumer in the *current* node list, so a
    tensor's ReduceMax (whose first consumer is by then its own ReduceMin) lands before its ReduceMin, and
    tensors without a consumer go to the end. The same order results here from one pass: each tensor's nodes
    ``[ReduceMax, Reshape, ReduceMin, Reshape]`` before its first original consumer, in calibration order.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = self.model.graph
    tensors, _ = self.select_tensors_to_calibrate(self.model)
    reshape_shape_name = str(uuid.uuid4())
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), reshape_shape_name))
    # looked up only for tensors of the original graph, which the outputs added below never are
    value_infos = {vi.name: vi for vi in graph.value_info}
    value_infos.update({o.name: o for o in graph.output})
    value_infos.update({i.name: i for i in graph.input})

    def op_version(op_type: str) -> int:
        for opset_import in self.model.opset_import:
            if onnx.defs.has(op_type, opset_import.domain):
                return opset_import.version
        raise RuntimeError(f"Model does not contain a version for '{op_type}'.")

    def reduce_nodes(tensor_name: str, reduce_op_name: str) -> list:
        reduce_output = tensor_name + "_" + reduce_op_name
        intermediate_output = reduce_output + "_Reshape"
        reduce_node = helper.make_node(reduce_op_name, [tensor_name], [intermediate_output], keepdims=1,
                                       name=reduce_output)  # fmt: skip
        reshape_node = helper.make_node("Reshape", inputs=[intermediate_output, reshape_shape_name],
                                        outputs=[reduce_output], name=intermediate_output)  # fmt: skip
        if tensor_name not in value_infos:
            raise ValueError(
                f"Unable to guess tensor type for tensor {tensor_name!r}, "
                "running shape inference before quantization may resolve this issue."
            )
        onnx_type = value_infos[tensor_name].type.tensor_type.elem_type
        if self.per_channel:
            rank = len(value_infos[tensor_name].type.tensor_type.shape.dim)
            reduced_axes = [0, *range(2, rank)]
            if op_version(reduce_op_name) < 18:
                reduce_node.attribute.append(helper.make_attribute("axes", reduced_axes))
            else:
                axes_name = str(uuid.uuid4())
                reduce_node.input.append(axes_name)
                graph.initializer.append(
                    numpy_helper.from_array(np.array(reduced_axes, dtype=np.int64), axes_name)
                )
        graph.output.append(helper.make_tensor_value_info(reduce_output, onnx_type, [None]))
        return [reduce_node, reshape_node]

    first_consumer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            first_consumer.setdefault(name, index)
    before: dict[int, list] = {}
    for tensor in tensors:
        low = reduce_nodes(tensor, "ReduceMin")
        high = reduce_nodes(tensor, "ReduceMax")
        before.setdefault(first_consumer.get(tensor, len(graph.node)), []).extend(high + low)
    for index in sorted(before, reverse=True):  # from the end: the indices before it stay valid
        for offset, node in enumerate(before[index]):
            graph.node.insert(index + offset, node)
    onnx.save(self.model, self.augmented_model_path, save_as_external_data=self.use_external_data_format)


@contextlib.contextmanager
def linear_rewriter() -> Iterator[bool]:
    """Within the block, onnxscript's pattern matcher rejects a node that cannot start a multi-output pattern
    before it indexes the whole graph; yields whether it does (False on another onnxscript release).

    ``SimplePatternMatcher.match`` tries a pattern with several output nodes at every node of the graph, and for
    each try first builds a dict of all the graph's nodes by op type (the candidates for the other outputs),
    then tries every combination whose first element is that node. On SmolLM2-135M's ONNX graph Olive's
    peephole pass made 671 k such tries that walked the node list 106 M times: its onnxscript step took 62 s
    (idle; 167 s beside other jobs) and takes 6.8 s with this, the model byte-identical. Every
    combination starts by matching the first pattern output against this node with a fresh match state, so when
    that fails every combination fails: here it is checked once, first. Matches, and so the rewritten models, are
    the same (tests/test_onnx.py compares Olive's output with and without).
    """
    import onnxscript
    from onnxscript import ir
    from onnxscript.rewriter._matcher import SimplePatternMatcher

    if not onnxscript.__version__.startswith(ONNXSCRIPT_VERSION):
        yield False
        return
    original = SimplePatternMatcher.match

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None):
        if not self.pattern.has_single_output_node:
            self._tracer = tracer
            self._graph = (
                graph_or_function if isinstance(graph_or_function, ir.Graph) else graph_or_function.graph
            )
            self._init_match(verbose)
            if not self._match_node(self.pattern.output_nodes[0], node):
                return self._match
        return original(self, model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes,
                        tracer=tracer)  # fmt: skip

    SimplePatternMatcher.match = match
    try:
        yield True
    finally:
        SimplePatternMatcher.match = original
