// The jobs list: GET /v1/jobs, polled while any job is still going.
"use strict";

const BUSY_POLL_MS = 1500;
const IDLE_POLL_MS = 10000;

function teacherOf(job) {
  const spec = job.spec || {};
  if (Array.isArray(spec.teachers)) return spec.teachers.map((t) => t.id).join(", ");
  return job.teacher_id || spec.teacher || "–";
}

function jobRow(job) {
  const progress = el("progress", { max: "1", value: String(job.progress || 0) });
  const student = (job.spec && job.spec.student && job.spec.student.architecture) || "–";
  const accuracy = job.result ? fmtPercent(job.result.student_accuracy) : "–";
  return el(
    "tr",
    { dataset: { jobId: job.id, status: job.status } },
    el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}` }, el("code", {}, job.id))),
    el("td", {}, badge(job.status)),
    el("td", {}, job.phase),
    el("td", {}, progress, " ", `${Math.round(100 * (job.progress || 0))} %`),
    el("td", {}, teacherOf(job)),
    el("td", {}, job.dataset),
    el("td", {}, student),
    el("td", {}, accuracy),
    el("td", {}, fmtTime(job.created_at)),
  );
}

async function refresh() {
  const error = document.getElementById("error");
  let busy = false;
  try {
    const page = await api("/v1/jobs?limit=100");
    const body = document.querySelector("#jobs tbody");
    body.replaceChildren(...page.items.map(jobRow));
    busy = page.items.some((job) => !TERMINAL.has(job.status));
    document.getElementById("summary").textContent =
      page.total === 0
        ? "No jobs yet: submit one with POST /v1/jobs."
        : `${page.total} job${page.total === 1 ? "" : "s"}${page.total > page.items.length ? `, the newest ${page.items.length} shown` : ""}.`;
    error.hidden = true;
  } catch (e) {
    showError(error, e);
  }
  setTimeout(refresh, busy ? BUSY_POLL_MS : IDLE_POLL_MS);
}

refresh();
