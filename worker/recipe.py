"""The distillation recipe, without a database: prepare -> teacher outputs -> train -> evaluate
-> export.

The pipeline runs it for a job; the benchmarks and the in-process tests call it (or its phases)
directly. It reports through ``RecipeEvents``: a job's attempt writes them to the database, a
benchmark ignores them. Each phase's outputs are kept on the recipe for the next.
"""

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from math import isfinite
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from app.datasets.arrays import DatasetArrays
from app.datasets.text import TextRecords
from app.datasets.tokenized import shared_tokenizer
from app.errors import PreflightFailed
from app.jobs.methods import AttentionKL, FeatureMethod, TextFeatureMethod
from app.jobs.preflight import (
    Finding,
    PreflightReport,
    PreflightTeacher,
    refuse_non_finite,
    run_preflight,
    settle_scores,
    teacher_inputs,
)
from app.jobs.schemas import DistillationSpec, JobResult, TeacherScore
from app.ml.artifacts import FILENAMES
from app.ml.hooks import FeatureTap, TransformerTap, transformer_outputs
from app.ml.layers import feature_layers, transformer_layers
from app.ml.onnx_io import onnx_latency_ms
from app.ml.signature import (
    AnyPreprocessing,
    ImagePreprocessing,
    ModelSignature,
    SignatureMismatch,
    TextPreprocessing,
    check_compatible,
)
from app.ml.students import (
    architecture_of,
    build_student,
    family_of,
    parameter_count,
    student_signature,
)
from app.ml.teacher_formats import TeacherBackend
from app.ml.teacher_formats.base import ModelInputs
from app.ml.teacher_formats.huggingface import HuggingFaceTeacher
from app.ml.text import LATENCY_TOKENS, TokenizedInputs, is_text
from app.models import ArtifactFormat, JobPhase
from worker.augment import Augmenter, Mix
from worker.checkpoints import load_checkpoint, save_checkpoint
from worker.evaluation import accuracy, logit_metrics, per_class_accuracy
from worker.export import write_manifest, write_student
from worker.losses import build_loss
from worker.quantize import int8_student
from worker.teacher_cache import cache_key, cached_teacher_logits
from worker.teachers import TeacherRecord, ensemble_logits
from worker.text_data import cached_tokenize_records
from worker.text_init import init_from_teacher, needs_teacher_weights
from worker.training.loop import Batch, LoopOutcome, LoopState, predict_logits, train

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.1
MAX_VALIDATION = 10_000


class JobFailure(Exception):
    """A failure to report on the job as it is (no traceback needed)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class Cancelled(Exception):
    """A cancel was requested; raised between phases, or when the loop stopped on request."""


class RecipeEvents(Protocol):
    """What a recipe reports; a job's attempt writes it to the database."""

    def phase(self, phase: JobPhase) -> None:
        """A phase begins. May raise ``Cancelled``."""

    def preflight(self, report: PreflightReport, teachers: list[PreflightTeacher]) -> None:
        """The preflight passed; ``teachers`` carry what it settled about each teacher."""

    def keep_alive(self) -> None:
        """Called during slow work outside the loop (teacher passes)."""

    def resumed(self, epoch: int) -> None:
        """Training continues after ``epoch`` (0: from the start)."""

    def progress(self, fraction: float) -> None:
        """The fraction of all training steps done."""

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        """An epoch's training terms and validation metrics."""

    def should_stop(self) -> bool:
        """Stop training now (a cancel)."""


class SilentEvents:
    """Events that go nowhere: for benchmarks and tests that only want the result."""

    def phase(self, phase: JobPhase) -> None:
        pass

    def preflight(self, report: PreflightReport, teachers: list[PreflightTeacher]) -> None:
        pass

    def keep_alive(self) -> None:
        pass

    def resumed(self, epoch: int) -> None:
        pass

    def progress(self, fraction: float) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass(frozen=True)
class RecipeInputs:
    """Everything one distillation needs, read beforehand (from the database, or by hand).

    ``teachers`` pairs with ``spec.teacher_weights``. ``cache_dir`` keeps teacher outputs
    between runs (None: computed every time); ``checkpoint`` is where epochs are saved and a
    resumed run reads from (None: no checkpoints). ``started`` (``time.perf_counter``) is when
    the job's wall time began. ``preflight`` is the report of one run at submission (what it
    settled is on the teachers already); None: the recipe runs it first. ``data``: arrays, or
    text records (tokenised with the teacher's tokenizer, cached in ``token_cache_dir``).
    """

    job_id: str
    spec: DistillationSpec
    teachers: list[TeacherRecord]
    data: DatasetArrays | TextRecords
    device: torch.device
    artifact_dir: Path
    cache_dir: Path | None = None
    cache_max_bytes: int | None = None
    checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    preflight: PreflightReport | None = None
    token_cache_dir: Path | None = None


@dataclass(frozen=True)
class RecipeOutput:
    result: JobResult
    paths: dict[ArtifactFormat, Path]


Split = tuple[ModelInputs, np.ndarray, np.ndarray]


def split_validation(
    x: ModelInputs, y: np.ndarray, logits: np.ndarray, seed: int
) -> tuple[Split, Split]:
    """Hold out part of the training set to pick the best epoch; the test set stays unseen."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = min(MAX_VALIDATION, max(1, int(len(x) * VALIDATION_FRACTION)))
    val, tr = order[:n_val], order[n_val:]
    return (x[tr], y[tr], logits[tr]), (x[val], y[val], logits[val])


def to_batch(
    arrays: Split,
    signature: ModelSignature,
    device: torch.device,
) -> Batch:
    """``(inputs, labels, teacher logits)`` as a device ``Batch`` named by ``signature``."""
    x, y, logits = arrays
    if isinstance(x, TokenizedInputs):
        inputs = x.feed([t.name for t in signature.inputs])
    else:
        inputs = {signature.inputs[0].name: x}
    return Batch(
        inputs={
            name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in inputs.items()
        },
        labels=torch.from_numpy(y).to(device),
        teacher_logits=torch.from_numpy(np.ascontiguousarray(logits)).to(device),
    )


def model_inputs(batch: Batch) -> ModelInputs:
    """A split's inputs back on the CPU as a teacher or onnxruntime takes them."""
    if batch.lengths is None:
        x: np.ndarray = batch.x.cpu().numpy()
        return x
    arrays = {name: t.cpu().numpy() for name, t in batch.inputs.items()}
    return TokenizedInputs(
        arrays["input_ids"], arrays["attention_mask"], arrays.get("token_type_ids")
    )


class OnlineTeacher:
    """The job's teachers run on every augmented training batch (inference mode), their logits
    mixed into one teacher's as the cached ones are: ``teacher(x)`` takes the student's inputs
    ``[B, ...]`` on the training device and gives the logits ``[B, classes]`` there.

    The inputs are mapped to each teacher's as ``app.jobs.preflight.teacher_inputs`` maps stored
    data (its declared image scale and normalisation). Every backend takes float32 numpy arrays
    (onnxruntime; a torch teacher moves them to its own device), so each call copies the batch
    to the host and the logits back: a sync per step, small beside the teacher's forward pass.
    ``calls`` and ``seconds`` count the passes and the time spent in them.
    """

    def __init__(
        self,
        teachers: list[TeacherRecord],
        backends: list[TeacherBackend],
        data_preprocessing: AnyPreprocessing,
        weights: list[float],
        temperature: float,
    ) -> None:
        self.teachers, self.backends = teachers, backends
        self.data_preprocessing = data_preprocessing
        self.weights, self.temperature = weights, temperature
        self.calls, self.seconds = 0, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        stored = x.detach().float().cpu().numpy()
        per_teacher = []
        for record, backend in zip(self.teachers, self.backends, strict=True):
            fed = teacher_inputs(stored, self.data_preprocessing, backend.signature.preprocessing)
            with torch.inference_mode():
                logits = backend.logits(fed)
            refuse_non_finite(logits, record.id, "augmented training samples")
            per_teacher.append(logits)
        mixed = ensemble_logits(per_teacher, self.weights, self.temperature)
        # Made outside inference mode: the loss saves the teacher's logits for its backward.
        out = torch.from_numpy(np.ascontiguousarray(mixed)).to(x.device)
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return out


class DistillationRecipe:
    """One distillation, phase by phase; ``run`` does them all in order."""

    # Set by the phases, each for the next: prepare, teacher_outputs, train.
    student_signature: ModelSignature
    data: DatasetArrays
    train_split: Batch
    val_split: Batch
    test_split: Batch
    student: torch.nn.Module
    student_init: str | None
    resumed_from_epoch: int | None
    preflight: PreflightReport

    def __init__(self, inputs: RecipeInputs, events: RecipeEvents | None = None) -> None:
        self.inputs = inputs
        self.events: RecipeEvents = events or SilentEvents()
        self.spec = inputs.spec
        self.weights = [w for _, w in inputs.spec.teacher_weights]
        # Every teacher of an ensemble shares its inputs and classes (checked at submission).
        self.signature = inputs.teachers[0].signature
        self.backends: list[TeacherBackend] = []
        self.dataset_digest = ""
        self.per_teacher: list[dict[str, np.ndarray]] = []
        self.cache_hits: list[bool] = []
        self.truncated = 0
        self.online_teacher: OnlineTeacher | None = None

    def run(self) -> RecipeOutput:
        self.events.phase(JobPhase.VALIDATING)
        self.prepare()
        self.events.phase(JobPhase.TEACHER_OUTPUTS)
        self.teacher_outputs()
        self.events.phase(JobPhase.TRAINING)
        outcome = self.train()
        if outcome.stopped:
            raise Cancelled(self.inputs.job_id)
        self.events.phase(JobPhase.EVALUATING)
        result = self.evaluate(outcome)
        self.events.phase(JobPhase.EXPORTING)
        return self.export(result)

    def prepare(self) -> None:
        """Open the teachers, run the preflight (which may settle their scores), check the data
        against the teacher's signature, describe the student.

        Raises:
            PreflightFailed: the student would be meaningless (its ``code`` says why).
            JobFailure: ``shape_mismatch``.
        """
        records = self.inputs.data
        first = self.inputs.teachers[0]
        # The scores the preflight will settle on, if the upload could not tell which they are.
        signature = settle_scores(
            first.signature, list(first.feature_layers), first.choice, len(records.classes)
        )[0]
        try:
            check_compatible(signature, records.signature, field="dataset")
        except SignatureMismatch as e:
            raise JobFailure("shape_mismatch", e.detail) from e
        self.backends = [t.open(self.inputs.device) for t in self.inputs.teachers]
        self.data = self.tokenize(records) if isinstance(records, TextRecords) else records
        data = self.data
        if self.inputs.preflight is not None:
            self.preflight = self.inputs.preflight
        else:
            checked = [
                PreflightTeacher(t.id, backend, t.choice, list(t.feature_layers))
                for t, backend in zip(self.inputs.teachers, self.backends, strict=True)
            ]
            self.preflight = run_preflight(checked, data, stage="worker")
            self.events.preflight(self.preflight, checked)
        self.signature = self.backends[0].signature
        self.student_signature = student_signature(self.signature, records.signature)

    def tokenize(self, records: TextRecords) -> DatasetArrays:
        """The records tokenised with the teacher's tokenizer (an ensemble's teachers must
        share it), truncated to its ``max_length``.

        Raises:
            JobFailure: ``tokenizer_mismatch``, an ensemble's teachers tokenise differently.
        """
        try:
            tokenizer, preprocessing = shared_tokenizer(self.backends)
        except ValueError as e:
            raise JobFailure("tokenizer_mismatch", str(e)) from e
        data, self.truncated = cached_tokenize_records(
            records, tokenizer, preprocessing, self.inputs.token_cache_dir
        )
        return data

    def labels(self, y: np.ndarray) -> np.ndarray:
        """Dataset labels as teacher classes (mapped by name when the two name them apart)."""
        mapping = self.preflight.label_map
        return y if mapping is None else np.asarray(mapping, dtype=np.int64)[y]

    def teacher_inputs(self, x: ModelInputs, backend: TeacherBackend) -> ModelInputs:
        """The dataset's inputs as ``backend``'s teacher declared it takes them."""
        preprocessing = backend.signature.preprocessing
        return teacher_inputs(x, self.data.preprocessing, preprocessing)

    def teacher_outputs(self) -> None:
        """Each teacher's logits on the train and test inputs (cached by content), mixed into one
        teacher for an ensemble; then the train/validation/test batches."""
        data, training = self.data, self.spec.training
        self.dataset_digest = data.digest()
        self.per_teacher, self.cache_hits = [], []
        for record, backend in zip(self.inputs.teachers, self.backends, strict=True):
            run = partial(backend.logits, on_batch=self.events.keep_alive)
            splits = {
                "train": self.teacher_inputs(data.x_train, backend),
                "test": self.teacher_inputs(data.x_test, backend),
            }
            if self.inputs.cache_dir is None:
                logits, hit = {name: run(x) for name, x in splits.items()}, False
            else:
                # What the logits depend on besides the file and the data: which output, of
                # which kind, fed how.
                scores = backend.signature.scores
                variant = f"{scores.name}:{scores.kind}:{backend.signature.preprocessing}"
                logits, hit = cached_teacher_logits(
                    self.inputs.cache_dir,
                    cache_key(record.sha256, self.dataset_digest, variant),
                    splits,
                    run,
                    max_bytes=self.inputs.cache_max_bytes,
                )
            for split, values in logits.items():
                refuse_non_finite(values, record.id, f"{split} samples")
            self.per_teacher.append(logits)
            self.cache_hits.append(hit)
        temperature = self.spec.distillation.teacher_temperature
        mixed = {
            split: ensemble_logits([t[split] for t in self.per_teacher], self.weights, temperature)
            for split in ("train", "test")
        }
        # Label-free: on an unlabelled transfer set the teacher's top-1 predictions stand in for
        # labels (for the cross-entropy terms and for choosing the best epoch).
        y_train = (
            mixed["train"].argmax(axis=1) if data.y_train is None else self.labels(data.y_train)
        )
        train_arrays, val_arrays = split_validation(
            data.x_train, y_train, mixed["train"], training.seed
        )
        device = self.inputs.device
        self.train_split = to_batch(train_arrays, self.signature, device)
        self.val_split = to_batch(val_arrays, self.signature, device)
        self.test_split = to_batch(
            (data.x_test, self.labels(data.y_test), mixed["test"]), self.signature, device
        )

    def build_student(self) -> torch.nn.Module:
        """A fresh student (arrays: its standardisation fitted on the training split; text:
        started from the teacher's weights where its spec says so)."""
        torch.manual_seed(self.spec.training.seed)
        text = is_text(self.student_signature)
        student = build_student(
            self.spec.student,
            self.student_signature,
            fit_inputs=None if text else self.train_split.x,
        )
        self.student_init = None
        if text:
            # (a student started at random reads no weights: an ONNX teacher has none to give)
            weights = self.backends[0].weights() if needs_teacher_weights(self.spec.student) else {}
            self.student_init = init_from_teacher(student, self.spec.student, weights)
        student = student.to(self.inputs.device)
        family_of(self.spec.student).apply_memory_format(student)
        return student

    def _feature_loss(
        self, method: FeatureMethod, student: torch.nn.Module
    ) -> tuple[torch.nn.Module, FeatureTap]:
        """What a feature method adds: the teacher's outputs at its layers for the training
        split (computed once: the inputs never change, and stored on the batch), the loss with
        adapters sized for each layer pair, and a tap on the student's layers."""
        assert method.layers is not None  # resolved at submission
        device = self.inputs.device
        features = self.backends[0].features(
            self.teacher_inputs(model_inputs(self.train_split), self.backends[0]),
            [pair.teacher for pair in method.layers],
            on_batch=self.events.keep_alive,
        )
        student_shapes = {
            layer.name: tuple(layer.shape)
            for layer in feature_layers(self.spec.student, self.student_signature)
        }
        student_paths = [pair.student for pair in method.layers]
        loss_fn = build_loss(
            method,
            [
                (student_shapes[path], f.shape[1:])
                for path, f in zip(student_paths, features, strict=True)
            ],
        ).to(device)
        self.train_split = dataclasses.replace(
            self.train_split,
            teacher_features=tuple(torch.from_numpy(f).to(device) for f in features),
        )
        # Paths name modules of the architecture, after the student's input standardisation.
        return loss_fn, FeatureTap(student, student_paths, root=architecture_of(student))

    def _text_feature_loss(
        self, method: TextFeatureMethod, student: torch.nn.Module
    ) -> tuple[torch.nn.Module, TransformerTap, Callable[[Batch], list[torch.Tensor]]]:
        """What a text feature method adds: the loss (adapters sized from both models' widths),
        a tap on the student's hidden states or attentions, and the teacher run beside it on
        every batch for its own."""
        assert method.layers is not None  # resolved at submission
        backend = self.backends[0]
        if not isinstance(backend, HuggingFaceTeacher):
            raise JobFailure(
                "teacher_unsupported", "Text feature methods need a Hugging Face teacher."
            )
        teacher = backend.model
        if isinstance(method, AttentionKL):
            from transformers import PreTrainedModel

            assert isinstance(teacher, PreTrainedModel)
            teacher.set_attn_implementation("eager")  # attention weights as tensors
        widths = {
            side: {layer.name: layer.shape for layer in layers}
            for side, layers in (
                ("student", feature_layers(self.spec.student, self.student_signature)),
                ("teacher", transformer_layers(*_teacher_sizes(self.inputs.teachers[0]))),
            )
        }
        shapes = [
            (tuple(widths["student"][p.student]), tuple(widths["teacher"][p.teacher]))
            for p in method.layers
        ]
        loss_fn = build_loss(method, shapes).to(self.inputs.device)
        names = [t.name for t in self.student_signature.inputs]
        teacher_names = [p.teacher for p in method.layers]

        def teacher_features(batch: Batch) -> list[torch.Tensor]:
            with torch.no_grad():
                feed = {name: batch.inputs[name] for name in names}
                return transformer_outputs(teacher, feed, teacher_names)[1]

        student_names = [p.student for p in method.layers]
        return loss_fn, TransformerTap(student, student_names, names), teacher_features

    def augment_step(self) -> Callable[[Batch, int], tuple[Batch, Mix | None]] | None:
        """With ``training.augmentation``: what the loop does to each training batch, augment
        its images (``worker.augment``) and run the teacher on them (``OnlineTeacher``), since
        cached logits describe the stored images only. None without augmentation: the teacher's
        outputs on the stored training inputs, computed once, are used (``cached``).

        Throughput: online teaching costs a teacher forward pass per training step (and a copy
        of the batch to the host and back), on top of the student's forward and backward.

        Raises:
            JobFailure: ``augmentation_unsupported``, a feature method or non-image inputs
                (refused at submission; a job stored before that check).
        """
        config = self.spec.training.augmentation
        if config is None:
            return None
        x = self.train_split.inputs
        if (
            isinstance(self.spec.distillation, FeatureMethod)
            or len(x) != 1
            or self.train_split.x.ndim != 4
        ):
            raise JobFailure(
                "augmentation_unsupported",
                "Augmentation takes image inputs [C, H, W] and a logit method (e.g. `kd`).",
            )
        stored = self.data.x_train
        assert isinstance(stored, np.ndarray)
        preprocessing = self.data.preprocessing
        augmenter = Augmenter(
            config,
            self.spec.training.seed,
            value_range=(float(stored.min()), float(stored.max())),
            channel_order=preprocessing.channel_order
            if isinstance(preprocessing, ImagePreprocessing)
            else "RGB",
        )
        teacher = OnlineTeacher(
            self.inputs.teachers,
            self.backends,
            preprocessing,
            self.weights,
            self.spec.distillation.teacher_temperature,
        )
        self.online_teacher = teacher
        (name,) = x  # the one input the teacher and the student take

        def step(batch: Batch, global_step: int) -> tuple[Batch, Mix | None]:
            x, mix = augmenter(batch.x, batch.labels, global_step)
            augmented = dataclasses.replace(batch, inputs={name: x}, teacher_logits=teacher(x))
            return augmented, mix

        return step

    def train(self) -> LoopOutcome:
        """Build the student and its loss, then run the loop (resuming from the checkpoint)."""
        self.student = self.build_student()
        method = self.spec.distillation
        tap: FeatureTap | TransformerTap | None = None
        teacher_tap = None
        if isinstance(method, TextFeatureMethod):
            loss_fn, tap, teacher_tap = self._text_feature_loss(method, self.student)
        elif isinstance(method, FeatureMethod):
            loss_fn, tap = self._feature_loss(method, self.student)
        else:
            loss_fn = build_loss(method)
        augment = self.augment_step()
        checkpoint = self.inputs.checkpoint
        resume = None if checkpoint is None else load_checkpoint(checkpoint)
        self.resumed_from_epoch = None if resume is None else resume.epoch
        self.events.resumed(self.resumed_from_epoch or 0)
        device = self.inputs.device
        outcome = train(
            self.student,
            loss_fn,
            self.train_split,
            self.val_split,
            self.spec.training,
            _LoopCallbacks(self.events, checkpoint),
            resume=resume,
            # bf16 autocast on CUDA: matmuls on tensor cores; losses upcast to float32 themselves.
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
            student_tap=tap,
            teacher_tap=teacher_tap,
            augment=augment,
        )
        if tap is not None:
            tap.remove()  # evaluation and export see the plain student
        self.student.load_state_dict(outcome.state.best_state)
        return outcome

    def evaluate(self, outcome: LoopOutcome) -> JobResult:
        """The best student and the teacher on the test split (export figures still unset).

        Raises:
            PreflightFailed: ``teacher_below_chance`` on the whole test split (the preflight saw
                a sample).
        """
        test = self.test_split
        num_classes = self.signature.num_classes
        student_logits = predict_logits(self.student, test)
        student_test = logit_metrics(student_logits, test.teacher_logits, test.labels)
        teacher_test = logit_metrics(test.teacher_logits, test.teacher_logits, test.labels)
        chance = torch.bincount(test.labels).max().item() / len(test)
        if teacher_test["accuracy"] <= chance and teacher_test["accuracy"] < 1:
            raise PreflightFailed(
                f"The teacher gets {teacher_test['accuracy']:.1%} of the {len(test)} test samples "
                f"right, no better than chance ({chance:.1%}: always answering the most frequent "
                "label); a student distilled from it means nothing. Check that the test labels "
                "index the teacher's classes.",
                code="teacher_below_chance",
            )
        student_parameters = parameter_count(self.student)
        teacher_parameters = sum(t.parameter_count for t in self.inputs.teachers)
        return JobResult(
            student_accuracy=student_test["accuracy"],
            teacher_accuracy=teacher_test["accuracy"],
            accuracy_retained=100.0 * student_test["accuracy"] / teacher_test["accuracy"]
            if teacher_test["accuracy"]
            else None,
            agreement=student_test["agreement"],
            kl_to_teacher=student_test["kl_to_teacher"],
            student_ece=student_test["ece"],
            teacher_ece=teacher_test["ece"],
            student_per_class_accuracy=per_class_accuracy(student_logits, test.labels, num_classes),
            teacher_per_class_accuracy=per_class_accuracy(
                test.teacher_logits, test.labels, num_classes
            ),
            student_parameters=student_parameters,
            teacher_parameters=teacher_parameters,
            compression_ratio=teacher_parameters / student_parameters,
            teachers=[
                TeacherScore(
                    id=record.id,
                    weight=weight,
                    accuracy=accuracy(torch.from_numpy(logits["test"]), test.labels.cpu()),
                )
                for record, weight, logits in zip(
                    self.inputs.teachers, self.weights, self.per_teacher, strict=True
                )
            ],
            warnings=training_warnings(outcome, self.spec.training.epochs)
            + self.truncation_warnings(),
            student_init=self.student_init,
            truncated_records=self.truncated if isinstance(test.lengths, torch.Tensor) else None,
            best_epoch=outcome.state.best_epoch,
            best_val_accuracy=outcome.state.best_val_accuracy,
            epochs_run=outcome.state.epoch,
            early_stopped=outcome.early_stopped,
            resumed_from_epoch=self.resumed_from_epoch,
            teacher_outputs_cached=all(self.cache_hits),
            teacher_outputs="cached" if self.online_teacher is None else "online",
            online_teacher_seconds=None
            if self.online_teacher is None
            else self.online_teacher.seconds,
            teacher_fixed_batch=next((b.fixed_batch for b in self.backends if b.fixed_batch), None),
            label_free=self.inputs.data.y_train is None,
            train_samples=len(self.train_split),
            val_samples=len(self.val_split),
            test_samples=len(test),
            device=str(self.inputs.device),
            cpu_threads=torch.get_num_threads(),
        )

    def truncation_warnings(self) -> list[Finding]:
        """``texts_truncated`` when records were cut to the tokenizer's ``max_length``."""
        preprocessing = self.student_signature.preprocessing
        if not self.truncated or not isinstance(preprocessing, TextPreprocessing):
            return []
        total = len(self.data.x_train) + len(self.data.x_test)
        return [
            Finding(
                code="texts_truncated",
                detail=f"{self.truncated} of {total} records were longer than "
                f"{preprocessing.max_length} tokens and were cut there, for teacher and student "
                "alike (`/predict` cuts them the same way).",
            )
        ]

    def export_int8(
        self, float_latency_ms: float
    ) -> tuple[Path | None, dict[str, object], list[Finding]]:
        """The student quantised to int8 beside its float32 ONNX graph (``worker.quantize``):
        its path, its figures as ``JobResult`` fields, and warnings. Quantisation failing never
        fails the job: the int8 student is then skipped (no path, no figures) with an
        ``int8_skipped`` warning saying why."""
        float_path = self.inputs.artifact_dir / FILENAMES[ArtifactFormat.ONNX]
        path = self.inputs.artifact_dir / FILENAMES[ArtifactFormat.ONNX_INT8]
        try:
            figures = int8_student(
                float_path,
                path,
                family_of(self.spec.student).int8,
                self.student_signature,
                calibration=model_inputs(self.val_split),
                test_x=model_inputs(self.test_split),
                test_labels=self.test_split.labels.cpu().numpy(),
                float_latency_ms=float_latency_ms,
            )
        except Exception as e:
            log.warning("job %s: int8 quantisation failed", self.inputs.job_id, exc_info=True)
            path.unlink(missing_ok=True)
            warning = Finding(
                code="int8_skipped",
                detail=f"The student could not be quantised to int8 ({type(e).__name__}: {e}); "
                "only the float32 student was exported.",
            )
            return None, {}, [warning]
        return (
            path,
            {
                "int8_method": figures.method,
                "int8_accuracy": figures.accuracy,
                "int8_agreement": figures.agreement,
                "int8_latency_ms": figures.latency_ms,
                "int8_size_bytes": figures.size_bytes,
                "int8_speedup": figures.speedup,
            },
            [],
        )

    def export(self, result: JobResult) -> RecipeOutput:
        """Write the student (float32, and int8 unless quantisation fails), time it and the
        teacher alike (ONNX, one CPU thread), then the manifest with the complete figures."""
        directory = self.inputs.artifact_dir
        paths = write_student(directory, self.student, self.student_signature)
        student_latency = onnx_latency_ms(paths[ArtifactFormat.ONNX], self.student_signature)
        int8_path, int8_fields, int8_warnings = self.export_int8(student_latency)
        if int8_path is not None:
            paths[ArtifactFormat.ONNX_INT8] = int8_path
        # An ensemble answers once all its members have: their latencies add up.
        teacher_latency = sum(backend.latency_ms() for backend in self.backends)
        text_fields: dict[str, object] = {}
        tokenizer = self.backends[0].tokenizer
        if tokenizer is not None:
            paths[ArtifactFormat.TOKENIZER] = directory / FILENAMES[ArtifactFormat.TOKENIZER]
            paths[ArtifactFormat.TOKENIZER].write_text(tokenizer.to_str())
            text_fields = {
                "latency_tokens": LATENCY_TOKENS,
                "student_latency_batch32_ms": onnx_latency_ms(
                    paths[ArtifactFormat.ONNX], self.student_signature, batch=32
                ),
                "teacher_latency_batch32_ms": sum(b.latency_ms(batch=32) for b in self.backends),
            }
        result = result.model_copy(
            update={
                "student_size_bytes": paths[ArtifactFormat.ONNX].stat().st_size,
                "teacher_size_bytes": sum(t.size_bytes for t in self.inputs.teachers),
                "student_latency_ms": student_latency,
                "teacher_latency_ms": teacher_latency,
                "speedup": teacher_latency / student_latency,
                "wall_seconds": time.perf_counter() - self.inputs.started,
                **int8_fields,
                **text_fields,
                "warnings": [*result.warnings, *int8_warnings],
            }
        )
        paths[ArtifactFormat.MANIFEST] = write_manifest(
            directory,
            dict(paths),
            self.student_signature,
            {
                "job_id": self.inputs.job_id,
                "student": self.spec.student.model_dump(mode="json"),
                "metrics": result.model_dump(mode="json"),
                "teachers": [
                    {"id": t.id, "sha256": t.sha256, "format": t.format, "weight": w}
                    for t, w in zip(self.inputs.teachers, self.weights, strict=True)
                ],
                "dataset": {"ref": self.spec.dataset, "sha256": self.dataset_digest},
            },
        )
        return RecipeOutput(result, paths)


def _teacher_sizes(teacher: TeacherRecord) -> tuple[int, int, int]:
    """A Hugging Face teacher's layers, hidden size and heads, from its config."""
    config = teacher.architecture or {}
    return (
        int(config["num_hidden_layers"]),
        int(config["hidden_size"]),
        int(config["num_attention_heads"]),
    )


def training_warnings(outcome: LoopOutcome, epochs: int) -> list[Finding]:
    """``still_improving`` when the best validation accuracy came in the last of all the epochs
    asked for (after the first): the student was still learning when training stopped."""
    state = outcome.state
    if epochs > 1 and state.epoch == epochs and state.best_epoch == epochs:
        return [
            Finding(
                code="still_improving",
                detail=f"The best validation accuracy came in the last epoch ({epochs}): the "
                "student was still improving. More `training.epochs` would likely give a better "
                "one.",
            )
        ]
    return []


class _LoopCallbacks:
    """The loop's callbacks: the recipe's events, and every epoch's state saved to
    ``checkpoint`` (safetensors, atomically) when there is one."""

    def __init__(self, events: RecipeEvents, checkpoint: Path | None) -> None:
        self.events, self.checkpoint = events, checkpoint

    def progress(self, fraction: float) -> None:
        self.events.progress(fraction)

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        """Raises ``JobFailure`` (``non_finite_loss``) when a training term diverged: its figures
        would be stored as null, and the weights are no longer usable."""
        diverged = sorted(
            k for k, v in values.items() if k.startswith("train_") and not isfinite(v)
        )
        if diverged:
            raise JobFailure(
                "non_finite_loss",
                f"Training diverged in epoch {epoch}: {', '.join(diverged)} became NaN or "
                "infinite. Lower `training.learning_rate`, or set `training.grad_clip_norm`.",
            )
        self.events.epoch_end(epoch, values)

    def should_stop(self) -> bool:
        return self.events.should_stop()

    def save_checkpoint(self, state: LoopState) -> None:
        if self.checkpoint is not None:
            save_checkpoint(state, self.checkpoint)
