"""The training loop: cache the dataset, inject LoRA into the UNet (and text encoders), optimise the diffusion loss."""
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from gesso.engine import diffusion
from gesso.engine.config.sections import Config
from gesso.engine.data.cache import Cache, prepare_cache
from gesso.engine.data.dataset import validation_set
from gesso.engine.embedding import inversion as textual_inversion
from gesso.engine.loop import objective, prediction
from gesso.engine.loop.averaging import EMA, Shown
from gesso.engine.loop.control import Control, answer
from gesso.engine.loop.distributed import SINGLE, NoLog, World
from gesso.engine.loop.inputs import Inputs, find_inputs, load_model, pick_device
from gesso.engine.loop.plan import Plan
from gesso.engine.loop.preview import render_previews
from gesso.engine.loop.validation import validation_loss, validation_seed
from gesso.engine.lora import network as lora
from gesso.engine.memory.network_setup import AMP_DTYPES, prepare_unet, train_optimizer
from gesso.engine.run import rundir
from gesso.engine.run.events import Events, StopTraining
from gesso.engine.run.logs import RunLog
from gesso.engine.run.metadata import training_metadata
from gesso.engine.run.saving import Saver
from gesso.engine.run.state import STATE_FILE, Position, restore
from gesso.engine.schedules import build_schedule
from gesso.errors import TrainError
from gesso.kernels.selfcheck import preflight


@dataclass
class TrainResult:
    """What a run left: its folder, the final LoRA file (None when the host stopped it early), the epoch files,
    each optimizer step's loss in this process, and the step it ended at."""

    output_dir: Path
    final: Path | None
    epoch_files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step: int = 0
    stopped_early: bool = False


def prepare_run(inputs: Inputs, progress: bool = False, world: World = SINGLE):
    """Model with LoRA injected into the UNet (and the text encoders when trained), the dataset, and its latents
    cached, and its text encodings too unless the text encoders are trained (then captions are encoded per batch).

    The GPU holds one part at a time: the model loads on the CPU in the training precision, the VAE and text
    encoders visit the GPU to fill the cache, then the UNet goes there, already in bf16/fp16 or fp8. Loading
    everything onto the GPU in fp32 first (14 GB for SDXL) would fail on the 8 to 12 GB cards this is for.
    """
    cfg, device, dataset = inputs.cfg, inputs.device, inputs.dataset
    amp = AMP_DTYPES.get(cfg.train.mixed_precision)
    sd, model_cfg, tokenizers = load_model(cfg, amp or torch.float32, inputs.model)
    sd.requires_grad_(False)
    sd.eval()
    sd.vae.to(device)
    for encoder in sd.text_encoders:
        encoder.to(device)
    embedding = cfg.network.type == "embedding"  # new token vectors, trained through the frozen encoders
    if embedding:
        n = cfg.network
        names = textual_inversion.spellings(n.token or cfg.dataset.trigger, cfg.output.name)
        network = textual_inversion.inject(sd, tokenizers, names, n.init_word, n.num_vectors, [it.caption for it in dataset.items])
    train_te = cfg.network.train_text_encoders or embedding  # either way captions are encoded per step
    with world.main_first():  # under torchrun rank 0 fills the cache, then the others read it
        cache = prepare_cache(sd, tokenizers, dataset, device, cfg.dataset.cache_dir or None, train_text_encoders=train_te,
                              progress=progress and world.main)
        if dataset.held_out:  # its own RNG: encoding the held-out images leaves the LoRA's random init as it was
            with torch.random.fork_rng(devices=[]):
                cache.validation = prepare_cache(sd, tokenizers, validation_set(dataset), device, cfg.dataset.cache_dir or None,
                                                 train_text_encoders=train_te, progress=progress and world.main)
    cache.release_encoders()  # the VAE (and the text encoders when text is cached) leave the GPU
    unet_lora, _ = prepare_unet(sd.unet, cfg, device)  # before the move: swapped blocks' weights stay in host memory
    if not embedding:
        network = unet_lora
    if cfg.network.train_text_encoders:
        network = lora.combine(network, lora.inject_text_encoders(sd, cfg.network.rank, cfg.network.alpha))
    sd.unet.to(device)
    return sd, model_cfg, network, cache


@torch.no_grad()
def fixed_eval_loss(unet, cache: Cache, seed: int = 1234, draws: int = 4, batch_size: int = 16) -> float:
    """Mean epsilon loss over every image at fixed timesteps and noise: comparable before and after training."""
    g = torch.Generator().manual_seed(seed)
    ac = diffusion.scaled_linear_alphas_cumprod()
    total, count = 0.0, 0
    for _ in range(draws):
        for x0, context, y in cache.fixed_batches(batch_size):
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            t = torch.randint(0, len(ac), (x0.shape[0],), generator=g).to(x0.device)
            total += diffusion.epsilon_loss(unet(diffusion.add_noise(x0, noise, t, ac), t, context, y), noise).item() * x0.shape[0]
            count += x0.shape[0]
    return total / count


def train(cfg: Config, output_dir: str | Path, on_event: Callable[[dict], None] | None = None,
          resume: str | Path | None = None, progress: bool = True, overwrite: bool = False,
          control: Control | None = None) -> TrainResult:
    """Train a LoRA as `cfg` says, writing its files to `output_dir`.

    on_event: called with each event (engine/run/events.py): every optimizer step's metrics, every file written;
    raising `StopTraining` in it ends the run with its state saved. resume: a folder holding a state.pt from an
    earlier run of the same config; training goes on from there and ends with the files an uninterrupted run
    writes. progress: the terminal progress bar (a host showing its own turns it off). overwrite: replace the
    files of an earlier run in `output_dir`, which stay whole until this run writes its first file; without it (and
    without resuming that run) such a folder is refused, unless its files are this same run's from a start killed
    before its first state.pt (then the run starts again).
    control: a `Control` the host (any thread) asks to stop, save, preview or validate now; each request is answered
    at the next step boundary (engine/loop/control.py).

    It trains with autograd on whatever the host's modes are (ComfyUI runs its nodes under torch.inference_mode(),
    others call from torch.no_grad()), and leaves them as they were.

    Every input (the model, the dataset, the resume state) is checked before `output_dir` is touched. One run at a
    time holds `output_dir` (engine/run/rundir.py): a second one is refused with a TrainError naming the first one's
    pid; temporary files a killed run left there are removed first.
    """
    return run_training(cfg, output_dir, on_event, resume, progress, overwrite, control=control)


def run_training(cfg: Config, output_dir: str | Path, on_event: Callable[[dict], None] | None = None,
                 resume: str | Path | None = None, progress: bool = True, overwrite: bool = False,
                 world: World = SINGLE, clock: Callable[[], float] = time.monotonic,
                 control: Control | None = None) -> TrainResult:
    """`train` in one process of a torchrun world: `world` is this process's rank (engine/loop/distributed.py), inside
    its process group, and rank 0 alone writes; `clock` gives the monotonic seconds output.save_every_n_minutes counts
    in (tests pass a fake one). `gesso train` calls this; a host calls `train`. A `control` is for one process: a
    stop asked of one rank alone would leave the others waiting.

    Every input is found and checked (engine/loop/inputs.py) before the output folder is refused, locked or changed."""
    output_dir = Path(output_dir)
    # resuming a run in its own folder goes on with that run's files; any other run would replace them
    own = resume is not None and Path(resume).resolve() == output_dir.resolve()
    mode = rundir.OVERWRITE if overwrite else rundir.RESUME if own else rundir.FRESH
    # autograd on, whatever the host's modes, from the resume state's first tensor: both restore the host's own on the way out
    with torch.inference_mode(False), torch.enable_grad():
        inputs = find_inputs(cfg, world.device(pick_device(cfg.train.device)), resume, world.size)
        with world.claim(output_dir, cfg, mode) as held:
            return _train(inputs, held, on_event, progress and world.main, world, clock, control)


def _train(inputs: Inputs, held: rundir.Claim, on_event: Callable[[dict], None] | None, progress: bool, world: World,
           clock: Callable[[], float], control: Control | None) -> TrainResult:
    cfg, device, state, output_dir = inputs.cfg, inputs.device, inputs.state, held.folder
    torch.manual_seed(cfg.train.seed)
    sd, model_cfg, network, cache = prepare_run(inputs, progress, world)
    cfg, model_cfg = prediction.resolve(cfg, model_cfg)
    sd.cfg = model_cfg  # previews sample with the prediction the run trains
    unet, tc = sd.unet, cfg.train
    preflight(device, AMP_DTYPES.get(tc.mixed_precision, torch.float32), fp8_base=tc.fp8_base, progress=progress,
              adamw8bit=tc.optimizer == "adamw8bit", rank=cfg.network.rank, head_dims=_head_dims(model_cfg.unet))
    # The frozen UNet is stored in mixed_precision's dtype and computes in it, without autocast: autocast would
    # run every GroupNorm and LayerNorm in fp32 and keep their fp32 outputs for backward, twice the activation
    # memory of the same step in bf16 (which the benchmark measures). The LoRA parameters stay fp32.
    meta = training_metadata(cfg, model_cfg.family, cache.dataset, time.time())
    held_out = cache.validation.dataset.items if cache.validation else []
    plan = Plan(cache.dataset, tc.batch_size, tc.epochs, tc.gradient_accumulation_steps, world.size, [it.path for it in held_out])
    print(cache.describe(), flush=True)
    print(plan.describe(), flush=True)

    opt = train_optimizer(network, tc, cfg.network)
    sched = build_schedule(tc.lr_scheduler, opt, plan.total_steps, tc.lr_warmup_steps, tc.lr_scheduler_num_cycles)
    update = UpdateWatch(opt, sched)
    dropout = lora.Dropout.of(cfg.network)
    ema = EMA(network.parameters(), tc.ema_decay) if tc.ema_decay else None
    shown = Shown(network, opt, tc.optimizer, ema, dropout)  # what previews, files and validation use
    shown.set_dropout(dropout)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.mixed_precision == "fp16")
    ac = diffusion.scaled_linear_alphas_cumprod(zero_terminal_snr=cfg.loss.zero_terminal_snr)
    g = torch.Generator().manual_seed(tc.seed)  # CPU generator: the same draws on any device
    pos = Position(1, 0, 0, g.get_state())
    events = Events(on_event, plan.total_steps, device)
    saver = Saver(cfg, output_dir, network, meta, state["files"] if state else held.kept, events, world.size, world.main,
                  clock, shown.evaluating, ema, before_write=held.prove)
    if state:
        pos = restore(state, network, opt, sched, scaler, g)  # one TrainError line for a state that does not fit
        _restore_ema(ema, state)
        print(f"resuming at epoch {pos.epoch}, step {pos.step} of {plan.total_steps}", flush=True)
    world.broadcast_parameters(network)
    result = TrainResult(output_dir, output_dir / f"{cfg.output.name}.safetensors")
    log = RunLog(output_dir, pos.step, cfg.output.tensorboard) if world.main else NoLog()
    held.when_proved(log.open)  # an overwrite keeps the earlier run's logs until its first file
    bar = tqdm(total=plan.total_steps, initial=pos.step, unit="step", dynamic_ncols=True, disable=not progress)
    validated: dict[int, float] = {}  # step: its validation loss, computed once a step

    def validate(epoch: int) -> float | None:
        """The validation loss of the weights the run shows, logged, sent and printed; None without a validation set."""
        if cache.validation is None or pos.step in validated:
            return validated.get(pos.step)
        with shown.evaluating():
            value = validated[pos.step] = validation_loss(unet, cache.validation, cfg.loss, ac, validation_seed(cfg))
        log.validation(pos.step, epoch, value)
        if world.main:
            tqdm.write(f"validation loss {value:.4f} at step {pos.step} (epoch {epoch})")  # above the bar
            events.validated(pos.step, epoch, value)
        return value

    def previews(label: str, epoch: int, saved: Path | None) -> list[Path]:
        held.prove()  # an --overwrite's earlier files go before the first preview as before the first file
        with shown.evaluating():
            paths = render_previews(sd, cache.tokenizers, cfg, output_dir / "samples", label, device, saved, pos.step, bar, log)
        for path in paths:
            events.saved("preview", path, pos.step, epoch)
        return paths

    def save_now() -> Path | None:
        path = saver.step_file(pos.epoch, pos.step)
        saver.state_if_asked(opt, sched, scaler, pos)
        return path

    def preview_now() -> list[Path]:
        saved = output_dir / f"{cfg.output.name}-step{pos.step:08d}.safetensors"  # named when save_now wrote it just now
        saved = saved if saved.name in saver.files else None
        return previews(f"step{pos.step:08d}", pos.epoch, saved) if cfg.sample.prompts else []

    try:
        events.start(pos.step, pos.epoch)
        answer(control, events, pos.step, pos.epoch, save_now, preview_now, lambda: validate(pos.epoch))
        for epoch in range(pos.epoch, plan.epochs + 1):
            micro_losses = []
            for i, batch in enumerate(world.batches(cache, epoch, plan.batch_size, tc.seed, skip=pos.batch), start=pos.batch):
                if isinstance(batch, torch.Size):  # another rank's batch: its draws keep this generator the single-process one
                    objective.draw(torch.zeros(batch), cfg.loss, ac, g)
                else:
                    x0, context, y, weight, mask = batch
                    if dropout != lora.OFF:  # fresh masks per micro-batch, from where it stands: a resume draws the same
                        network.reseed(hash((tc.seed, epoch, i)) % 2**31)
                    d = objective.draw(x0, cfg.loss, ac, g)
                    pred = unet(d.noisy, d.t, context, y)  # computes in the frozen weights' dtype (see above)
                    loss = objective.loss(pred, d, cfg.loss, ac, weight, mask)
                    scaler.scale(loss / plan.batches_per_step).backward()
                    micro_losses.append(loss.item())  # syncs with the device once per micro-batch
                if i + 1 - pos.batch < plan.batches_per_step and i + 1 < plan.batches_per_epoch:
                    continue  # accumulate gradients over the next micro-batch (pos.batch: where this step began)
                step_loss = world.reduce(network, micro_losses)  # sync point under torchrun: gradients summed over ranks
                if not math.isfinite(step_loss):
                    raise TrainError(f"loss is {step_loss} at step {pos.step + 1} (epoch {epoch}): the weights diverged; "
                                     "lower train.learning_rate (Prodigy: optimizer_args d_coef), or use mixed_precision = bf16 instead of fp16")
                if tc.max_grad_norm:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(network.parameters(), tc.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if ema:
                    ema.update(network.parameters())
                pos = Position(epoch, i + 1, pos.step + 1, g.get_state())
                record = {"step": pos.step, "epoch": epoch, "loss": step_loss, "lr": _current_lr(opt)}
                micro_losses = []
                event = events.measure(record)
                log.step(record, event["steps_per_s"], event["peak_memory_gib"])
                result.losses.append(record["loss"])
                if cfg.output.save_every_n_steps and pos.step % cfg.output.save_every_n_steps == 0 and pos.step < plan.total_steps:
                    saver.step_file(epoch, pos.step)
                    saver.state_if_asked(opt, sched, scaler, pos)
                saver.on_clock(opt, sched, scaler, pos, plan.total_steps)
                world.emit_step(events, event)  # after this step's files: a host stopping here leaves them written
                _show(bar, event)
                if tc.validate_every_n_steps and pos.step % tc.validate_every_n_steps == 0:
                    validate(epoch)
                # the host's requests, at this boundary
                answer(control, events, pos.step, epoch, save_now, preview_now, lambda: validate(epoch))
            pos = Position(epoch + 1, 0, pos.step, g.get_state())
            validate(epoch)
            every = cfg.output.save_every_n_epochs
            if every and epoch % every == 0:
                saver.intermediate(f"{epoch:06d}", epoch, pos.step)
            if every and epoch % every == 0 or epoch == plan.epochs:
                saver.state_if_asked(opt, sched, scaler, pos)
            if world.main and cfg.sample.prompts and cfg.sample.every_n_epochs and epoch % cfg.sample.every_n_epochs == 0:
                saved = output_dir / f"{cfg.output.name}-{epoch:06d}.safetensors" if every and epoch % every == 0 else None
                previews(f"e{epoch:06d}", epoch, saved)
    except StopTraining:
        events.stopping = True
        saver.state(opt, sched, scaler, pos)  # pos is the last optimizer-step boundary
        print(f"\nstopped at step {pos.step}: state saved; resume with --resume {output_dir}", flush=True)
        result.stopped_early, result.final = True, None
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and update.torn(pos):
            # weights and optimizer half a step past pos: such a state would resume close to, not exactly as, the
            # uninterrupted run, so the last state saved (a complete file, engine/io.py) is left as it is
            print(f"\ninterrupted inside the optimizer update of step {pos.step + 1}: no state saved; "
                  f"the last one saved in {output_dir} (if any) is unchanged", flush=True)
        elif isinstance(e, KeyboardInterrupt) or e is events.raised:
            events.stopping = True
            saver.state(opt, sched, scaler, pos)
            print(f"\ninterrupted: resumable state saved in {output_dir}; resume with --resume {output_dir}", flush=True)
        raise
    finally:
        log.close()
        bar.close()
    result.step = pos.step
    result.epoch_files = [output_dir / f for f in saver.files if not f.rsplit("-", 1)[-1].startswith("step")]
    if result.stopped_early:
        return result
    print(cache.dataset.report(), flush=True)
    saver.final(result.final, plan.epochs, pos.step)
    return result


class UpdateWatch:
    """Tells whether an interrupt (Ctrl-C is raised between any two bytecodes) came between the start of an
    optimizer step and the loop's new position, when weights, optimizer and scheduler are part-way to the next step.

    The scheduler steps once per optimizer step, so at a step boundary its count equals the position's step; the
    optimizer's pre-step hook records the count its update began at (a step the fp16 loss scaler skips calls no
    optimizer step, but still steps the scheduler)."""

    def __init__(self, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler):
        self.sched, self.began = sched, -1
        opt.register_step_pre_hook(self._begin)

    def _begin(self, opt, args, kwargs) -> None:
        self.began = self.sched.last_epoch

    def torn(self, pos: Position) -> bool:
        return self.began == pos.step or self.sched.last_epoch != pos.step


def _show(bar: tqdm, event: dict) -> None:
    peak = event["peak_memory_gib"]
    bar.set_postfix(loss=f"{event['loss']:.4f}", epoch=event["epoch"], **({"peak_mem": f"{peak:.2f}G"} if peak is not None else {}))
    bar.update()


def _current_lr(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return group["lr"] * group.get("d", 1.0)  # Prodigy's step is d * lr


def _head_dims(u) -> set[int]:
    """The attention head dims of a UNet config (SDXL: 64; SD 1.5: 40, 80, 160), for the kernels' self-check."""
    return {u.heads_and_dim(u.model_channels * mult)[1] for mult, depth in zip(u.channel_mult, u.transformer_depth) if depth}


def _restore_ema(ema: EMA | None, state: dict) -> None:
    if ema is None:  # check_resumable refused a state whose EMA this run does not keep
        return
    try:
        ema.load_state_dict(state["ema"], STATE_FILE)
    except ValueError as e:
        raise TrainError(str(e)) from None
