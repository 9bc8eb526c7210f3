"""Training configuration: typed, frozen sections, the values each key may take, and the rules across keys.

engine/config/load.py reads a TOML file into these sections and applies every rule here: an unknown key, a wrong
type, a number out of its range (nan and inf included) or a broken relation fails at once with a one-line
ConfigError naming it.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from gesso.engine.lora import lycoris
from gesso.engine.optim import OPTIMIZERS
from gesso.engine.sampling.samplers import SAMPLERS
from gesso.engine.schedules import SCHEDULES


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny-sdxl"  # built-in architecture: tiny-sdxl (random init), sdxl, sd15
    checkpoint: str = ""  # single file, diffusers folder or Hub repo id; empty: random init of `name`
    seed: int = 0  # seed of the random init when no checkpoint is given
    prediction: str = "auto"  # auto (the checkpoint's v_pred marker key, else the architecture's), epsilon, v_prediction

    @property
    def source(self) -> tuple[str, str]:
        """What names the base model, and its key: the checkpoint when one is set, else the built-in name."""
        return (self.checkpoint, "model.checkpoint") if self.checkpoint else (self.name, "model.name")


@dataclass(frozen=True)
class DatasetSection:
    path: str = ""  # folder of images with same-named .txt captions; N_name sub-folders repeat N times
    trigger: str = ""  # prepended to every caption that lacks it
    repeats: int = 0  # times each image is seen per epoch; 0: N from N_name folder names, else 1
    subsets: list = field(default_factory=list)  # more folders: [[dataset.subsets]] path, repeats, trigger, class_tokens
    resolution: int = 1024  # buckets hold about resolution^2 pixels (multiple of 64)
    bucketing: bool = True  # aspect-ratio buckets; false: square resolution x resolution crops
    min_bucket_side: int = 256
    max_bucket_side: int = 2048
    random_crop: bool = False  # random instead of centred crop (drawn once per image: latents are cached)
    flip: bool = False  # horizontal flip with probability 1/2
    shuffle_caption: bool = False  # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0  # probability a sample trains on the empty caption
    caption_extension: str = ".txt"  # .txt and .caption are both accepted
    cache_dir: str = ""  # latent and text caches; empty: <dataset folder>/.gesso_cache
    alpha_mask: bool = False  # loss.masked: each image's alpha channel is its mask (kohya's alpha_mask)
    mask_dir: str = ""  # loss.masked: same-named mask images (red channel) for dataset.path's images
    validation_split: float = 0.0  # kohya's: this fraction of each subset's images is held out for the validation loss
    validation_seed: int = 0  # kohya's: seeds the split and the validation noise; 0: train.seed
    validation_dir: str = ""  # a folder of held-out images (with captions) for the validation loss, instead of a split


@dataclass(frozen=True)
class NetworkSection:
    type: str = "lora"  # lora, a LyCORIS adapter (dora, loha, lokr: engine/lora/lycoris.py), or embedding (textual inversion)
    rank: int = 16  # LoRA dim
    alpha: float = 16.0  # scale = alpha / rank
    conv_rank: int = 0  # LoCon: also the res-block, down- and upsampler convs (3x3 at this rank); 0 = off
    conv_alpha: float = 1.0
    train_text_encoders: bool = False  # LoRA on the text encoders too (lora_te1_/lora_te2_, SD 1.x lora_te_); no text cache
    lokr_factor: int = 0  # LoKr: split each dimension at this factor (LyCORIS `factor`); 0 = the most balanced split
    dora_wd_on_output: bool = False  # DoRA: norm per output row (LyCORIS wd_on_output); off = per input column, as A1111 reads
    num_vectors: int = 1  # embedding: token vectors per text encoder
    init_word: str = "*"  # embedding: the vectors start as this word's token embeddings
    token: str = ""  # embedding: the caption word it learns; empty: dataset.trigger, else output.name
    dropout: float = 0.0  # kohya's network_dropout: LoRA input features dropped in training (the fused kernel's mask)
    rank_dropout: float = 0.0  # kohya's rank_dropout: ranks dropped per sample, the rest scaled by 1 / (1 - p)
    module_dropout: float = 0.0  # kohya's module_dropout: probability a module is skipped for a step
    loraplus_lr_ratio: float = 0.0  # LoRA+: the up matrices learn at ratio x lr; 0 = off
    loraplus_unet_lr_ratio: float = 0.0  # LoRA+ for the UNet only (wins over loraplus_lr_ratio); 0 = that one
    loraplus_text_encoder_lr_ratio: float = 0.0  # LoRA+ for the text encoders only; 0 = loraplus_lr_ratio


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 10
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"  # a name in engine/optim.py OPTIMIZERS
    learning_rate: float = 1e-4  # UNet LoRA; Prodigy wants 1.0
    text_encoder_lr: float = 0.0  # text-encoder LoRA (network.train_text_encoders); 0: learning_rate
    optimizer_args: dict = field(default_factory=dict)  # passed to the optimizer, e.g. {d_coef = 1.0}
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # a name in engine/schedules.py SCHEDULES
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    max_grad_norm: float = 1.0  # 0 disables gradient clipping
    mixed_precision: str = "auto"  # auto (bf16 from sm_80, fp16 on older GPUs, fp32 on the CPU), no, bf16, fp16
    gradient_checkpointing: bool = False
    fp8_base: bool = False  # store the frozen UNet weights in fp8 (e4m3, per-channel scale): half of bf16's memory
    blocks_to_swap: int = 0  # frozen weights of the N largest UNet blocks in host memory (engine/memory/blockswap.py); 0 = off
    memory: str = "manual"  # manual: the three keys above; auto: the fastest mode the GPU's free memory holds
    seed: int = 42  # seeds data order, timesteps and noise
    device: str = "auto"  # auto (cuda when present), cpu, cuda
    prior_loss_weight: float = 1.0  # loss weight of regularization images (subsets with is_reg = true)
    ema_decay: float = 0.0  # EMA of the LoRA weights (saved files and previews use it); 0 = off, 0.999 is usual
    validate_every_n_steps: int = 0  # validation loss every N steps as well as every epoch; 0: every epoch only


@dataclass(frozen=True)
class LossSection:
    prediction: str = "auto"  # older name of model.prediction, kept for old configs: auto follows model.prediction
    zero_terminal_snr: bool = False  # rescale the betas to zero terminal SNR (on by itself for a checkpoint with a ztsnr key)
    scale_v_pred_loss_like_noise_pred: bool = False  # weight the v loss by SNR / (SNR + 1), as kohya's option
    loss_type: str = "l2"  # l2 or huber (pseudo-Huber)
    huber_c: float = 0.1
    min_snr_gamma: float = 0.0  # 0 disables; 5 is the usual value
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0  # 0 disables pyramid noise; 6 to 10 is usual
    multires_noise_discount: float = 0.3
    min_timestep: int = 0
    max_timestep: int = 1000  # timesteps drawn from [min_timestep, max_timestep)
    timestep_sampling: str = "uniform"  # uniform, logit_normal, sigmoid, beta over [min_timestep, max_timestep)
    logit_mean: float = 0.0  # logit_normal: mean of the normal
    logit_std: float = 1.0  # logit_normal: its standard deviation
    sigmoid_scale: float = 1.0  # sigmoid: t = sigmoid(scale x N(0, 1))
    beta_alpha: float = 3.0  # beta: Beta(alpha, beta) over the range
    beta_beta: float = 3.0
    masked: bool = False  # weight the loss per latent pixel by each image's mask (dataset alpha_mask or mask_dir)


@dataclass(frozen=True)
class OutputSection:
    name: str = "lora"  # files are <name>-000001.safetensors per epoch and <name>.safetensors
    dir: str = ""  # empty: output/<name> under the current directory
    save_dtype: str = "fp16"  # fp16, bf16 or fp32
    save_every_n_epochs: int = 1  # 0: no per-epoch files
    save_every_n_steps: int = 0  # 0: no per-step files
    save_every_n_minutes: float = 0.0  # a resumable state.pt by the clock (a notebook that disconnects); 0: off
    timed_lora: bool = False  # each save_every_n_minutes save also writes <name>-step<N>.safetensors
    keep_last: int = 0  # keep only the newest K intermediate files; 0 keeps all
    save_state: bool = True  # write a resumable state (state.pt) at every save
    tensorboard: bool = True  # TensorBoard scalars in <output>/tensorboard
    save_non_ema: bool = False  # with train.ema_decay: also write the raw weights, <name>-non-ema[-...].safetensors


@dataclass(frozen=True)
class SampleSection:
    prompts: list = field(default_factory=list)  # preview prompts (A1111 syntax); empty: no previews
    negative_prompt: str = ""
    every_n_epochs: int = 1  # previews after every N epochs (when prompts are set); 0: none
    sampler: str = "euler"  # a name in engine/sampling/samplers.py SAMPLERS
    steps: int = 20
    cfg_scale: float = 6.0
    seed: int = 42  # seed of the first preview; prompt i uses seed + i


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    sample: SampleSection = field(default_factory=SampleSection)
    output: OutputSection = field(default_factory=OutputSection)


# the values a key may take; names that a registry keeps (optimizers, LR schedules, samplers, LyCORIS adapters) come
# from it, so a new entry there is a new value here
CHOICES = {
    ("network", "type"): ("lora", *lycoris.ALGOS, "embedding"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "optimizer"): tuple(OPTIMIZERS),
    ("train", "lr_scheduler"): tuple(SCHEDULES),
    ("train", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
    ("model", "prediction"): ("auto", "epsilon", "v_prediction"),
    ("loss", "prediction"): ("auto", "epsilon", "v_prediction"),
    ("train", "memory"): ("manual", "auto"),
    ("loss", "loss_type"): ("l2", "huber"),
    ("loss", "timestep_sampling"): ("uniform", "logit_normal", "sigmoid", "beta"),
    ("sample", "sampler"): tuple(SAMPLERS),
    ("output", "save_dtype"): ("fp16", "bf16", "fp32"),
}


def _within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high)


MAX_SIDE = 8192  # above SDXL's 1024 with room to spare; an extra zero or two is a typo, not a 10^10-pixel bucket


def _side(v: int) -> bool:
    return v % 64 == 0 and 64 <= v <= MAX_SIDE


MAX_SEED = 2**32 - 1  # seeds are combined with epochs and indices into torch's 64-bit seed
SEED = (_within(0, MAX_SEED), f"must be within [0, {MAX_SEED}]")
POSITIVE = (_within(0, math.inf, low_open=True), "must be above 0")
AT_LEAST_0 = (_within(0, math.inf), "must be 0 or more")
AT_LEAST_1 = (_within(1, math.inf), "must be 1 or more")
PROBABILITY = (_within(0, 1), "must be within [0, 1]")
BETA = (_within(0, 1, high_open=True), "must be within [0, 1)")
DROP = (_within(0, 1, high_open=True), "must be within [0, 1) (0: off)")

# (section, key): (predicate, rule); floats are also finite, checked before these
RANGES = {
    ("model", "seed"): SEED,
    ("dataset", "repeats"): (_within(0, math.inf), "must be 0 (N from N_name folder names) or more"),
    ("dataset", "resolution"): (_side, f"must be a positive multiple of 64, at most {MAX_SIDE}"),
    ("dataset", "min_bucket_side"): (_side, f"must be a positive multiple of 64, at most {MAX_SIDE}"),
    ("dataset", "max_bucket_side"): (_side, f"must be a positive multiple of 64, at most {MAX_SIDE}"),
    ("dataset", "keep_tokens"): AT_LEAST_0,
    ("dataset", "caption_dropout_rate"): PROBABILITY,
    ("network", "rank"): AT_LEAST_1,
    ("network", "alpha"): POSITIVE,
    ("network", "conv_rank"): (_within(0, math.inf), "must be 0 (off) or more"),
    ("network", "conv_alpha"): POSITIVE,
    ("network", "lokr_factor"): (_within(0, math.inf), "must be 0 (the most balanced split) or more"),
    ("network", "num_vectors"): (_within(1, 75), "must be within [1, 75] (one prompt chunk)"),
    ("network", "dropout"): DROP,
    ("network", "rank_dropout"): DROP,
    ("network", "module_dropout"): DROP,
    ("network", "loraplus_lr_ratio"): (_within(0, math.inf), "must be 0 (off) or more"),
    ("network", "loraplus_unet_lr_ratio"): (_within(0, math.inf), "must be 0 (loraplus_lr_ratio) or more"),
    ("network", "loraplus_text_encoder_lr_ratio"): (_within(0, math.inf), "must be 0 (loraplus_lr_ratio) or more"),
    ("dataset", "validation_split"): (_within(0, 1, high_open=True), "must be within [0, 1)"),
    ("dataset", "validation_seed"): SEED,
    ("train", "ema_decay"): (_within(0, 1, high_open=True), "must be within [0, 1) (0: off)"),
    ("train", "validate_every_n_steps"): (_within(0, math.inf), "must be 0 (every epoch only) or more"),
    ("loss", "logit_mean"): (_within(-10, 10), "must be within [-10, 10]"),
    ("loss", "logit_std"): (_within(0, 10, low_open=True), "must be within (0, 10]"),
    ("loss", "sigmoid_scale"): (_within(0, 10, low_open=True), "must be within (0, 10]"),
    ("loss", "beta_alpha"): (_within(0, 100, low_open=True), "must be within (0, 100]"),
    ("loss", "beta_beta"): (_within(0, 100, low_open=True), "must be within (0, 100]"),
    ("train", "epochs"): AT_LEAST_1,
    ("train", "batch_size"): AT_LEAST_1,
    ("train", "gradient_accumulation_steps"): AT_LEAST_1,
    ("train", "learning_rate"): POSITIVE,
    ("train", "text_encoder_lr"): (_within(0, math.inf), "must be 0 (same as learning_rate) or more"),
    ("train", "weight_decay"): AT_LEAST_0,
    ("train", "adam_beta1"): BETA,
    ("train", "adam_beta2"): BETA,
    ("train", "adam_epsilon"): POSITIVE,
    ("train", "lr_warmup_steps"): AT_LEAST_0,
    ("train", "lr_scheduler_num_cycles"): AT_LEAST_1,
    ("train", "max_grad_norm"): (_within(0, math.inf), "must be 0 (no clipping) or more"),
    ("train", "seed"): SEED,
    ("train", "prior_loss_weight"): AT_LEAST_0,
    ("train", "blocks_to_swap"): (_within(0, math.inf), "must be 0 (off) or more"),
    ("loss", "huber_c"): POSITIVE,
    ("loss", "min_snr_gamma"): (_within(0, math.inf), "must be 0 (off) or more"),
    ("loss", "noise_offset"): AT_LEAST_0,
    ("loss", "multires_noise_iterations"): (_within(0, math.inf), "must be 0 (off) or more"),
    ("loss", "multires_noise_discount"): PROBABILITY,
    ("loss", "min_timestep"): (_within(0, 1000, high_open=True), "must be within [0, 1000)"),
    ("loss", "max_timestep"): (_within(0, 1000, low_open=True), "must be within (0, 1000]"),
    ("output", "save_every_n_epochs"): (_within(0, math.inf), "must be 0 (no per-epoch files) or more"),
    ("output", "save_every_n_steps"): (_within(0, math.inf), "must be 0 (no per-step files) or more"),
    ("output", "save_every_n_minutes"): (_within(0, math.inf), "must be 0 (off) or more"),
    ("output", "keep_last"): (_within(0, math.inf), "must be 0 (keep all) or more"),
    ("sample", "every_n_epochs"): (_within(0, math.inf), "must be 0 (no previews) or more"),
    ("sample", "steps"): AT_LEAST_1,
    ("sample", "cfg_scale"): AT_LEAST_0,
    ("sample", "seed"): SEED,
}
# checks across keys or inside a list: (keys named, predicate on the config, rule)
RELATIONS = [
    ("loss.min_timestep, loss.max_timestep", lambda c: c.loss.min_timestep < c.loss.max_timestep, "min must be below max"),
    ("dataset.min_bucket_side, dataset.max_bucket_side", lambda c: c.dataset.min_bucket_side <= c.dataset.max_bucket_side,
     "min must not exceed max"),
    ("train.blocks_to_swap, train.gradient_checkpointing",
     lambda c: not c.train.blocks_to_swap or c.train.gradient_checkpointing or c.train.memory == "auto",
     "block swap needs gradient checkpointing (backward reloads each block in its recomputation)"),
    ("sample.prompts", lambda c: all(isinstance(p, str) for p in c.sample.prompts), "must be a list of strings"),
    ("loss.masked, dataset.alpha_mask, dataset.mask_dir", lambda c: c.loss.masked == _has_mask_source(c.dataset),
     "loss.masked = true needs a mask source (alpha_mask = true or a mask_dir, on the dataset or a subset), and a "
     "mask source needs loss.masked = true"),
    ("network.type, network.train_text_encoders", lambda c: c.network.type not in ("dora", "loha", "lokr") or not c.network.train_text_encoders,
     "DoRA, LoHa and LoKr train the UNet only; text-encoder training is LoRA"),
    ("network.type, network.train_text_encoders", lambda c: not (c.network.type == "embedding" and c.network.train_text_encoders),
     "an embedding trains with the text encoders frozen; set train_text_encoders = false"),
    ("model.prediction, loss.prediction", lambda c: "auto" in (c.model.prediction, c.loss.prediction)
     or c.model.prediction == c.loss.prediction, "disagree; set model.prediction only"),
    ("network.type, network.dropout, network.rank_dropout, network.module_dropout",
     lambda c: c.network.type == "lora" or not (c.network.dropout or c.network.rank_dropout or c.network.module_dropout),
     "dropout is kohya's LoRA dropout: network.type = lora only"),
    ("network.type, network.loraplus_lr_ratio", lambda c: c.network.type in ("lora", "dora") or not _loraplus(c.network),
     "LoRA+ scales the up matrices' rate: network.type = lora or dora only"),
    ("train.ema_decay, train.optimizer", lambda c: not (c.train.ema_decay and c.train.optimizer == "adamw_schedulefree"),
     "schedule-free's evaluation weights are already an average of the run: use one or the other"),
    ("output.save_non_ema, train.ema_decay", lambda c: not c.output.save_non_ema or c.train.ema_decay > 0,
     "save_non_ema writes the raw weights beside the EMA ones: it needs train.ema_decay > 0"),
    ("dataset.validation_split, dataset.validation_dir", lambda c: not (c.dataset.validation_split and c.dataset.validation_dir),
     "hold images out by a split or by a folder, not both"),
    ("train.validate_every_n_steps, dataset.validation_split", lambda c: not c.train.validate_every_n_steps
     or bool(c.dataset.validation_split or c.dataset.validation_dir), "needs a validation set (validation_split or validation_dir)"),
]


def _loraplus(n: NetworkSection) -> bool:
    return bool(n.loraplus_lr_ratio or n.loraplus_unet_lr_ratio or n.loraplus_text_encoder_lr_ratio)


def _has_mask_source(d: DatasetSection) -> bool:
    return any(t.get("alpha_mask") or t.get("mask_dir") for t in [vars(d), *d.subsets] if isinstance(t, dict))
