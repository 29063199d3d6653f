// The jobs list: GET /v1/jobs, polled while any job is still going (and with a key, if one is
// needed: after a 401 it waits for one to be saved).
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

// Each refresh supersedes the one before (a key saved meanwhile starts a new one at once).
let generation = 0;
let timer = null;

async function refresh() {
  clearTimeout(timer);
  generation += 1;
  const mine = generation;
  const error = document.getElementById("error");
  let busy = false;
  try {
    const page = await api("/v1/jobs?limit=100");
    if (mine !== generation) return;
    const body = document.querySelector("#jobs tbody");
    body.replaceChildren(...page.items.map(jobRow));
    busy = page.items.some((job) => !TERMINAL.has(job.status));
    document.getElementById("summary").textContent =
      page.total === 0
        ? "No jobs yet: submit one with POST /v1/jobs."
        : `${page.total} job${page.total === 1 ? "" : "s"}${page.total > page.items.length ? `, the newest ${page.items.length} shown` : ""}.`;
    hideError(error);
  } catch (e) {
    if (mine !== generation) return;
    showError(error, e);
    if (needsKey(e)) {
      // Nothing to show without a key: no more polling until one is saved.
      document.querySelector("#jobs tbody").replaceChildren();
      document.getElementById("summary").textContent = "An API key is needed to list the jobs.";
      return;
    }
  }
  timer = setTimeout(refresh, busy ? BUSY_POLL_MS : IDLE_POLL_MS);
}

onKeyChange(refresh);
refresh();
