import copy

import numpy as np
import onnx
import pytest

from edgeres import fallback
from edgeres.backends.openvino import to_openvino_flavour
from edgeres.backends.ort import to_cpu_flavour
from edgeres.backends.tensorrt import to_tensorrt_flavour
from edgeres.errors import ExportError


def _run(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def test_quantized_layers_name_module_node_and_macs(qdq_resnet20):
    layers = fallback.quantized_layers(qdq_resnet20)
    assert len(layers) == 20  # 19 convs + fc
    assert layers[0] == fallback.Layer("conv1", "/conv1/Conv", "Conv", 16 * 32 * 32 * 3 * 9)
    assert layers[1].module == "layer1.0.conv1" and layers[1].node == "/layer1/layer1.0/conv1/Conv"
    assert layers[-1] == fallback.Layer("fc", "/fc/Gemm", "Gemm", 64 * 10)
    assert sum(layer.macs for layer in layers) == 40_551_040  # convs + fc of ResNet-20 at 32x32


def test_node_module_follows_the_exporter_scopes():
    assert fallback.node_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert fallback.node_module("/conv1/Conv") == "conv1"
    assert fallback.module_name("layer2.1.conv2.weight_quantized") == "layer2.1.conv2"


def test_keep_float_removes_exactly_that_layers_qdq(qdq_resnet20):
    layers = fallback.quantized_layers(qdq_resnet20)
    chosen = [layers[3].node, layers[-1].node]
    mixed = fallback.keep_float(qdq_resnet20, chosen)
    onnx.checker.check_model(mixed)
    left = fallback.quantized_layers(mixed)
    assert [layer.node for layer in left] == [layer.node for layer in layers if layer.node not in chosen]
    nodes = {n.name: n for n in mixed.graph.node}
    producers = {o: n for n in mixed.graph.node for o in n.output}
    for name in chosen:  # neither weight nor data input comes through a DequantizeLinear
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                   for i in nodes[name].input[:2])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    assert _run(mixed, x).shape == (2, 10)
    for flavour in (to_cpu_flavour, to_tensorrt_flavour, to_openvino_flavour):  # every flavour builds from it
        onnx.checker.check_model(flavour(mixed))


def test_keep_float_of_every_layer_is_close_to_float(qdq_resnet20):
    layers = fallback.quantized_layers(qdq_resnet20)
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32), dtype=np.float32)
    int8 = _run(qdq_resnet20, x)
    mixed = _run(fallback.keep_float(qdq_resnet20, [layer.node for layer in layers]), x)
    assert not np.allclose(int8, mixed)  # something really changed


def test_keep_float_rejects_unknown_names(qdq_resnet20):
    with pytest.raises(ExportError, match="sensitivity"):
        fallback.keep_float(qdq_resnet20, ["/nope/Conv"])


def test_type_fp16_casts_around_the_layer_for_strongly_typed_tensorrt(qdq_resnet20):
    layers = fallback.quantized_layers(qdq_resnet20)
    node = layers[5].node
    trt = fallback.type_fp16(to_tensorrt_flavour(fallback.keep_float(qdq_resnet20, [node])), [node])
    onnx.checker.check_model(trt)
    g = trt.graph
    conv = next(n for n in g.node if n.name == node)
    inits = {t.name: t for t in g.initializer}
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert inits[conv.input[2]].data_type == onnx.TensorProto.FLOAT16
    producers = {o: n for n in g.node for o in n.output}
    consumers = [n for n in g.node if conv.output[0] in n.input]
    assert producers[conv.input[0]].op_type == "Cast" and consumers[0].op_type == "Cast"
    from edgeres.check import check_onnx

    assert check_onnx(trt, "jetson-orin-nano").ok  # the lint that gates the bundle still passes
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32)
    assert np.isfinite(_run(trt, x)).all()


def test_macs_need_no_runtime(qdq_resnet20, tmp_path):
    """Shapes come from ONNX shape inference over the folded constants (the option-A Pad's pads included)."""
    import subprocess
    import sys

    path = tmp_path / "raw.onnx"
    onnx.save(qdq_resnet20, str(path))
    code = ("import sys; sys.modules['onnxruntime'] = sys.modules['openvino'] = None\n"
            "import onnx; from edgeres import fallback\n"
            f"print(sum(fallback.layer_macs(onnx.load({str(path)!r})).values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "40551040"


def test_macs_stop_where_a_shape_is_unknown(qdq_resnet20):
    model = copy.deepcopy(qdq_resnet20)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"  # a dynamic input size: no conv output has a known size
    del model.graph.value_info[:]
    with pytest.raises(ExportError, match="output shape of '/conv1/Conv'"):
        fallback.layer_macs(model)
