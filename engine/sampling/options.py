"""kohya's per-prompt sample options, as sd-scripts' sample prompt files write them after the prompt text.

    gssdemo, a red circle --w 832 --h 1216 --s 28 --l 6 --d 42 --n blurry, lowres --ss euler_a

`--w`/`--h` size (rounded down to a size the model takes, as kohya rounds to 8), `--s` steps (kohya clamps to
1..1000), `--l` CFG scale, `--d` seed, `--n` negative prompt, `--ss` sampler. The line is split at " --" as
kohya splits it, so a negative prompt runs to the next option. An option Gesso does not know is refused by name
(kohya ignores it silently; here a typo must not render a preview at the wrong size unnoticed).
"""
from dataclasses import dataclass

from gesso.engine.sampling.samplers import SAMPLERS
from gesso.errors import PromptError

# kohya's sampler names that are exactly one of ours; their other samplers (dpmsolver++, heun, lms, ...) are not here
KOHYA_SAMPLERS = {"k_euler": "euler", "k_euler_a": "euler_a"}
OPTIONS = ("w", "h", "s", "l", "d", "n", "ss")


@dataclass(frozen=True)
class PromptOptions:
    """What the options set; None where the line leaves the default of the caller (config or command line)."""

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    sampler: str | None = None


def _number(line: str, name: str, value: str, kind: type):
    try:
        number = kind(value)
    except ValueError:
        raise PromptError(f"--{name} {value!r} in {line!r}: expected a{' whole' if kind is int else ''} number") from None
    if number < 0:
        raise PromptError(f"--{name} {value!r} in {line!r}: must be 0 or more")
    return number


def split_options(line: str) -> tuple[str, PromptOptions]:
    """The prompt text before the first " --", and the options after it."""
    prompt, *parts = line.split(" --")
    found: dict[str, object] = {}
    for part in parts:
        name, _, value = part.partition(" ")
        name, value = name.lower(), value.strip()
        if name not in OPTIONS:
            raise PromptError(f"--{name} in {line!r}: unknown sample option; known: {' '.join('--' + o for o in OPTIONS)}")
        if not value:
            raise PromptError(f"--{name} in {line!r}: no value")
        if name == "n":
            found["negative_prompt"] = value
        elif name == "ss":
            sampler = KOHYA_SAMPLERS.get(value, value)
            if sampler not in SAMPLERS:
                raise PromptError(f"--ss {value} in {line!r}: known samplers: {', '.join([*SAMPLERS, *KOHYA_SAMPLERS])}")
            found["sampler"] = sampler
        elif name == "l":
            found["cfg_scale"] = _number(line, name, value, float)
        else:
            number = _number(line, name, value, int)
            key = {"w": "width", "h": "height", "s": "steps", "d": "seed"}[name]
            found[key] = max(1, min(1000, number)) if name == "s" else number
    return prompt.rstrip(), PromptOptions(**found)


def fit_side(side: int, multiple: int) -> int:
    """A kohya size rounded down to a multiple the model takes, at least one multiple (kohya: max(64, w - w % 8))."""
    return max(multiple, side - side % multiple)
