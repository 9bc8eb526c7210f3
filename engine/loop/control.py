"""What a host asks of a run while it trains: stop, save now, preview now, validate now (`gesso.Control`).

A host's button handler, a web server's request or a UI thread calls these from any thread; the loop answers them
at the next optimizer step boundary (or at the "start" event, before the first step), each with an event:

    {"event": "control", "request": "save_now", "step", "epoch", "done": True, "message": "saved demo-step00000005..."}

after the events of the files it wrote (a save_now's LoRA file and state, a sample_now's previews). A request asked
twice before a boundary is answered once. At one boundary they are answered in the order save_now, sample_now,
validate_now, stop, so a host that asks "save now, then stop" gets both.
"""
import threading
from collections.abc import Callable
from pathlib import Path

from gesso.engine.run.events import Events, StopTraining

REQUESTS = ("save_now", "sample_now", "validate_now", "stop")  # the order they are answered in at one boundary


class Control:
    """Thread-safe requests to a run in progress, passed to `gesso.train(..., control=...)`; each is answered at the
    next step boundary with a `control` event (see the module's docstring).

    - `stop()`: the run saves its state at that step and returns with `stopped_early` (as raising StopTraining does);
    - `save_now()`: writes `<name>-step<N>.safetensors` (counted in output.keep_last, as step saves are) and, unless
      output.save_state is off, `state.pt`;
    - `sample_now()`: renders the [sample] prompts with the LoRA as it is, as `samples/<name>-step<N>-<i>.png`;
      without prompts it answers done=False;
    - `validate_now()`: computes the validation loss of the weights as they are (a `validation` event, and the value in
      the answer's message); without a validation set (dataset.validation_split, validation_dir) it answers done=False.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._asked: set[str] = set()

    def stop(self) -> None:
        self._ask("stop")

    def save_now(self) -> None:
        self._ask("save_now")

    def sample_now(self) -> None:
        self._ask("sample_now")

    def validate_now(self) -> None:
        self._ask("validate_now")

    def _ask(self, request: str) -> None:
        with self._lock:
            self._asked.add(request)

    def take(self) -> list[str]:
        """The requests asked since the last call, in the order they are answered; the loop calls this."""
        with self._lock:
            asked, self._asked = self._asked, set()
        return [r for r in REQUESTS if r in asked]


def answer(control: Control | None, events: Events, step: int, epoch: int, save: Callable[[], Path | None],
           preview: Callable[[], list[Path]], validate: Callable[[], float | None]) -> None:
    """Carry out the host's requests at a step boundary: `save` writes the step's LoRA file (None when this step had
    already written it) and the state, `preview` renders the previews (none without sample prompts), `validate` gives
    the validation loss (None without a validation set). A stop is answered last, by raising StopTraining: the loop
    saves the state at this boundary."""
    for request in control.take() if control is not None else ():
        done, message = True, ""
        if request == "save_now":
            path = save()
            message = f"saved {path.name}" if path else "this step's file was already saved"
        elif request == "sample_now":
            paths = preview()
            done = bool(paths)
            message = f"rendered {len(paths)} preview(s)" if paths else "no previews configured (sample.prompts is empty)"
        elif request == "validate_now":
            value = validate()
            done = value is not None
            message = f"validation loss {value:.6f}" if done else "no validation configured"
        else:
            message = f"stopping at step {step}: saving the state"
        events.emit({"event": "control", "request": request, "step": step, "epoch": epoch, "done": done, "message": message})
        if request == "stop":
            raise StopTraining
