"""`gesso train`: a LoRA from a TOML config, with the terminal progress bar.

Ctrl-C (SIGINT) and SIGTERM (a scheduler, a cloud pre-emption) stop a run without losing it:
- during start-up (model loading, caching) they stop at once: nothing has been trained, nothing is saved;
- in the training loop the first one lets the current optimizer step finish, saves the state at that step and
  exits 130 (SIGINT) or 143 (SIGTERM): `--resume` then ends with the files of an uninterrupted run;
- a second one stops at once (users press Ctrl-C twice to get out fast): the engine saves the state of the last
  finished step (an interrupt that lands inside the optimizer update saves none: the last state.pt stays);
- while that state is being saved, one more is only noted (an impatient double press must not throw away the
  save it asked for); the next abandons the save, and the state.pt saved before stays intact (writes are atomic).

`--resume auto` lets one unchanged command (a notebook cell) start a run, go on with it after a disconnect, and
exit 0 once it has finished. Under `torchrun --nproc_per_node N -m gesso.cli train ...` each process is one rank
(engine/loop/distributed.py), which this command reads from torchrun's environment.
"""
import argparse
import importlib.util
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from gesso.engine.config.load import load_config
from gesso.engine.loop import distributed
from gesso.engine.loop.train import run_training
from gesso.engine.run import rundir
from gesso.engine.run.events import StopTraining
from gesso.errors import TrainError

CONFIG_HELP = "Every config key, its default and meaning: README.md, section 'Config reference'."
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
AUTO = "auto"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a LoRA from a TOML config",
                              description=f"Train a LoRA from a TOML config. {CONFIG_HELP}")
    p.add_argument("config", help="path to the TOML config (see examples/demo.toml)")
    p.add_argument("--output-dir", help="where the LoRA files and metrics.jsonl go (default: output.dir, else output/<output.name>)")
    p.add_argument("--dataset-config", metavar="FILE", help="a kohya dataset TOML ([general], [[datasets]], "
                                                            "[[datasets.subsets]]) in place of the config's dataset folders")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key; repeatable")
    p.add_argument("--resume", metavar="DIR", help="go on from the state.pt an earlier (interrupted) run left in DIR; "
                                                   "the output goes to DIR unless --output-dir says otherwise. "
                                                   "'auto': the same command again goes on from the output folder's "
                                                   "unfinished run, starts one there if the folder is new, and exits 0 "
                                                   "when the run has finished (./auto for a folder of that name)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in the output folder "
                                                            "(without it, such a folder is refused)")
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set, args.dataset_config)
    auto = args.resume == AUTO
    output_dir = Path(args.output_dir or (None if auto else args.resume) or cfg.output.dir or Path("output") / cfg.output.name)
    resume = args.resume
    if auto:
        if args.overwrite:
            raise TrainError("--resume auto goes on with the output folder's run, --overwrite replaces it: give one of them")
        found = rundir.assess(output_dir, cfg)[0]
        if found == rundir.FINISHED:  # a notebook cell run again after the run ended: nothing to do, nothing touched
            print(f"{output_dir / cfg.output.name}.safetensors: this run has finished; nothing to do "
                  "(--overwrite trains it again, --output-dir starts another)")
            return 0
        # a run killed before its first state starts again; another run's files are refused, as by a fresh run
        resume = output_dir if found == rundir.UNFINISHED else None
    world = distributed.from_environment(os.environ)  # torchrun's ranks; one process without it
    stop = StopOnSignal()
    with distributed.joined(world, cfg.train.device), stop.installed():
        result = run_training(cfg, output_dir, on_event=stop.on_event, resume=resume, overwrite=args.overwrite,
                              world=world)
    if result.stopped_early:
        print(f"interrupted ({signal.Signals(stop.signum).name}) at step {result.step}: resume with --resume {output_dir}",
              file=sys.stderr)
        return 128 + stop.signum
    if world.main:  # the files are rank 0's
        print(f"saved {result.final} ({len(result.epoch_files)} epoch files, metrics in {output_dir / 'metrics.jsonl'})")
        print("\n".join(next_steps(cfg, output_dir, bool(result.epoch_files))))
    return 0


def next_steps(cfg, output_dir: Path, epoch_files: bool) -> list[str]:
    """What the run left besides the LoRA files, and the commands that look at it."""
    lines = []
    previews = sorted((output_dir / "samples").glob("*.png"))
    if previews:
        lines.append(f"previews: {len(previews)} image{'s' * (len(previews) != 1)} in {output_dir / 'samples'}")
    prompt = cfg.sample.prompts[0] if cfg.sample.prompts else cfg.dataset.trigger or "a photo"
    axes = "--x epoch --y strength=0.25,0.5,0.75,1" if epoch_files else "--x strength=0,0.5,1 --y seed=1,2"
    seed = f" --model-seed {cfg.model.seed}" if not cfg.model.checkpoint and cfg.model.seed else ""
    lines.append(f"compare epochs and strengths: python cli.py grid --run {shlex.quote(str(output_dir))} "
                 f"--prompt {shlex.quote(prompt)} {axes} --steps {cfg.sample.steps}{seed}")
    if cfg.output.tensorboard:
        viewer = "" if importlib.util.find_spec("tensorboard") else " (install the viewer first: pip install -e \".[tensorboard]\")"
        lines.append(f"loss curves and previews: tensorboard --logdir {shlex.quote(str(output_dir / 'tensorboard'))}{viewer}")
    return lines


class StopOnSignal:
    """SIGINT and SIGTERM for one training run (the module's docstring says what each one does).

    A stop at once goes to the handler this one replaced (cli.main's, which raises KeyboardInterrupt carrying the
    signal); in the loop the engine saves the state on it."""

    def __init__(self):
        self.previous: dict[int, Callable | int | None] = {}  # the handlers this one replaced
        self.looping = False  # the "start" event came: the engine saves a state when stopped
        self.signum: int | None = None  # the signal that asked for a stop at the next step boundary
        self.saving = False  # the stop was handed to the engine, which is saving the state
        self.noted = False  # a signal came while saving, and was let pass

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.looping:
            self.stop_now(signum, frame)
        if self.signum is None:
            self.signum = signum
            print(f"\n{name}: stopping after this step to save a resumable state "
                  "(Ctrl-C again: stop now, saving the last finished step)", file=sys.stderr, flush=True)
            return
        if self.saving and not self.noted:
            self.noted = True
            print(f"\n{name}: saving the state; once more abandons the save (the last state.pt saved stays)",
                  file=sys.stderr, flush=True)
            return
        self.saving = True
        self.stop_now(signum, frame)

    def stop_now(self, signum: int, frame) -> NoReturn:
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        raise KeyboardInterrupt(signum)

    def on_event(self, event: dict) -> None:
        if event["event"] == "start":
            self.looping = True
        elif event["event"] == "step" and self.signum is not None and not self.saving:
            self.saving = True
            raise StopTraining  # after this step's files: the engine saves the state at this boundary

    @contextmanager
    def installed(self):
        # an ignored signal stays ignored, and only the main thread may set handlers (see cli.take_signals)
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
