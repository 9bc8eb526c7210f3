// The new run form: the demo or a TOML file, the fields a first run changes, the steps arithmetic and the memory plan
// (POST /jobs/plan, the server's own `gesso train` and `gesso memory` lines) before submitting, and the server's
// one-line errors beside the field whose key they name.
import { ApiError, api } from "./api.js";
import { h } from "./dom.js";

// [id, label, config key, is a string, hint]
const FIELDS = [
  ["dataset", "Dataset folder", "dataset.path", true, "a folder on the server; N_name sub-folders repeat N times"],
  ["name", "Name", "output.name", true, "the LoRA files' name"],
  ["trigger", "Trigger", "dataset.trigger", true, "the word that calls the LoRA, put before each caption"],
  ["epochs", "Epochs", "train.epochs", false, ""],
  ["lr", "Learning rate", "train.learning_rate", false, "e.g. 1e-4"],
  ["rank", "Rank", "network.rank", false, "the LoRA's rank (its size)"],
];
const PLAN_DELAY_MS = 400;

// A labelled input with its hint and the line an error takes, tied to it for screen readers.
export function field(input, label, hint = "") {
  input.setAttribute("aria-describedby", `${input.id}-error${hint ? ` ${input.id}-hint` : ""}`);
  return h("div", { class: "field" }, h("label", { for: input.id, text: label }), input,
    hint ? h("small", { id: `${input.id}-hint`, text: hint }) : null, h("p", { class: "error", id: `${input.id}-error` }));
}

// A function showing an ApiError beside the element its key names (`fields`: key or key prefix -> element whose
// `${id}-error` line takes it), else in `formError`; null clears them all.
export function fieldError(form, formError, fields) {
  return (err) => {
    for (const el of form.querySelectorAll("p.error")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    formError.textContent = "";
    if (!err) return;
    const key = err.key ?? "";
    const named = Object.keys(fields).find((k) => key === k || key.startsWith(`${k}.`) || key.startsWith(`${k}[`))
      ?? (key === "overrides" ? Object.keys(fields).find((k) => err.message.includes(`${k}=`)) : undefined);
    if (named === undefined) {
      formError.textContent = err.message;
      return;
    }
    fields[named].setAttribute("aria-invalid", "true");
    document.getElementById(`${fields[named].id}-error`).textContent = err.message;
  };
}

export async function showForm(view, signal) {
  const demo = await api("/demo").catch(() => null);
  const inputs = Object.fromEntries(FIELDS.map(([id]) => [id, h("input", { id: `run-${id}`, name: id, type: "text",
    inputmode: ["epochs", "rank"].includes(id) ? "numeric" : id === "lr" ? "decimal" : null })]));
  const useDemo = h("input", { type: "radio", name: "source", id: "source-demo", value: "demo", checked: !!demo, disabled: !demo });
  const useFile = h("input", { type: "radio", name: "source", id: "source-file", value: "file", checked: !demo });
  const file = h("input", { type: "file", id: "run-config", accept: ".toml,text/plain" });
  const source = h("fieldset", { id: "run-source" }, h("legend", { text: "Config" }),
    h("label", { class: "check" }, useDemo, demo ? " the demo" : " the demo (not on this server)"),
    h("label", { class: "check" }, useFile, " a TOML file (its relative paths: from the server's folder)"),
    field(file, "Config file"));
  const plan = h("div", { class: "plan", id: "run-plan", role: "status", "aria-live": "polite" });
  const formError = h("p", { class: "error", role: "alert", id: "run-error" });
  const submit = h("button", { type: "submit", text: "Start training" });
  const form = h("form", { novalidate: true }, source, FIELDS.map(([id, label, , , hint]) => field(inputs[id], label, hint)),
    h("h2", { text: "Plan" }), plan, formError, submit);
  view.append(h("h1", { text: "New run" }), form);
  const keyed = Object.fromEntries(FIELDS.map(([id, , key]) => [key, inputs[id]]));
  const show = fieldError(form, formError, { ...keyed, config: file });
  let chosen = demo ? { config: demo.config, base: demo.base } : null;

  const overrides = () => FIELDS.filter(([id]) => inputs[id].value.trim() !== "")
    .map(([id, , key, text]) => `${key}=${text ? JSON.stringify(inputs[id].value) : inputs[id].value.trim()}`);
  const body = () => ({ config: chosen.config, base: chosen.base, overrides: overrides() });

  let asked = 0, timer = null;
  async function showPlan() {
    if (!chosen) return;
    const mine = ++asked;
    plan.replaceChildren(h("p", { text: "computing the steps and the memory…" }));
    try {
      const p = await api("/jobs/plan", body());
      if (mine !== asked || signal.aborted) return;
      show(null);
      plan.replaceChildren(h("p", { class: "steps", text: p.steps }), h("p", { class: "memory", text: p.memory }),
        h("small", { text: p.note }), ...p.notices.map((n) => h("p", { class: "notice", text: n })));
    } catch (err) {
      if (mine !== asked || signal.aborted || !(err instanceof ApiError)) return;
      plan.replaceChildren();
      show(err);
    }
  }
  const replan = () => { clearTimeout(timer); timer = setTimeout(showPlan, PLAN_DELAY_MS); };

  async function choose() {
    show(null);
    if (useDemo.checked) chosen = { config: demo.config, base: demo.base };
    else if (file.files.length) chosen = { config: await file.files[0].text(), base: null };
    else { chosen = null; plan.replaceChildren(h("p", { text: "choose a config" })); return; }
    try { // the fields start at the config's values, as the server checked it
      const { config } = await api("/jobs/check", { config: chosen.config, base: chosen.base });
      for (const [id, , key] of FIELDS) {
        const [section, name] = key.split(".");
        inputs[id].value = config[section][name];
      }
      showPlan();
    } catch (err) {
      if (err instanceof ApiError) show(err.key ? err : new ApiError(err.status, { error: err.message, key: "config" }));
    }
  }
  useDemo.addEventListener("change", choose);
  useFile.addEventListener("change", choose);
  file.addEventListener("change", () => { useFile.checked = true; choose(); });
  for (const input of Object.values(inputs)) input.addEventListener("input", replan);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!chosen) return show(new ApiError(422, { error: "choose the demo or a TOML file", key: "config" }));
    submit.disabled = true;
    try {
      const job = await api("/jobs", body());
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      show(err);
    } finally {
      submit.disabled = false;
    }
  });
  await choose();
}
