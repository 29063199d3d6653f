"""ONNX teacher files built instantly with ``onnx.helper`` from numpy MLP weights.

Each graph is what a user's own export looks like: an input of a declared dtype (cast to float
inside), an optional input scale, ``Flatten`` → ``Gemm`` → ``Relu`` → ``Gemm``, an optional
``Softmax``/``LogSoftmax`` head, optionally the hidden activations as a second output, and
optionally non-finite scores (see ``write_onnx_teacher``). ``reference_scores`` is the numpy
expectation of the same graph.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, Unpack

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

Head = Literal["logits", "probabilities", "log_probabilities"]
FeaturesPosition = Literal["none", "first", "last"]
InputDtype = Literal["float32", "float16", "float64"]
NonFinite = Literal["none", "nan_rows", "neg_inf_entries"]

DEFAULT_NAN_THRESHOLD = 0.0
"""``nan_rows``: a row's scores are all NaN when its first flattened input value is above this."""

_ONNX_DTYPES: dict[str, int] = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "float64": TensorProto.DOUBLE,
}


class TeacherOptions(TypedDict, total=False):
    """The keyword options of ``write_onnx_teacher`` (and ``reference_scores``), for ``**``."""

    head: Head
    scores_name: str
    features: FeaturesPosition
    features_name: str
    input_name: str
    input_dtype: InputDtype
    input_scale: float
    batch: int | None
    opset: int
    non_finite: NonFinite
    nan_threshold: float


@dataclass(frozen=True)
class MlpWeights:
    """A one-hidden-layer ReLU MLP: logits = relu(x_flat @ w1 + b1) @ w2 + b2 (float32 arrays).

    Shapes: w1 [D, H], b1 [H], w2 [H, K], b2 [K], with D the flattened input size."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def __post_init__(self) -> None:
        h = self.w1.shape[1]
        if self.b1.shape != (h,) or self.w2.shape[0] != h or self.b2.shape != self.w2.shape[1:]:
            raise ValueError(
                f"inconsistent MLP shapes: w1 {self.w1.shape}, b1 {self.b1.shape}, "
                f"w2 {self.w2.shape}, b2 {self.b2.shape}"
            )
        for name in ("w1", "b1", "w2", "b2"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), np.float32))

    @property
    def input_size(self) -> int:
        """D, the flattened input size."""
        return int(self.w1.shape[0])

    @property
    def hidden_size(self) -> int:
        """H, the hidden width (the size of the ``features`` output)."""
        return int(self.w1.shape[1])

    @property
    def num_classes(self) -> int:
        """K, the number of scores per sample."""
        return int(self.w2.shape[1])

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """relu(x_flat @ w1 + b1), float32 [N, H]; x is [N, *input_shape]."""
        flat = np.asarray(x, np.float32).reshape(len(x), -1)
        hidden: np.ndarray = np.maximum(flat @ self.w1 + self.b1, np.float32(0.0))
        return hidden

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The numpy reference logits, float32 [N, K]; x is [N, *input_shape]."""
        logits: np.ndarray = self.hidden(x) @ self.w2 + self.b2
        return logits


def fit_mlp(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    hidden: int = 32,
    steps: int = 300,
    seed: int = 0,
) -> MlpWeights:
    """Full-batch Adam with torch on (x flattened, y); a fair teacher in about a second."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(np.asarray(x, np.float32).reshape(len(x), -1))
    targets = torch.from_numpy(np.asarray(y, np.int64))
    fc1 = torch.nn.Linear(inputs.shape[1], hidden)
    fc2 = torch.nn.Linear(hidden, num_classes)
    with torch.no_grad():
        for layer in (fc1, fc2):
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    parameters = [*fc1.parameters(), *fc2.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(fc2(torch.relu(fc1(inputs))), targets)
        torch.autograd.backward(loss)
        optimizer.step()
    return MlpWeights(
        w1=fc1.weight.detach().numpy().T.copy(),
        b1=fc1.bias.detach().numpy().copy(),
        w2=fc2.weight.detach().numpy().T.copy(),
        b2=fc2.bias.detach().numpy().copy(),
    )


def centroid_teacher(centroids: np.ndarray) -> MlpWeights:
    """An exact nearest-centroid classifier, for fuzzing without training.

    ``centroids`` is [K, *input_shape]. The logit of class k is ``2 c_k·x - |c_k|²``, which is
    ``-|x - c_k|² + |x|²``: the argmax is the nearest centroid (and the logits are a linear map
    of x). The hidden layer passes x through exactly with the ReLU of [x, -x]:
    ``w1 = [I, -I]`` (D × 2D), ``b1 = 0``, so ``h = [relu(x), relu(-x)]`` and
    ``x = h[:D] - h[D:]``; hence ``w2 = [W; -W]`` with ``W = 2 Cᵀ`` (D × K) and
    ``b2 = -|c_k|²``. The hidden width is 2D."""
    c = np.asarray(centroids, np.float32).reshape(len(centroids), -1)
    d = c.shape[1]
    eye = np.eye(d, dtype=np.float32)
    w = 2.0 * c.T
    return MlpWeights(
        w1=np.concatenate([eye, -eye], axis=1),
        b1=np.zeros(2 * d, np.float32),
        w2=np.concatenate([w, -w], axis=0),
        b2=-(c * c).sum(axis=1),
    )


def _prepare(
    x: np.ndarray, input_dtype: InputDtype, input_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """What the graph sees: (flat input cast to float32, that times input_scale)."""
    raw = np.asarray(x).astype(input_dtype).astype(np.float32).reshape(len(x), -1)
    return raw, raw * np.float32(input_scale)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1, keepdims=True)
    shifted = z - top
    with np.errstate(divide="ignore"):
        result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def reference_scores(
    weights: MlpWeights, x: np.ndarray, **options: Unpack[TeacherOptions]
) -> np.ndarray:
    """The numpy scores [N, K] the graph of ``write_onnx_teacher`` with these options outputs for
    x (given as float; it is cast to ``input_dtype`` first, like the graph's caller must).
    Options that do not change the scores (names, features, batch, opset) are ignored, so one
    ``TeacherOptions`` serves both calls."""
    head = options.get("head", "logits")
    input_dtype = options.get("input_dtype", "float32")
    input_scale = options.get("input_scale", 1.0)
    non_finite = options.get("non_finite", "none")
    nan_threshold = options.get("nan_threshold", DEFAULT_NAN_THRESHOLD)
    raw, scaled = _prepare(x, input_dtype, input_scale)
    z = weights.logits(scaled).astype(np.float32)
    if non_finite == "neg_inf_entries":
        z = np.where(z == z.min(axis=-1, keepdims=True), np.float32(-np.inf), z)
    if head == "probabilities":
        with np.errstate(under="ignore"):
            z = np.exp(_log_softmax(z))
    elif head == "log_probabilities":
        z = _log_softmax(z)
    if non_finite == "nan_rows":
        z = np.where(raw[:, :1] > np.float32(nan_threshold), np.float32(np.nan), z)
    return z.astype(np.float32)


def reference_features(
    weights: MlpWeights,
    x: np.ndarray,
    *,
    input_dtype: InputDtype = "float32",
    input_scale: float = 1.0,
) -> np.ndarray:
    """The numpy ``features`` output [N, H] (the hidden activations; never non-finite)."""
    return weights.hidden(_prepare(x, input_dtype, input_scale)[1])


def write_onnx_teacher(
    weights: MlpWeights,
    input_shape: tuple[int, ...],
    path: Path,
    *,
    head: Head = "logits",
    scores_name: str = "logits",
    features: FeaturesPosition = "none",
    features_name: str = "features",
    input_name: str = "input",
    input_dtype: InputDtype = "float32",
    input_scale: float = 1.0,
    batch: int | None = None,
    opset: int = 17,
    non_finite: NonFinite = "none",
    nan_threshold: float = DEFAULT_NAN_THRESHOLD,
) -> None:
    """Write the MLP as a standard-ops ONNX graph at ``path``.

    - input ``input_name``: ``input_dtype`` [batch, *input_shape]; ``batch`` None gives the
      symbolic dim "batch", an int fixes it. The graph casts it to float32, flattens it,
      multiplies by ``input_scale`` (the weights apply to ``x * input_scale``), then
      Gemm → Relu (the ``features``) → Gemm (the logits).
    - ``head``: the logits as they are, or through Softmax / LogSoftmax (axis -1), as
      output ``scores_name`` [batch, K].
    - ``features``: "first"/"last" also outputs the hidden activations [batch, H] as
      ``features_name``, before/after the scores in the graph's output list.
    - ``non_finite="nan_rows"``: every score of a sample is NaN exactly when that sample's first
      flattened input value (as cast to float32, before ``input_scale``) is
      ``> nan_threshold``; other rows are untouched (a Where after the head).
    - ``non_finite="neg_inf_entries"``: in every row, the entries whose logit equals the row's
      minimum logit (one entry per row unless tied) become -inf before the head. The
      scores there are exactly -inf for heads "logits" and "log_probabilities" (LogSoftmax
      renormalizes over the other classes, so the row is still a distribution) and exactly 0
      for "probabilities". The argmax never changes when K ≥ 2 and a row is not all tied.
    - ``opset`` ≥ 13; the IR version is the lowest one that carries that opset, so any
      onnxruntime that knows the opset loads it.
    """
    if opset < 13:
        raise ValueError("opset must be >= 13 (Softmax over the last axis)")
    if int(np.prod(input_shape)) != weights.input_size:
        raise ValueError(f"input_shape {input_shape} does not flatten to {weights.input_size}")
    batch_dim: int | str = "batch" if batch is None else batch
    k, h = weights.num_classes, weights.hidden_size
    nodes: list[onnx.NodeProto] = []
    initializers = [
        numpy_helper.from_array(weights.w1.T.copy(), "fc1.weight"),
        numpy_helper.from_array(weights.b1, "fc1.bias"),
        numpy_helper.from_array(weights.w2.T.copy(), "fc2.weight"),
        numpy_helper.from_array(weights.b2, "fc2.bias"),
    ]

    def const(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    x = input_name
    if input_dtype != "float32":
        nodes.append(helper.make_node("Cast", [x], ["input_float"], to=TensorProto.FLOAT))
        x = "input_float"
    nodes.append(helper.make_node("Flatten", [x], ["input_flat"], axis=1))
    x = "input_flat"
    raw = x
    if input_scale != 1.0:
        scale = const("input_scale", np.array(input_scale, np.float32))
        nodes.append(helper.make_node("Mul", [x, scale], ["input_scaled"]))
        x = "input_scaled"
    nodes += [
        helper.make_node("Gemm", [x, "fc1.weight", "fc1.bias"], ["fc1_out"], transB=1),
        helper.make_node("Relu", ["fc1_out"], [features_name]),
        helper.make_node("Gemm", [features_name, "fc2.weight", "fc2.bias"], ["fc2_out"], transB=1),
    ]
    z = "fc2_out"
    if non_finite == "neg_inf_entries":
        if opset >= 18:
            axes = const("min_axes", np.array([-1], np.int64))
            nodes.append(helper.make_node("ReduceMin", [z, axes], ["row_min"], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMin", [z], ["row_min"], axes=[-1], keepdims=1))
        neg_inf = const("neg_inf", np.array(-np.inf, np.float32))
        nodes += [
            helper.make_node("Equal", [z, "row_min"], ["is_row_min"]),
            helper.make_node("Where", ["is_row_min", neg_inf, z], ["masked_logits"]),
        ]
        z = "masked_logits"
    head_out = scores_name if non_finite != "nan_rows" else "head_out"
    if head == "logits":
        nodes.append(helper.make_node("Identity", [z], [head_out]))
    else:
        op = "Softmax" if head == "probabilities" else "LogSoftmax"
        nodes.append(helper.make_node(op, [z], [head_out], axis=-1))
    if non_finite == "nan_rows":
        index = const("first_feature", np.array([0], np.int64))
        threshold = const("nan_threshold", np.array(nan_threshold, np.float32))
        nan = const("nan", np.array(np.nan, np.float32))
        nodes += [
            helper.make_node("Gather", [raw, index], ["first_value"], axis=1),
            helper.make_node("Greater", ["first_value", threshold], ["nan_row"]),
            helper.make_node("Where", ["nan_row", nan, head_out], [scores_name]),
        ]

    scores_info = helper.make_tensor_value_info(scores_name, TensorProto.FLOAT, [batch_dim, k])
    outputs = [scores_info]
    if features != "none":
        features_info = helper.make_tensor_value_info(
            features_name, TensorProto.FLOAT, [batch_dim, h]
        )
        outputs = [features_info, scores_info] if features == "first" else [*outputs, features_info]
    graph = helper.make_graph(
        nodes,
        "mlp_teacher",
        [
            helper.make_tensor_value_info(
                input_name, _ONNX_DTYPES[input_dtype], [batch_dim, *input_shape]
            )
        ],
        outputs,
        initializer=initializers,
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(
        graph,
        opset_imports=[opset_id],
        producer_name="tests.helpers.onnx_teachers",
        ir_version=helper.find_min_ir_version_for([opset_id]),
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
