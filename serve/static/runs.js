// The runs list: every job with its live numbers, polled while it is on screen.
import { api } from "./api.js";
import { duration, h, memory, number, progress } from "./dom.js";

const POLL_MS = 1500;

const COLUMNS = ["Run", "Kind", "Status", "Step", "ETA", "Loss", "Peak memory"];

function row(job) {
  const cells = [h("a", { href: `#/jobs/${job.id}`, text: `${job.id} ${job.name}` }), job.kind, job.status, progress(job),
    job.status === "running" ? duration(job.eta_s) : "–", number(job.loss), memory(job.peak_memory_gib)];
  // data-label: a narrow screen shows each row as a card of "Label: value" lines (style.css)
  return h("tr", { "data-job": job.id }, cells.map((c, i) => h("td", { "data-label": COLUMNS[i], class: i === 2 ? `status ${job.status}` : null }, c)));
}

export async function showRuns(view, signal) {
  const body = h("tbody");
  const empty = h("p", { text: "No runs yet: start one from New run.", hidden: true });
  view.append(h("h1", { text: "Runs" }), empty,
    h("div", { class: "scroll" }, h("table", { class: "runs" },
      h("caption", { class: "hint", text: "Every job on this server, live" }),
      h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", { scope: "col", text: t })))),
      body)));
  while (!signal.aborted) {
    const { jobs } = await api("/jobs");
    if (signal.aborted) return;
    body.replaceChildren(...jobs.slice().reverse().map(row));
    empty.hidden = jobs.length > 0;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}
