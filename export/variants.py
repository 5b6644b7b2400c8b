"""Precision variants made from the fp32 tower graphs: int8 (CPU) and fp16 (GPU)."""

from __future__ import annotations

import logging
from pathlib import Path


def make_int8(fp32: Path, out: Path) -> Path:
    """Dynamic quantization of MatMul weights, int8, one scale per output channel.

    Weights use 7 bits (`reduce_range`): x86 CPUs without VNNI (AVX2 only, like this
    project's build machine) multiply uint8 activations by int8 weights with an instruction
    that saturates 16-bit pair sums, which cut the tiny test CLIP's text parity to a min
    cosine of 0.93; with 7-bit weights it is 0.997, on every x86 CPU, and VNNI CPUs keep
    their fast int8 path (uint8 weights avoid the saturation too but lose that path).

    No `quant_pre_process`: its symbolic shape inference fails on the CLIP text tower, and
    the quantizer needs no shapes for MatMuls with constant weights. Activations are
    quantized at run time with one scale per tensor, so an item's int8 embedding depends
    slightly on the other items of its batch (fp32 and fp16 do not).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    try:
        quantize_dynamic(
            model_input=fp32,
            model_output=out,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            reduce_range=True,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        quant_logger.setLevel(level)
    return out


def make_fp16(fp32: Path, out: Path) -> Path:
    """All float tensors to fp16 except the graph's inputs and outputs, which stay fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(model, str(out))
    return out
