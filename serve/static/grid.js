// The epoch x strength grid: a form on a training run that queues a grid job, and the grid job's page, where the
// cells appear one by one as the server renders them; a cell opens its full image, its AUTOMATIC1111 parameters
// and the <lora:name-00000N:w> tag that renders it.
import { ApiError, api, downloadLink, fileUrl, follow, showFile } from "./api.js";
import { ENDED, h, liveNumbers } from "./dom.js";
import { fieldError, field } from "./form.js";

const STRENGTHS = "0.25, 0.5, 0.75, 1";

export async function showGridForm(view, id, signal) {
  const [job, { files }] = await Promise.all([api(`/jobs/${id}`), api(`/jobs/${id}/files`)]);
  const sample = job.config.sample;
  const epochs = files.map((f) => f.path.match(/^(.*)-(\d{6})\.safetensors$/)).filter((m) => m && m[1] === job.name)
    .map((m) => Number(m[2]));
  const prompts = h("datalist", { id: "grid-prompts" }, sample.prompts.map((p) => h("option", { value: p })));
  const inputs = {
    prompt: h("input", { id: "grid-prompt", type: "text", list: "grid-prompts", value: sample.prompts[0] ?? "" }),
    seed: h("input", { id: "grid-seed", type: "text", inputmode: "numeric", value: sample.seed }),
    strengths: h("input", { id: "grid-strengths", type: "text", value: STRENGTHS }),
    steps: h("input", { id: "grid-steps", type: "text", inputmode: "numeric", value: sample.steps }),
  };
  const boxes = epochs.map((e) => h("input", { type: "checkbox", id: `grid-epoch-${e}`, value: e, checked: true }));
  const epochSet = h("fieldset", { id: "grid-epochs", "aria-describedby": "grid-epochs-error" },
    h("legend", { text: "Epochs" }), boxes.map((b) => h("label", { class: "check" }, b, ` epoch ${b.value}`)),
    h("p", { class: "error", id: "grid-epochs-error" }));
  const formError = h("p", { class: "error", role: "alert" });
  const form = h("form", { novalidate: true },
    field(inputs.prompt, "Prompt", "a preview prompt by default; the grid adds the <lora:...> tag"), prompts,
    field(inputs.seed, "Seed"), epochSet,
    field(inputs.strengths, "Strengths", "LoRA weights, separated by commas"),
    field(inputs.steps, "Sampling steps"), formError,
    h("button", { type: "submit", text: "Render the grid" }));
  view.append(h("h1", { text: `Grid of run ${job.id}: ${job.name}` }), form);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const show = fieldError(form, formError, { prompt: inputs.prompt, seed: inputs.seed, strengths: inputs.strengths,
      steps: inputs.steps, epochs: epochSet });
    const body = {
      prompt: inputs.prompt.value, seed: Number(inputs.seed.value), steps: Number(inputs.steps.value),
      epochs: boxes.filter((b) => b.checked).map((b) => Number(b.value)),
      strengths: inputs.strengths.value.split(",").map((s) => s.trim()).filter(Boolean).map(Number),
    };
    try {
      show(null);
      const grid = await api(`/jobs/${id}/grid`, body);
      location.hash = `#/jobs/${grid.id}`;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      show(err);
    }
  });
}

function cellDialog() {
  const title = h("h2", { id: "cell-title" });
  const img = h("img", { alt: "" });
  const parameters = h("pre", { class: "parameters", id: "cell-parameters" });
  const tag = h("code", { id: "cell-tag" });
  const copied = h("span", { role: "status", "aria-live": "polite" });
  const copy = h("button", { type: "button", text: "Copy tag" });
  const dialog = h("dialog", { id: "cell-dialog", "aria-labelledby": "cell-title" },
    h("form", { method: "dialog" }, title, img, h("p", {}, tag, " ", copy, " ", copied),
      h("h3", { text: "Parameters" }), parameters, h("button", { type: "submit", text: "Close" })));
  copy.addEventListener("click", () => {
    navigator.clipboard.writeText(tag.textContent).then(() => { copied.textContent = "copied"; },
      () => { // no clipboard here (a page not on localhost or https): select it for Ctrl+C
        getSelection().selectAllChildren(tag);
        copied.textContent = "selected: press Ctrl+C";
      });
  });
  return { dialog, open(cell, src) {
    title.textContent = `epoch ${Number(cell.file.slice(-6))} at strength ${cell.strength}`;
    img.src = src;
    img.alt = title.textContent;
    parameters.textContent = cell.parameters;
    tag.textContent = cell.tag;
    copied.textContent = "";
    dialog.showModal();
  } };
}

export async function showGridJob(view, job, signal) {
  const numbers = h("div", { class: "numbers" }, liveNumbers(job));
  const bar = h("progress", { id: "grid-progress", max: 1, value: 0, "aria-label": "cells rendered" });
  const message = h("p", { class: "message", role: "status", "aria-live": "polite" });
  const stop = h("button", { type: "button", text: "Stop", disabled: job.status !== "running" });
  const table = h("table", { class: "grid" });
  const result = h("p");
  const { dialog, open } = cellDialog();
  const run = job.config.run;
  view.append(h("h1", { text: `Grid ${job.id} of run ${run}` }), h("p", {}, h("a", { href: `#/jobs/${run}`, text: `back to run ${run}` })),
    numbers, h("div", { class: "actions" }, bar, stop), message, h("div", { class: "scroll" }, table), result, dialog);
  stop.addEventListener("click", () => api(`/jobs/${job.id}/stop`, {}).then(() => { message.textContent = "Stop: asked"; },
    (e) => { message.textContent = e.message; }));
  const refresh = async () => {
    job = await api(`/jobs/${job.id}`);
    numbers.replaceChildren(liveNumbers(job));
    stop.disabled = job.status !== "running";
  };
  const cells = new Map();
  follow(job.id, (event) => {
    if (event.event === "grid") {
      bar.max = event.total;
      table.replaceChildren(h("caption", { text: job.config.prompt }),
        h("thead", {}, h("tr", {}, h("td"), event.epochs.map((e) => h("th", { scope: "col", text: `epoch ${e}` })))),
        h("tbody", {}, event.strengths.map((s, row) => h("tr", {}, h("th", { scope: "row", text: `strength ${s}` }),
          event.epochs.map((e, col) => { const td = h("td", { class: "pending", text: "…" }); cells.set(`${row},${col}`, td); return td; })))));
    } else if (event.event === "cell") {
      const src = fileUrl(job, event.path);
      const img = h("img", { alt: "", width: 128, height: 128 });
      const label = `epoch ${Number(event.file.slice(-6))} at strength ${event.strength}`;
      const button = h("button", { type: "button", class: "cell", "aria-label": label, "data-tag": event.tag, onclick: () => open(event, img.src) }, img);
      cells.get(`${event.row},${event.col}`).replaceChildren(button);
      cells.get(`${event.row},${event.col}`).className = "done";
      showFile(img, src);
      bar.value = event.done;
    } else if (event.event === "save" && event.kind === "grid") {
      const name = event.path.split("/").pop();
      result.replaceChildren(`The labelled grid: ${name} `, downloadLink(fileUrl(job, event.path), name));
    } else if (event.event === "status") refresh();
  }, signal);
  while (!signal.aborted && !ENDED.includes(job.status)) {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    if (!signal.aborted) await refresh();
  }
}
