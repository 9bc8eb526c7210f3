"""The trained network and its optimizer as a run sets them up: one setup shared by the training loop
(engine/loop/train.py), the memory prediction and planner (engine/memory/memtrace.py, memplan.py) and the step benchmark
(engine/measure/bench.py), so that what is predicted and timed is the very step that trains."""
import torch

from gesso.engine.config.sections import Config, NetworkSection
from gesso.engine.embedding import inversion as textual_inversion
from gesso.engine.lora import lycoris, names
from gesso.engine.lora import network as lora
from gesso.engine.memory import fp8
from gesso.engine.memory.blockswap import BlockSwap
from gesso.engine.optim import build_optimizer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_unet(unet, cfg: Config, device: torch.device) -> tuple[lora.LoRANetwork | None, BlockSwap | None]:
    """The frozen UNet as a run trains it, in the order that matters: LoRA injected as network.* says (none when
    the run trains an embedding, on the text side); the frozen bases in fp8 when train.fp8_base, after injection so
    that the LoRA bases become fp8 and the LoRA weights never do; gradient checkpointing; block swap's host copies
    of the N largest blocks. Call it before the UNet moves to `device`, so the swapped weights stay in host memory.
    Returns the UNet's LoRA network (None for an embedding) and the block swap (None without one)."""
    network = None if cfg.network.type == "embedding" else inject_network(unet, cfg)  # fp32 whatever the base's dtype
    if cfg.train.fp8_base:
        fp8.quantize_frozen(unet)
    unet.gradient_checkpointing = cfg.train.gradient_checkpointing
    swap = BlockSwap(unet, cfg.train.blocks_to_swap, device) if cfg.train.blocks_to_swap else None
    return network, swap


def train_optimizer(network: lora.LoRANetwork, tc, n: NetworkSection = NetworkSection()) -> torch.optim.Optimizer:
    """The optimizer `train` (and engine/memory/memtrace.py) builds over the network's param groups (LoRA+ from `n`)."""
    return build_optimizer(tc.optimizer, param_groups(network, tc, n), tc.learning_rate, tc.weight_decay,
                           adam_betas=(tc.adam_beta1, tc.adam_beta2), adam_eps=tc.adam_epsilon, **tc.optimizer_args)


def inject_network(unet, cfg: Config) -> lora.LoRANetwork:
    """LoRA on the transformer linears (kohya's default), plus LoCon on the res-block convs when conv_rank > 0:
    3x3 convs at conv_rank/conv_alpha, the other LoCon modules at rank/alpha, as kohya's LoCon does."""
    n = cfg.network
    paths = names.attention_targets(unet)
    conv3x3 = set()
    if n.conv_rank:
        locon = names.locon_targets(unet)
        conv3x3 = {p for p in locon if getattr(unet.get_submodule(p), "kernel_size", (1, 1)) != (1, 1)}
        paths += locon
    kohya = names.unet_kohya_names(unet, paths)
    rank = {kohya[p]: n.conv_rank if p in conv3x3 else n.rank for p in paths}
    alpha = {kohya[p]: n.conv_alpha if p in conv3x3 else n.alpha for p in paths}
    return lora.inject(unet, paths, "lora_unet_", rank, alpha, names=kohya, algo=n.type, options=lycoris.Options.of(n))


def param_groups(network: lora.LoRANetwork, tc, n: NetworkSection = NetworkSection()) -> list[dict]:
    """UNet LoRA at learning_rate first (the group the logs report), text-encoder LoRA at text_encoder_lr (0: the same).

    LoRA+ (kohya's loraplus_lr_ratio, and its unet / text-encoder variants, which win over it): the up matrices of
    each part in a group of their own at that part's rate times the ratio; 0 leaves them with the rest."""
    if isinstance(network, textual_inversion.EmbeddingNetwork):
        return [{"params": network.parameters()}]
    # lists in the network's order, never sets: the optimizer's state_dict maps states to parameters by position,
    # so the order must be the same in the process that resumes
    te = [name for name in network.modules if name.startswith("lora_te")]
    unet = [name for name in network.modules if not name.startswith("lora_te")]
    groups = _lr_groups(network, unet, tc.learning_rate, n.loraplus_unet_lr_ratio or n.loraplus_lr_ratio)
    if te:
        groups += _lr_groups(network, te, tc.text_encoder_lr or tc.learning_rate,
                             n.loraplus_text_encoder_lr_ratio or n.loraplus_lr_ratio, own_lr=True)
    return groups


def _lr_groups(network: lora.LoRANetwork, names: list[str], lr: float, ratio: float, own_lr: bool = False) -> list[dict]:
    tensors = [(key, p) for name in names for key, p in network.modules[name].tensors().items()]
    rest = [p for key, p in tensors if not (ratio and key == "lora_up.weight")]
    groups = [{"params": rest} | ({"lr": lr} if own_lr else {})]
    if ratio:
        groups.append({"params": [p for key, p in tensors if key == "lora_up.weight"], "lr": lr * ratio})
    return groups
