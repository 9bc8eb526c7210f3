"""`gesso sample` (single images) and `gesso grid` (X/Y plots), registered on cli.py's subparsers by add_parsers.

Parsing only: both commands open the model and build the first image's settings with engine/sampling/sample.py,
the module whose sample() a host program calls, then render with it (sample) or engine/sampling/render.py (grid).
"""
import argparse
import time
from dataclasses import replace
from pathlib import Path

from gesso.engine.sampling import render
from gesso.engine.sampling import sample as single
from gesso.engine.sampling import samplers as sampling
from gesso.engine.sampling.prompt import EMPHASIS

AXIS_HELP = ("KIND[=V1,V2,...]; KIND is epoch (default: every epoch file of --run), strength, seed, cfg, steps or "
             "sampler, e.g. --x epoch --y strength=0.2,0.4,0.6,0.8,1")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("sample", help="render images from a prompt, with <lora:name:w> tags",
                              description="Render images in AUTOMATIC1111's prompt syntax; each PNG carries its parameters.")
    _common(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per sampling pass (seeds seed, seed+1, ...)")
    p.add_argument("--batch-count", type=int, default=1, help="sampling passes, each continuing the seeds")
    p.add_argument("--init-image", help="img2img: start from this image instead of pure noise")
    p.add_argument("--denoise", type=float, default=0.75, help="img2img denoising strength in (0, 1] (default 0.75)")
    p.add_argument("--out", default="output/samples", help="folder for the PNGs (default output/samples)")
    p.set_defaults(run=cmd_sample)

    g = subparsers.add_parser("grid", help="X/Y plot: epochs by LoRA strength, or two of seed/cfg/steps/sampler",
                              description="Render an X/Y grid as one labelled PNG plus the single images.")
    _common(g)
    g.add_argument("--run", dest="run_dir", help="training output folder with <name>-NNNNNN.safetensors epoch files (used as --lora-dir)")
    g.add_argument("--name", help="the run's output name when the folder holds several runs' files")
    g.add_argument("--x", required=True, help=AXIS_HELP)
    g.add_argument("--y", required=True, help=AXIS_HELP)
    g.add_argument("--strength", type=float, default=1.0, help="LoRA strength when strength is not an axis (default 1)")
    g.add_argument("--out", help="folder for the PNGs (default <run>/grids, else output/grids)")
    g.set_defaults(run=cmd_grid)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help='e.g. "gssdemo, (red circle:1.2) <lora:demo:0.8>"')
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--model", help="built-in name (tiny-sdxl, sdxl, sd15, ...) or checkpoint file/diffusers folder "
                                   "(default: the LoRA file's ss_sd_model_name)")
    p.add_argument("--model-seed", type=int, default=0, help="init seed of a built-in model (model.seed of the run; default 0)")
    p.add_argument("--prediction", default="auto", choices=["auto", "epsilon", "v_prediction"],
                   help="auto: the checkpoint's v_pred/ztsnr keys, or a built-in model's LoRA metadata")
    p.add_argument("--embeddings-dir", help="folder of textual-inversion .safetensors, used as embedding:name or name")
    p.add_argument("--lora-dir", help="folder holding the <lora:name:...> files as name.safetensors")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--sampler", default="dpmpp_2m_karras", choices=sorted(sampling.SAMPLERS))
    p.add_argument("--cfg", type=float, default=6.0, help="classifier-free guidance scale (default 6)")
    p.add_argument("--seed", type=int, default=-1, help="-1: a random seed (recorded in the PNG)")
    p.add_argument("--width", type=int, help="default: the model's native size")
    p.add_argument("--height", type=int, help="default: the model's native size")
    p.add_argument("--emphasis", default="a1111", choices=EMPHASIS,
                   help="a1111: scale tokens then restore the mean; comfy: scale away from the empty prompt")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=sorted(render.DTYPES), help="UNet and text encoders (default fp32)")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"], help="VAE decode precision (never fp16)")


def _pipeline(args, lora_dir: Path | None, lora_files: list[Path]) -> render.Pipeline:
    return single.open_pipeline(args.model, lora_files, lora_dir, args.device, args.dtype, args.vae_dtype, args.model_seed,
                                args.prediction, args.embeddings_dir, progress=True)


def _settings(args, pipe: render.Pipeline) -> render.Settings:
    return single.settings_for(pipe, args.prompt, args.negative_prompt, args.steps, args.sampler, args.cfg, args.seed,
                               args.width, args.height, args.emphasis)


def cmd_sample(args: argparse.Namespace) -> int:
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    init = single.open_image(args.init_image) if args.init_image else None
    pipe = _pipeline(args, lora_dir, single.tagged_lora_files(args.prompt, lora_dir))
    s = _settings(args, pipe)
    if init is not None:
        s = single.img2img(s, args.denoise)
    out = Path(args.out)
    index = render.next_index(out)
    started = time.time()
    for batch in range(args.batch_count):
        batch_settings = replace(s, seed=s.seed + batch * args.batch_size)
        for i, image in enumerate(single.render_batch(pipe, batch_settings, args.batch_size, init)):
            print(render.save_png(image, out / f"{index:05d}-{batch_settings.seed + i}.png", image.info["parameters"]))
            index += 1
    print(f"{args.batch_count * args.batch_size} images in {time.time() - started:.1f} s")
    return 0


def parse_axis(spec: str, run_files: list[Path]) -> render.Axis:
    kind, _, values = spec.partition("=")
    if kind not in render.AXES:
        raise render.RenderError(f"axis {spec!r}: kind must be one of {', '.join(render.AXES)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if kind == "epoch":
        stems = [p.stem for p in run_files]
        if not stems:
            raise render.RenderError("an epoch axis needs --run, the training output folder")
        chosen = [s for s in stems if not items or str(int(s.rsplit("-", 1)[1])) in items]
        return render.Axis(kind, tuple(chosen))
    if not items:
        raise render.RenderError(f"axis {kind}: give its values, e.g. {kind}=...")
    convert = {"strength": float, "cfg": float, "seed": int, "steps": int, "sampler": str}[kind]
    try:
        parsed = tuple(convert(v) for v in items)
    except ValueError:
        raise render.RenderError(f"axis {spec!r}: values must be {convert.__name__}s") from None
    unknown = [name for name in parsed if kind == "sampler" and name not in sampling.SAMPLERS]
    if unknown:
        raise render.RenderError(f"sampler {unknown[0]!r}: known: {', '.join(sampling.SAMPLERS)}")
    return render.Axis(kind, parsed)


def cmd_grid(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir else None
    run_files = render.epoch_files(run_dir, args.name) if run_dir else []
    x, y = parse_axis(args.x, run_files), parse_axis(args.y, run_files)
    kinds = {x.kind, y.kind}
    if "strength" in kinds and not run_dir:
        raise render.RenderError("a strength axis needs --run, the training output folder")
    lora_name = None
    if "strength" in kinds and "epoch" not in kinds:
        lora_name = run_files[0].name.rsplit("-", 1)[0]  # strength of the run's final file
        if not (run_dir / f"{lora_name}.safetensors").is_file():
            raise render.RenderError(f"{run_dir / lora_name}.safetensors: no final LoRA file for the strength axis")
    lora_dir = run_dir or (Path(args.lora_dir) if args.lora_dir else None)
    pipe = _pipeline(args, lora_dir, run_files)
    base = _settings(args, pipe)
    out = Path(args.out) if args.out else (run_dir / "grids" if run_dir else Path("output/grids"))
    started = time.time()
    grid, singles = render.render_grid(pipe, base, x, y, out, lora_name, args.strength)
    print(f"{grid} ({len(singles)} images in {time.time() - started:.1f} s; singles {singles[0].name} .. {singles[-1].name})")
    return 0
