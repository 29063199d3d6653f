"""ONNX text classifiers, uploaded as the folder Hugging Face Optimum's export writes:
``model.onnx``, the tokenizer (``tokenizer.json``, or the files one is built from) and, optionally,
``config.json`` (class names in ``id2label``, the model type, the vocabulary and positions). It is
the ``huggingface`` format's folder with a graph where the safetensors weights would be.

The graph takes int64 ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``, each
``[batch, sequence]`` with both sizes symbolic, and returns ``[batch, classes]`` float scores (the
output named ``logits`` where there are several). It is checked as an ONNX teacher is
(``app.ml.teacher_formats.onnx``): one file without external data, loaded with graph
optimizations off, then run in a separate process under the trial's limits, here on two
tokenised texts of different lengths and on one record of the longest length it will be given.

Such a teacher gives logits only: no hidden states (no feature layers) and no weights a student
can start from. Its ``architecture`` is its config (none without ``config.json``) plus, under
``distill``, ``max_positions`` (the record length the trial ran) and ``runtime: onnx``.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import get_settings
from app.errors import InvalidModel
from app.ml.archives import extract_archive
from app.ml.onnx_io import onnx_latency_ms
from app.ml.signature import LOGITS_NAME, ModelSignature, TextPreprocessing
from app.ml.students.transformer import ONNX_RUNTIME, RUNTIME
from app.ml.teacher_formats.base import ModelInputs, ScoresChoice, TeacherBackend, TeacherInfo
from app.ml.teacher_formats.huggingface import (
    CONFIG_FILE,
    DEFAULT_MAX_LENGTH,
    DISTILL_KEY,
    MAX_LABELS,
    MAX_POSITIONS,
    TRIAL_TEXTS,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    _architecture,
    _classes,
    _convert_in_process,
    _convert_isolated,
    _isolated,
    _read_config,
    num_labels,
    text_tokenizer,
    tokenizer_source,
)
from app.ml.teacher_formats.onnx import DATATYPES, _used_parameters
from app.ml.teacher_formats.onnx_errors import explain_load_error, explain_parse_error
from app.ml.text import (
    ATTENTION_MASK,
    INPUT_IDS,
    TOKEN_TYPE_IDS,
    TOKENIZER_FILE,
    TextTokenizer,
    TokenizedInputs,
    text_model_signature,
)

MODEL_FILE = "model.onnx"
INT64 = "tensor(int64)"
TEXT_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
EXPORT_HELP = (
    "Export it as Optimum does (`optimum-cli export onnx --model <dir> --task "
    "text-classification <out>`), or with `torch.onnx.export(model, (input_ids, attention_mask), "
    "'model.onnx', input_names=['input_ids', 'attention_mask'], output_names=['logits'], "
    "dynamic_shapes=..., external_data=False)` with dynamic batch and sequence dimensions."
)


@dataclass(frozen=True)
class TextGraph:
    """An ONNX text classifier's graph, checked: its input names (in the graph's order), its
    class scores' output and width, its weights (used float initializer elements)."""

    path: Path
    input_names: list[str]
    output: str
    num_classes: int
    parameters: int


def graph_file(directory: Path) -> Path | None:
    """The folder's ONNX graph when it has no safetensors weights: ``model.onnx``, else its one
    ``.onnx`` file; None: no graph (or safetensors weights, which are loaded instead).

    Raises:
        InvalidModel: (code ``several_graphs``) several graphs, none named ``model.onnx``.
    """
    if (directory / WEIGHTS_FILE).is_file() or (directory / WEIGHTS_INDEX_FILE).is_file():
        return None
    graphs = sorted(p.name for p in directory.iterdir() if p.suffix.lower() == ".onnx")
    if not graphs:
        return None
    if MODEL_FILE in graphs:
        return directory / MODEL_FILE
    if len(graphs) > 1:
        raise InvalidModel(
            f"The archive holds several ONNX graphs ({graphs[:5]}) and none is `{MODEL_FILE}`: "
            f"name the classifier's graph `{MODEL_FILE}`, or archive it alone.",
            code="several_graphs",
            field="file",
        )
    return directory / graphs[0]


def _symbolic(shape: list[Any]) -> bool:
    """Two dimensions, neither fixed (onnxruntime gives a symbolic one as a name or None)."""
    return len(shape) == 2 and not any(isinstance(d, int) for d in shape)


def check_graph(path: Path) -> TextGraph:
    """Read and check the graph without running it (onnxruntime loads it with graph
    optimizations off: constant folding would run its constant nodes in this process).

    Raises:
        InvalidModel: not ONNX, external data (code ``external_data``), inputs other than
            int64 token ids and masks (``not_a_text_classifier``), no ``[batch, classes]``
            float output (``no_class_scores``).
    """
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types on corrupt bytes
        raise InvalidModel(explain_parse_error(path.name), field="file") from e
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
        raise InvalidModel(
            f"`{path.name}` keeps tensors in external data files, which are not accepted: save it "
            "as one file (`torch.onnx.export(..., external_data=False)`, or "
            "`onnx.save(model, path, save_as_external_data=False)`).",
            code="external_data",
            field="file",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InvalidModel(explain_load_error(model, e, path.name), field="file") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = [i.name for i in inputs]
    if (
        not {INPUT_IDS, ATTENTION_MASK} <= set(names)
        or not set(names) <= set(TEXT_INPUTS)
        or any(i.type != INT64 or not _symbolic(list(i.shape)) for i in inputs)
    ):
        raise InvalidModel(
            "An ONNX text classifier takes int64 `input_ids`, `attention_mask` and optionally "
            "`token_type_ids`, each [batch, sequence] with both sizes left free; this graph takes "
            f"{[(i.name, i.type, i.shape) for i in inputs]}. {EXPORT_HELP} (An ONNX teacher of "
            "images or vectors is uploaded as its `.onnx` file, not in an archive.)",
            code="not_a_text_classifier",
            field="file",
        )
    candidates = [
        o
        for o in outputs
        if o.type in DATATYPES
        and len(o.shape) == 2
        and not isinstance(o.shape[0], int)
        and isinstance(o.shape[1], int)
        and 2 <= o.shape[1] <= MAX_LABELS
    ]
    named = [o for o in candidates if o.name == LOGITS_NAME]
    if not named and len(candidates) != 1:
        raise InvalidModel(
            "An ONNX text classifier returns its class scores as one output [batch, classes] of "
            f"floats (named `{LOGITS_NAME}` where there are several); this graph returns "
            f"{[(o.name, o.type, o.shape) for o in outputs]}.",
            code="no_class_scores",
            field="file",
        )
    scores = (named or candidates)[0]
    # Only what some node reads counts: an unused initializer is never loaded.
    parameters, _ = _used_parameters(model.graph)
    return TextGraph(path, names, scores.name, int(scores.shape[1]), parameters)


def graph_trial(path: str, output: str, feeds: list[dict[str, list[list[int]]]]) -> list[Any]:
    """Run the graph at ``path`` on each of ``feeds`` with onnxruntime on one CPU thread; each
    run's ``output`` shape and whether it is all finite. The ``fn`` of a ``run_isolated``: plain
    data only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings would go to the server's log
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    results = []
    for feed in feeds:
        (value,) = session.run([output], {k: np.asarray(v, np.int64) for k, v in feed.items()})
        results.append([[int(d) for d in value.shape], bool(np.isfinite(value).all())])
    return results


def inspect_onnx_folder(directory: Path, path: Path, name: str) -> TeacherInfo:
    """Check an ONNX text classifier's folder (graph at ``path``), then run its graph in the
    trial process on two texts and on one record of the longest length it will be given.

    Raises:
        InvalidModel: 422, the first thing that does not fit (``labels_mismatch``: the config
            names another count of labels than the graph returns).
    """
    graph = check_graph(path)
    config = _read_config(directory, path.name)[1] if (directory / CONFIG_FILE).is_file() else None
    if config is not None and num_labels(config) != graph.num_classes:
        raise InvalidModel(
            f"`{CONFIG_FILE}` has {num_labels(config)} labels, but the graph's `{graph.output}` "
            f"scores {graph.num_classes} classes.",
            code="labels_mismatch",
            field="file",
        )
    model_pad = getattr(config, "pad_token_id", None)
    source = tokenizer_source(
        directory, model_pad if isinstance(model_pad, int) else None, _convert_isolated
    )
    tokenizer = text_tokenizer(config, source)
    positions = getattr(config, "max_position_embeddings", None)
    max_length = min(
        tokenizer.max_length,
        positions if isinstance(positions, int) and positions > 1 else DEFAULT_MAX_LENGTH,
    )
    tokenizer = TextTokenizer(tokenizer.tokenizer, max_length, tokenizer.pad_token_id)
    records, _ = tokenizer.encode(list(TRIAL_TEXTS))
    feed = {k: v.tolist() for k, v in records.feed(graph.input_names).items()}
    # The first record stretched to `max_length` tokens by repeating its second token, its
    # special first and last tokens kept: as long a record as the teacher will be given.
    real = sum(feed[ATTENTION_MASK][0])
    full = {
        k: [v[0][:1] + v[0][1:2] * (max_length - 2) + v[0][real - 1 : real]]
        for k, v in feed.items()
    }
    # The graph's tensors, and the runtime's copies of them while it loads.
    memory_bytes = get_settings().teacher_trial_memory_bytes + 3 * path.stat().st_size
    results = _isolated(
        graph_trial,
        str(path),
        graph.output,
        [feed, full],
        what="Running the graph on two texts",
        memory_bytes=memory_bytes,
    )
    for (shape, finite), batch in zip(results, (len(TRIAL_TEXTS), 1), strict=True):
        if shape != [batch, graph.num_classes] or not finite:
            raise InvalidModel(
                f"On {batch} record(s) the graph returned `{graph.output}` shaped {shape}"
                + ("" if finite else ", not all finite")
                + f"; expected [{batch}, {graph.num_classes}] finite scores.",
                field="file",
            )
    signature = text_model_signature(
        graph.num_classes,
        preprocessing=TextPreprocessing(
            tokenizer=TOKENIZER_FILE, max_length=max_length, pad_token_id=tokenizer.pad_token_id
        ),
        token_type_ids=TOKEN_TYPE_IDS in graph.input_names,
        classes=None if config is None else _classes(config),
        output_name=graph.output,
    )
    architecture = {} if config is None else _architecture(config)
    return TeacherInfo(
        format=name,
        signature=signature,
        parameter_count=graph.parameters,
        scores_choice=ScoresChoice(
            output=graph.output, by="name" if graph.output == LOGITS_NAME else "only"
        ),
        architecture={
            **architecture,
            DISTILL_KEY: {MAX_POSITIONS: max_length, RUNTIME: ONNX_RUNTIME},
        },
        feature_layers=[],
    )


class OnnxTextTeacher(TeacherBackend):
    """An ONNX text classifier run by onnxruntime on tokenised records; class scores only."""

    def __init__(
        self,
        archive: Path,
        graph: Path,
        tokenizer: TextTokenizer,
        signature: ModelSignature,
        device: torch.device,
    ) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        # The session holds the whole graph (no external data): the file may go after this.
        self.session = ort.InferenceSession(str(graph), providers=providers)
        self.archive, self.signature, self._tokenizer = archive, signature, tokenizer
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def tokenizer(self) -> TextTokenizer:
        """The teacher's own tokenizer, set to its records' length and padding."""
        return self._tokenizer

    def run(self, batch: ModelInputs, names: list[str] | None) -> list[np.ndarray]:
        """The class scores ``[batch, classes]``, float32.

        Raises:
            TypeError: ``batch`` is not tokenised records.
            ValueError: ``names``: the graph gives no feature layers.
        """
        if not isinstance(batch, TokenizedInputs):
            raise TypeError("a text teacher runs on tokenised records (TokenizedInputs)")
        if names is not None:
            raise ValueError("an ONNX text teacher gives its class scores only, no layers")
        (scores,) = self.session.run([self.signature.scores.name], batch.feed(self.input_names))
        return [np.asarray(scores, dtype=np.float32)]

    def latency_ms(self, batch: int = 1) -> float:
        # The graph is timed as stored: extracted again for the while.
        with tempfile.TemporaryDirectory(prefix="distill-hf-") as tmp:
            graph = graph_file(extract_archive(self.archive, Path(tmp)))
            assert graph is not None, "inspected as an ONNX folder"
            return onnx_latency_ms(graph, self.signature, batch=batch)


def open_onnx_folder(
    archive: Path,
    directory: Path,
    graph: Path,
    signature: ModelSignature,
    preprocessing: TextPreprocessing,
    device: torch.device,
) -> OnnxTextTeacher:
    """The teacher ``archive`` holds, extracted at ``directory`` (its graph at ``graph``)."""
    # The archive passed inspection: a tokenizer built from its source files is built here.
    source = tokenizer_source(directory, None, _convert_in_process)
    tokenizer = TextTokenizer(
        source.tokenizer, preprocessing.max_length, preprocessing.pad_token_id
    )
    return OnnxTextTeacher(archive, graph, tokenizer, signature, device)
