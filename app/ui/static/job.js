// One job: GET /v1/jobs/{id}, then its server-sent events (/v1/jobs/{id}/events, read over fetch
// by common.js's eventStream so that they carry the API key) feed the status, the progress and
// the curves; the result brings the comparison, the per-class accuracy, the downloads (fetched
// with the key) and the predict form. Charts: uPlot (vendored, see NOTICE.uPlot.txt).
"use strict";

const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const jobPath = `/v1/jobs/${encodeURIComponent(jobId)}`;
// A predict form prefilled with zeros only up to this many numbers per sample.
const MAX_PREFILL = 4096;

const LOSS_SERIES = [
  ["train_loss", "total", "#2f6fdf"],
  ["train_kd_loss", "distillation", "#e07b2a"],
  ["train_ce_loss", "cross-entropy", "#1f8a4c"],
];
const ACCURACY_SERIES = [
  ["val_accuracy", "student", "#2f6fdf"],
  ["teacher_val_accuracy", "teacher", "#6b7385"],
  ["val_agreement", "agreement", "#b04fc4"],
];

// epoch -> that epoch's metrics values; a retried job's rewritten epoch replaces the old one.
const epochs = new Map();
const charts = {};
let stream = null;
// The result's extras (manifest: per-class names, downloads, predict) once loaded.
let resultLoaded = false;
let manifestLoading = null;
// The student's signature (from the manifest) once the predict form is set up.
let predictSignature = null;

function chartData(series, log) {
  const xs = [...epochs.keys()].sort((a, b) => a - b);
  const present = series.filter(([key]) => xs.some((x) => typeof epochs.get(x)[key] === "number"));
  const columns = present.map(([key]) =>
    xs.map((x) => {
      const value = epochs.get(x)[key];
      // A log scale has no place for zero: such a point is left out of the line.
      return typeof value === "number" && (!log || value > 0) ? value : null;
    }),
  );
  return { present, data: [xs, ...columns] };
}

function drawChart(id, series, yLabel, log) {
  const container = document.getElementById(id);
  const { present, data } = chartData(series, log);
  container.dataset.points = String(data[0].length);
  if (present.length === 0) return;
  const names = present.map(([key]) => key).join(",");
  const chart = charts[id];
  if (chart && chart.names === names) {
    chart.plot.setData(data);
    return;
  }
  if (chart) chart.plot.destroy();
  const options = {
    width: Math.max(300, container.clientWidth - 4),
    height: 240,
    // Losses fall by orders of magnitude: a log scale keeps the late epochs readable.
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [
      { label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500], values: (u, ticks) => ticks.map(String) },
      { label: yLabel, size: 60 },
    ],
    legend: { live: false },
    series: [
      { label: "epoch" },
      ...present.map(([, label, color]) => ({
        label,
        stroke: color,
        width: 2,
        points: { show: true, size: 5 },
      })),
    ],
  };
  charts[id] = { names, plot: new uPlot(options, data, container) };
}

function drawCharts() {
  drawChart("loss-chart", LOSS_SERIES, "loss (log scale)", true);
  drawChart("accuracy-chart", ACCURACY_SERIES, "accuracy", false);
  const last = Math.max(0, ...epochs.keys());
  const total = document.body.dataset.epochs;
  document.getElementById("epoch").textContent = last ? `epoch ${last}${total ? ` / ${total}` : ""}` : "";
}

function showStatus(status, phase) {
  document.getElementById("status").replaceWith(
    Object.assign(badge(status), { id: "status" }),
  );
  document.body.dataset.status = status;
  document.getElementById("phase").textContent = phase || "";
  document.getElementById("cancel").hidden = TERMINAL.has(status) || status === "cancelling";
}

function showProgress(fraction) {
  document.getElementById("progress").value = fraction;
  document.getElementById("progress-text").textContent = `${Math.round(100 * fraction)} %`;
}

function showSpec(job) {
  const spec = job.spec || {};
  const teachers = Array.isArray(spec.teachers)
    ? spec.teachers.map((t) => `${t.id} ×${t.weight}`).join(", ")
    : job.teacher_id || spec.teacher;
  const student = spec.student || {};
  const training = spec.training || {};
  const method = (spec.distillation && spec.distillation.method) || "kd";
  document.body.dataset.epochs = training.epochs ? String(training.epochs) : "";
  document.getElementById("spec").textContent =
    `Teacher ${teachers} → ${student.architecture || "?"} student on ${job.dataset}; ` +
    `method ${method}; ${training.epochs || "?"} epochs; created ${fmtTime(job.created_at)}.`;
}

function comparisonRows(r) {
  const ratio = (a, b) => (typeof a === "number" && typeof b === "number" && b > 0 ? a / b : null);
  const times = (x) => (typeof x === "number" ? `×${fmtNumber(x, 1)}` : "–");
  const ms = (x) => (typeof x === "number" ? `${fmtNumber(x, 3)} ms` : "–");
  const retained = (x) => (typeof x === "number" ? `${fmtNumber(x, 1)} %` : "–");
  const int8Retained = ratio(r.int8_accuracy, r.teacher_accuracy);
  return [
    ["Accuracy (test)", fmtPercent(r.teacher_accuracy), fmtPercent(r.student_accuracy), fmtPercent(r.int8_accuracy)],
    ["Accuracy retained", "100 %", retained(r.accuracy_retained), retained(int8Retained === null ? null : 100 * int8Retained)],
    ["Agreement", "–", `${fmtPercent(r.agreement)} with teacher`, r.int8_agreement == null ? "–" : `${fmtPercent(r.int8_agreement)} with float32`],
    ["Parameters", fmtNumber(r.teacher_parameters, 0), fmtNumber(r.student_parameters, 0), "–"],
    ["Compression", "–", times(r.compression_ratio), "–"],
    ["Size (ONNX)", fmtBytes(r.teacher_size_bytes), fmtBytes(r.student_size_bytes), fmtBytes(r.int8_size_bytes)],
    ["Latency", ms(r.teacher_latency_ms), ms(r.student_latency_ms), ms(r.int8_latency_ms)],
    ["Speedup over teacher", "–", times(r.speedup), times(ratio(r.teacher_latency_ms, r.int8_latency_ms))],
    ["Calibration error (ECE)", fmtNumber(r.teacher_ece, 4), fmtNumber(r.student_ece, 4), "–"],
  ];
}

function showComparison(r) {
  const rows = comparisonRows(r).map(([name, ...cells]) =>
    el("tr", {}, el("th", {}, name), ...cells.map((cell) => el("td", {}, cell))),
  );
  document.querySelector("#comparison tbody").replaceChildren(...rows);
  const notes = [
    `Best epoch ${r.best_epoch} of ${r.epochs_run ?? "?"}${r.early_stopped ? " (stopped early)" : ""}`,
    `${r.train_samples} train / ${r.val_samples} validation / ${r.test_samples} test samples`,
    `trained on ${r.device}`,
    typeof r.wall_seconds === "number" ? `in ${fmtNumber(r.wall_seconds, 1)} s` : null,
    r.int8_method ? `int8: ${r.int8_method} quantisation` : "int8: not quantised",
  ];
  document.getElementById("result-notes").textContent = `${notes.filter(Boolean).join("; ")}.`;
  document.getElementById("warnings").replaceChildren(
    ...(r.warnings || []).map((w) => el("li", {}, el("code", {}, w.code), " ", w.detail)),
  );
}

function showPerClass(r, classes) {
  const student = r.student_per_class_accuracy || [];
  const teacher = r.teacher_per_class_accuracy || [];
  const rows = student.map((accuracy, i) => {
    const width = typeof accuracy === "number" ? Math.round(120 * accuracy) : 0;
    const bar = el("span", { className: "bar" });
    bar.style.width = `${width}px`;
    return el(
      "tr",
      {},
      el("td", {}, classes && classes[i] !== undefined ? classes[i] : String(i)),
      el("td", {}, fmtPercent(teacher[i])),
      el("td", {}, fmtPercent(accuracy)),
      el("td", {}, bar),
    );
  });
  document.querySelector("#per-class tbody").replaceChildren(...rows);
}

function showDownloads(r, preprocessing) {
  const formats = [
    ["onnx", "Student, ONNX (float32)"],
    ["onnx_int8", "Student, ONNX int8", r.int8_size_bytes != null],
    ["safetensors", "Student weights, safetensors"],
    ["manifest", "Manifest (signature, metrics, provenance)"],
    ["tokenizer", "Tokenizer", preprocessing.kind === "text"],
  ];
  const items = formats
    .filter(([, , shown]) => shown !== false)
    .map(([format, label]) => {
      const href = `${jobPath}/artifact?format=${format}`;
      const link = el("a", { href, download: "", dataset: { format } }, label);
      // A plain link cannot send the key: fetched with it, then saved under the server's name.
      link.addEventListener("click", async (event) => {
        event.preventDefault();
        if (link.dataset.state === "downloading") return;
        link.dataset.state = "downloading";
        try {
          link.dataset.file = await download(href, `${jobId}-${format}`);
          link.dataset.state = "done";
        } catch (e) {
          link.dataset.state = "failed";
          showError(document.getElementById("error"), e);
        }
      });
      return el("li", {}, link);
    });
  document.getElementById("downloads").replaceChildren(...items);
}

function zeros(shape) {
  if (shape.length === 0) return 0;
  return Array.from({ length: shape[0] }, () => zeros(shape.slice(1)));
}

function setUpPredict(signature) {
  predictSignature = signature;
  const preprocessing = signature.preprocessing || { kind: "tensor" };
  const input = document.getElementById("predict-input");
  const hint = document.getElementById("predict-hint");
  if (preprocessing.kind === "text") {
    hint.textContent = preprocessing.pairs
      ? "One record: the text on the first line, its pair on the second"
      : "One record: a text";
  } else {
    const spec = signature.inputs[0];
    const shape = spec.shape.map((d) => (typeof d === "number" ? d : 1));
    hint.textContent = `One sample as JSON, shaped [${spec.shape.join(", ")}] (input "${spec.name}")`;
    const size = shape.reduce((a, b) => a * b, 1);
    if (!input.value && size <= MAX_PREFILL) input.value = JSON.stringify(zeros(shape));
  }
}

async function predict(event) {
  event.preventDefault();
  if (!predictSignature) return;
  const preprocessing = predictSignature.preprocessing || { kind: "tensor" };
  const input = document.getElementById("predict-input");
  const output = document.getElementById("predict-output");
  const button = document.getElementById("predict-submit");
  output.className = "";
  let sample;
  try {
    if (preprocessing.kind === "text") {
      const lines = input.value.split("\n");
      sample = preprocessing.pairs ? [lines[0], lines.slice(1).join("\n")] : input.value;
    } else {
      sample = JSON.parse(input.value);
    }
  } catch (e) {
    output.className = "error";
    output.textContent = `Not JSON: ${e.message}`;
    return;
  }
  button.disabled = true;
  try {
    const answer = await api(`${jobPath}/predict`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ inputs: [sample] }),
    });
    const probability = Math.max(...answer.probabilities[0]);
    output.dataset.label = answer.labels[0];
    output.textContent = `Predicted: ${answer.labels[0]} (probability ${fmtPercent(probability)})`;
  } catch (e) {
    output.className = "error";
    output.textContent = e.message;
    if (needsKey(e)) showError(document.getElementById("error"), e);
  } finally {
    button.disabled = false;
  }
}

function showResult(result) {
  showComparison(result);
  document.getElementById("results").hidden = false;
  // The manifest once (a replayed stream's result again only after it failed, e.g. with a 401).
  if (resultLoaded || manifestLoading) return;
  manifestLoading = (async () => {
    try {
      const manifest = await api(`${jobPath}/artifact?format=manifest`);
      const signature = manifest.signature;
      showPerClass(result, signature.outputs[0].classes);
      showDownloads(result, signature.preprocessing || {});
      setUpPredict(signature);
      resultLoaded = true;
    } catch (e) {
      showPerClass(result, null);
      showError(document.getElementById("error"), e);
    } finally {
      manifestLoading = null;
    }
  })();
}

const EVENT_HANDLERS = {
  status: (data) => showStatus(data.status, data.phase),
  progress: (data) => showProgress(data.progress),
  metrics: (data) => {
    epochs.set(data.epoch, data.values);
    drawCharts();
  },
  preflight: () => {},
  result: (result) => showResult(result),
  // The job's own error event (the connection's troubles are the stream's state, not events).
  error: (error) => {
    showError(document.getElementById("error"), `${error.code || "error"}: ${error.detail || JSON.stringify(error)}`);
  },
  end: (data) => {
    showStatus(data.status, data.status === "succeeded" ? "done" : "");
    if (data.status === "succeeded") showProgress(1);
    if (stream) stream.close();
  },
};

function follow() {
  if (stream) stream.close();
  const own = eventStream(`${jobPath}/events`, {
    onEvent: (event) => {
      const handle = EVENT_HANDLERS[event.type];
      if (handle) handle(JSON.parse(event.data));
    },
    // connecting, open, reconnecting, closed or failed (a closed stream's last word too)
    onState: (state) => {
      if (stream === own) document.body.dataset.stream = state;
    },
    onFailure: (error) => showError(document.getElementById("error"), error),
  });
  stream = own;
}

// The job, then its events; again after a key was saved or forgotten (the last load wins).
let loads = 0;

async function load() {
  if (stream) stream.close();
  stream = null;
  loads += 1;
  const mine = loads;
  const error = document.getElementById("error");
  try {
    const job = await api(jobPath);
    if (mine !== loads) return;
    hideError(error);
    showSpec(job);
    showStatus(job.status, job.phase);
    showProgress(job.progress);
  } catch (e) {
    if (mine === loads) showError(error, e);
    return;
  }
  follow();
}

function main() {
  document.getElementById("job-id").textContent = jobId;
  document.title = `Distill: job ${jobId}`;
  document.getElementById("cancel").addEventListener("click", async () => {
    try {
      const job = await api(`${jobPath}/cancel`, { method: "POST" });
      showStatus(job.status, job.phase);
    } catch (e) {
      showError(document.getElementById("error"), e);
    }
  });
  document.getElementById("predict-form").addEventListener("submit", predict);
  window.addEventListener("resize", () => {
    for (const [id, chart] of Object.entries(charts)) {
      const width = Math.max(300, document.getElementById(id).clientWidth - 4);
      chart.plot.setSize({ width, height: 240 });
    }
  });
  onKeyChange(load);
  load();
}

main();
