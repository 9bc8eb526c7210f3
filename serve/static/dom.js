// Small DOM helpers shared by the views: h() builds an element, and the figures a run shows are formatted once here.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child);
  }
  return el;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export const number = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
export const memory = (gib) => (gib === null || gib === undefined ? "–" : `${Number(gib).toFixed(2)} GiB`);
export const progress = (job) => (job.total_steps ? `${job.step ?? 0} / ${job.total_steps}` : "–");

// The live numbers of a job as a definition list: status, step / total, ETA, loss, peak memory.
export function liveNumbers(job) {
  const items = [["Status", job.status + (job.error ? `: ${job.error}` : "")], ["Step", progress(job)],
    ["ETA", job.status === "running" ? duration(job.eta_s) : "–"], ["Loss", number(job.loss)],
    ["Peak memory", memory(job.peak_memory_gib)]];
  return h("dl", { class: "live" }, items.map(([k, v]) => h("div", {}, h("dt", { text: k }), h("dd", { text: v, "data-field": k }))));
}

export const ENDED = ["finished", "failed", "stopped", "cancelled"];
