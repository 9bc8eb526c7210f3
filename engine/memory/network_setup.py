"""The trained network and its optimizer as a run sets them up: shared by the training loop (engine/loop/train.py) and
the memory prediction (engine/memory/memtrace.py, memplan.py), which must build the very same step without
importing the loop that plans with them."""
import torch

from gesso.engine.config.sections import Config
from gesso.engine.embedding import inversion as textual_inversion
from gesso.engine.lora import lycoris, names
from gesso.engine.lora import network as lora
from gesso.engine.memory import fp8
from gesso.engine.optim import build_optimizer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unet_network(unet, cfg: Config) -> lora.LoRANetwork:
    """The UNet's LoRA as training sets it up (engine/memory/memtrace.py predicts the same): `inject_network`, then the
    frozen bases in fp8 when train.fp8_base, after injection so that the LoRA bases become fp8 too."""
    network = inject_network(unet, cfg)
    if cfg.train.fp8_base:
        fp8.quantize_frozen(unet)
    return network


def train_optimizer(network: lora.LoRANetwork, tc) -> torch.optim.Optimizer:
    """The optimizer `train` (and engine/memory/memtrace.py) builds over the network's param groups."""
    return build_optimizer(tc.optimizer, param_groups(network, tc), tc.learning_rate, tc.weight_decay,
                           betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon, **tc.optimizer_args)


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


def param_groups(network: lora.LoRANetwork, tc) -> list[dict]:
    """UNet LoRA at learning_rate first (the group the logs report), text-encoder LoRA at text_encoder_lr (0: the same)."""
    if isinstance(network, textual_inversion.EmbeddingNetwork):
        return [{"params": network.parameters()}]
    # lists in the network's order, never sets: the optimizer's state_dict maps states to parameters by position,
    # so the order must be the same in the process that resumes
    te = [n for n in network.modules if n.startswith("lora_te")]
    unet = [n for n in network.modules if not n.startswith("lora_te")]
    groups = [{"params": [p for n in unet for p in network.modules[n].tensors().values()]}]
    if te:
        groups.append({"params": [p for n in te for p in network.modules[n].tensors().values()],
                       "lr": tc.text_encoder_lr or tc.learning_rate})
    return groups
