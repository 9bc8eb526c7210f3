// A training run's page: its live numbers, the loss chart, the previews by epoch and prompt as they are written, the
// epoch files with download links, and the Stop / Save now / Preview now / Resume buttons.
import { api, downloadLink, fileUrl, follow, showFile } from "./api.js";
import { lossChart } from "./chart.js";
import { ENDED, h, liveNumbers } from "./dom.js";
import { showGridJob } from "./grid.js";

const POLL_MS = 2000;
const PREVIEW = /-(e(\d+)|step(\d+))-(\d+)\.png$/; // <name>-e000002-00.png after an epoch, <name>-step00000012-00.png now

function previewGroup(groups, container, name) {
  const m = name.match(PREVIEW);
  const label = m[2] ? `epoch ${Number(m[2])}` : `step ${Number(m[3])} (preview now)`;
  if (!groups.has(label)) {
    const list = h("div", { class: "previews" });
    container.append(h("section", { "data-label": label }, h("h3", { text: label }), list));
    groups.set(label, list);
  }
  return [groups.get(label), Number(m[4])];
}

async function listFiles(job, list, gridLink) {
  const { files } = await api(`/jobs/${job.id}/files`);
  const loras = files.filter((f) => f.kind === "lora");
  list.replaceChildren(...loras.map((f) => h("li", {}, h("span", { text: `${f.path} (${(f.size / 1e6).toFixed(1)} MB)` }),
    downloadLink(`/jobs/${job.id}/files/${encodeURIComponent(f.path)}`, f.path))));
  if (!loras.length) list.append(h("li", { text: "none yet" }));
  const epochs = new RegExp(`^${job.name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}-\\d{6}\\.safetensors$`);
  gridLink.hidden = !loras.some((f) => epochs.test(f.path));
}

export async function showRun(view, id, signal) {
  let job = await api(`/jobs/${id}`);
  if (job.kind === "grid") return showGridJob(view, job, signal);
  const numbers = h("div", { class: "numbers" }, liveNumbers(job));
  const message = h("p", { class: "message", role: "status", "aria-live": "polite" });
  const ask = async (path, what) => {
    try {
      await api(`/jobs/${id}/${path}`, {});
      message.textContent = path === "resume" ? "queued again: it goes on from its last state" : `${what}: asked, answered at the next step`;
      refresh(await api(`/jobs/${id}`));
    } catch (e) {
      message.textContent = e.message;
    }
  };
  const buttons = {
    stop: h("button", { type: "button", onclick: () => ask("stop", "Stop"), text: "Stop" }),
    save: h("button", { type: "button", onclick: () => ask("save-now", "Save now"), text: "Save now" }),
    preview: h("button", { type: "button", onclick: () => ask("sample-now", "Preview now"), text: "Preview now" }),
    resume: h("button", { type: "button", onclick: () => ask("resume", "Resume"), text: "Resume" }),
  };
  const gridLink = h("a", { class: "button", href: `#/jobs/${id}/grid`, text: "Epoch × strength grid", hidden: true });
  const chartBox = h("div", { class: "chart", "data-points": "0", role: "img", "aria-label": "training loss by step" });
  const previews = h("div", { id: "previews" });
  const files = h("ul", { class: "files" });
  view.append(h("h1", { text: `Run ${job.id}: ${job.name}` }), numbers,
    h("div", { class: "actions" }, Object.values(buttons), gridLink), message,
    h("section", {}, h("h2", { text: "Loss" }), chartBox),
    h("section", {}, h("h2", { text: "Previews" }), previews),
    h("section", {}, h("h2", { text: "Epoch files" }), files));

  function refresh(latest) {
    job = latest;
    numbers.replaceChildren(liveNumbers(job));
    for (const b of [buttons.stop, buttons.save, buttons.preview]) b.disabled = job.status !== "running";
    buttons.resume.hidden = !["failed", "stopped", "cancelled"].includes(job.status);
  }
  refresh(job);
  const chart = lossChart(chartBox);
  signal.addEventListener("abort", () => chart.destroy());
  const groups = new Map();
  await listFiles(job, files, gridLink);

  const onEvent = (event) => {
    if (event.event === "step") chart.add(event.step, event.loss);
    else if (event.event === "save" && event.kind === "preview") {
      const name = event.path.split("/").pop();
      const [list, index] = previewGroup(groups, previews, name);
      const prompt = job.config.sample.prompts[index] ?? `prompt ${index}`;
      const img = h("img", { alt: prompt, width: 128, height: 128 });
      list.append(h("figure", { "data-file": name }, img, h("figcaption", { text: prompt })));
      showFile(img, fileUrl(job, event.path));
    } else if (event.event === "save") listFiles(job, files, gridLink);
    else if (event.event === "control") message.textContent = `${event.request}: ${event.message}`;
    else if (event.event === "status") api(`/jobs/${id}`).then(refresh).then(() => listFiles(job, files, gridLink));
  };
  follow(id, onEvent, signal);
  while (!signal.aborted) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (!signal.aborted && !ENDED.includes(job.status)) refresh(await api(`/jobs/${id}`));
  }
}
