"""The page in a real headless Chromium, as an artist uses it: the new run form with the demo, its plan and a bad
learning rate's error beside the field; the run's page while it trains (the loss chart gaining points, Save now's
file and Preview now's image, an epoch's preview); Stop reached by keyboard, leaving a resumable state that Resume
finishes; a 2 x 2 epoch x strength grid rendered cell by cell, a cell's dialog with its image and its <lora:...> tag;
the narrow layout. After every test: no console error, and nothing loaded from anywhere but the server."""
import re
from pathlib import Path

import httpx
import pytest
from page_testutil import (Server, browser, close, console_errors, demo_toml, foreign_resources, needs_chromium, overflow,
                           screenshot, tab_to, unlabelled, wait_for)

from gesso.engine.sampling.render import lora_hash

pytestmark = pytest.mark.slow  # a server, a browser and a 30-step demo run with previews and a grid: about 2 minutes here
EXPECTED = {"errors": ()}  # console lines a test provokes on purpose (the API's refusals, logged as failed loads)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    needs_chromium()
    tmp = tmp_path_factory.mktemp("page")
    # 12 images x 5 repeats / batch 4 = 15 steps an epoch at 64 px; a preview (2 sampling steps) after each epoch
    demo = demo_toml(tmp, "dataset.repeats=5", "sample.every_n_epochs=1")
    s = Server(tmp / "data", "--devices", "cpu", "--demo", str(demo), base=tmp)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    driver = browser()
    driver.server = server
    yield driver
    close(driver)


@pytest.fixture(autouse=True)
def clean_console(page, server):
    """Each test leaves the console without errors and the page having loaded only its own origin's resources."""
    EXPECTED["errors"] = ()
    yield
    assert console_errors(page, EXPECTED["errors"]) == []
    assert foreign_resources(page, server.url) == []


def find(page, css: str):
    return page.find_element("css selector", css)


def shown(css: str, test=lambda el: True):
    def condition(driver):
        found = [el for el in driver.find_elements("css selector", css) if el.is_displayed() and test(el)]
        return found[0] if found else False
    return condition


def test_the_page_is_served_at_the_root_with_a_policy_of_its_own_origin(page, server):
    r = httpx.get(server.url + "/")
    csp = r.headers["content-security-policy"]
    assert r.status_code == 200 and "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert httpx.get(server.url + "/static/../jobs.db").status_code == 404  # only the page's own files
    page.get(server.url + "/")
    wait_for(page, shown("h1", lambda el: el.text == "Runs"), "the runs list")
    wait_for(page, shown("main p", lambda el: "No runs yet" in el.text), "the empty list's line")


def test_a_bad_learning_rate_shows_the_servers_error_beside_the_field(page, server):
    EXPECTED["errors"] = ("the server responded with a status of 422",)
    page.get(server.url + "/#/new")
    name = wait_for(page, shown("#run-name", lambda el: el.get_attribute("value") == "demo"), "the demo's values in the form")
    assert find(page, "#source-demo").is_selected() and name.get_attribute("value") == "demo"
    lr = find(page, "#run-lr")
    lr.clear()
    lr.send_keys("-1")
    find(page, "button[type=submit]").click()
    error = wait_for(page, shown("#run-lr-error", lambda el: el.text), "the error line beside the learning rate", server=server)
    demo = server.client.get("/demo").json()
    refused = server.client.post("/jobs/check", json={"config": demo["config"], "base": demo["base"],
                                                      "overrides": ["train.learning_rate=-1"]}).json()
    assert refused["key"] == "train.learning_rate" and error.text == refused["error"]
    assert lr.get_attribute("aria-invalid") == "true" and "run-lr-error" in lr.get_attribute("aria-describedby")
    assert server.client.get("/jobs").json()["jobs"] == []  # nothing queued
    screenshot(page, "form-error")


def test_the_form_shows_the_steps_and_memory_then_submits_the_demo_with_2_epochs(page, server):
    # a half-typed value ("", "2e-") that waits out the plan's delay on a loaded machine is refused by /jobs/plan
    EXPECTED["errors"] = ("/jobs/plan - Failed to load resource: the server responded with a status of 422",)
    lr, epochs = find(page, "#run-lr"), find(page, "#run-epochs")
    lr.clear()
    lr.send_keys("2e-3")
    epochs.clear()
    epochs.send_keys("2")
    steps = wait_for(page, shown("#run-plan .steps", lambda el: "x 2 epochs" in el.text), "the steps arithmetic", server=server)
    assert steps.text == "12 images x 5 repeats = 60 samples / batch 4 = 15 steps per epoch x 2 epochs = 30 steps"
    assert re.match(r"tiny-sdxl 64px batch 4 rank 8, bf16, adamw: peak \d+\.\d\d GiB = weights", find(page, "#run-plan .memory").text)
    assert find(page, "#run-lr-error").text == "" and unlabelled(page) == []
    find(page, "button[type=submit]").click()
    wait_for(page, lambda d: d.current_url.endswith("#/jobs/1"), "the run's page after submitting")
    job = server.client.get("/jobs/1").json()
    assert (job["config"]["train"]["epochs"], job["config"]["train"]["learning_rate"], job["config"]["output"]["name"]) == (2, 2e-3, "demo")


def test_the_loss_chart_gains_points_while_it_trains_and_previews_appear_save_now_and_preview_now_too(page, server):
    points = lambda: int(find(page, ".chart").get_attribute("data-points"))  # noqa: E731
    wait_for(page, lambda d: points() >= 1, "a first point on the loss chart", server=server)
    first = points()
    wait_for(page, lambda d: points() > first, "the chart gaining points", server=server)
    assert server.client.get("/jobs/1").json()["status"] == "running"  # gained while it trains
    for name in ("Save now", "Preview now"):  # answered at the next step boundary: a step file and a step's preview
        next(b for b in page.find_elements("css selector", ".actions button") if b.text == name).click()
    wait_for(page, shown(".files a", lambda el: re.fullmatch(r"demo-step\d{8}\.safetensors", el.get_attribute("download"))),
             "the save-now's file among the files", server=server)
    wait_for(page, shown("#previews section[data-label$='(preview now)'] img", lambda el: page.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", el)), "the preview-now's image", server=server)
    preview = wait_for(page, shown("#previews section[data-label='epoch 1'] img", lambda el: page.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", el)), "a preview", server=server)
    assert preview.get_attribute("alt") == "gssdemo, a red circle on a blue background"
    screenshot(page, "run-training")


def test_stop_reached_by_keyboard_leaves_a_resumable_state(page, server):
    from selenium.webdriver.common.keys import Keys

    stop = find(page, ".actions button")
    assert stop.text == "Stop" and stop.is_enabled()
    tab_to(page, stop)
    page.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(page, shown("dd[data-field=Status]", lambda el: el.text == "stopped"), "the run stopped", server=server)
    job = server.client.get("/jobs/1").json()
    assert job["status"] == "stopped" and job["step"] < job["total_steps"] == 30
    assert "state.pt" in {f["path"] for f in server.client.get("/jobs/1/files").json()["files"]}
    resume = wait_for(page, shown(".actions button", lambda el: el.text == "Resume"), "the Resume button")
    assert not stop.is_enabled()
    screenshot(page, "run-stopped")
    resume.click()
    wait_for(page, shown("dd[data-field=Status]", lambda el: el.text == "finished"), "the resumed run finished", server=server)
    files = wait_for(page, lambda d: [a for a in d.find_elements("css selector", ".files a") if "000002" in a.get_attribute("href")]
                     and d.find_elements("css selector", ".files a"), "the epoch files")
    names = [a.get_attribute("download") for a in files]
    assert {"demo-000001.safetensors", "demo-000002.safetensors", "demo.safetensors"} <= set(names)
    href = next(a.get_attribute("href") for a in files if a.get_attribute("download") == "demo-000002.safetensors")
    output = Path(server.client.get("/jobs/1").json()["output_dir"])
    assert httpx.get(href).content == (output / "demo-000002.safetensors").read_bytes()


def test_a_2x2_grid_renders_cell_by_cell_and_a_cell_shows_its_image_and_lora_tag(page, server):
    from selenium.webdriver.common.keys import Keys

    wait_for(page, shown("a.button", lambda el: "grid" in el.text), "the grid link").click()
    prompt = wait_for(page, shown("#grid-prompt"), "the grid form")
    assert prompt.get_attribute("value") == "gssdemo, a red circle on a blue background"  # the preview prompt by default
    boxes = page.find_elements("css selector", "#grid-epochs input[type=checkbox]")
    assert [(b.get_attribute("value"), b.is_selected()) for b in boxes] == [("1", True), ("2", True)]  # every epoch file
    assert find(page, "#grid-strengths").get_attribute("value") == "0.25, 0.5, 0.75, 1" and unlabelled(page) == []
    for css, value in (("#grid-strengths", "0.5, 1"), ("#grid-steps", "2"), ("#grid-seed", "7")):
        find(page, css).clear()
        find(page, css).send_keys(value)
    find(page, "form button[type=submit]").click()
    wait_for(page, lambda d: d.current_url.endswith("#/jobs/2"), "the grid job's page")
    loaded = "return [...document.querySelectorAll('table.grid button.cell img')].filter(i => i.complete && i.naturalWidth > 0).length"
    wait_for(page, lambda d: d.execute_script(loaded) == 4, "4 cells", server=server)
    assert find(page, "#grid-progress").get_attribute("value") == "4"
    assert [th.text for th in page.find_elements("css selector", "table.grid thead th")] == ["epoch 1", "epoch 2"]
    assert [th.text for th in page.find_elements("css selector", "table.grid tbody th")] == ["strength 0.5", "strength 1"]
    screenshot(page, "grid")
    cell = page.find_elements("css selector", "table.grid tbody tr")[0].find_elements("css selector", "button.cell")[1]
    assert cell.get_attribute("aria-label") == "epoch 2 at strength 0.5"
    cell.click()
    dialog = wait_for(page, shown("#cell-dialog"), "the cell's dialog")
    tag = find(page, "#cell-tag").text
    assert tag == "<lora:demo-000002:0.5>"
    files = {f["path"] for f in server.client.get("/jobs/1/files").json()["files"]}
    name, strength = re.fullmatch(r"<lora:(.+):(.+)>", tag).groups()
    assert f"{name}.safetensors" in files and float(strength) == 0.5  # the tag names the cell's file and strength
    assert page.execute_script("const i = document.querySelector('#cell-dialog img'); return i.complete && i.naturalWidth", ) > 0
    parameters = find(page, "#cell-parameters").text
    assert parameters.startswith(f"gssdemo, a red circle on a blue background {tag}\n") and "Seed: 7" in parameters
    output = Path(server.client.get("/jobs/1").json()["output_dir"])
    assert "Steps: 2" in parameters and f'Lora hashes: "demo-000002: {lora_hash(output / "demo-000002.safetensors")}"' in parameters
    screenshot(page, "cell-dialog")
    dialog.send_keys(Keys.ESCAPE)
    wait_for(page, lambda d: not dialog.is_displayed(), "the dialog closed by Escape")
    assert server.client.get("/jobs/2").json()["status"] == "finished"


@pytest.mark.parametrize("view", ["#/", "#/new", "#/jobs/1", "#/jobs/1/grid", "#/jobs/2"])
def test_a_400_px_window_overflows_nothing_and_every_field_has_a_label(page, server, view):
    page.set_window_size(400, 900)
    page.get(f"{server.url}/{view}")
    wait_for(page, shown("h1"), f"{view}'s heading")
    wait_for(page, lambda d: not d.find_elements("css selector", "main p") or "Loading" not in d.find_element("css selector", "main").text,
             f"{view} loaded")
    if view == "#/":
        wait_for(page, shown("tr[data-job='2']"), "the runs")
        assert page.execute_script("const s = document.querySelector('.scroll'); return s.scrollWidth - s.clientWidth") <= 0
        screenshot(page, "runs-list-narrow")  # each run a card: nothing to scroll sideways
        page.set_window_size(1200, 1000)
        screenshot(page, "runs-list")
        page.set_window_size(400, 900)
    if view == "#/new":
        wait_for(page, shown("#run-plan .steps"), "the plan")
    assert overflow(page) <= 0 and unlabelled(page) == []
    page.set_window_size(1200, 1000)
