"""The peer the GPU session times the engine against: diffusers' UNet2DConditionModel with PEFT LoRA.

Same function as the engine's model: the engine's own random weights, converted by diffusers' single-file
converter and loaded strictly; LoRA of the same rank and alpha on the diffusers paths of the same modules
(kohya's default targets, mapped by `names.original_to_diffusers_paths`), with the engine's LoRA weights copied
in. It trains as diffusers' SDXL LoRA script does: base weights in the run's dtype, LoRA weights in fp32
(`cast_training_params`), the forward under autocast, attention through SDPA (AttnProcessor2_0), gradient
checkpointing by `enable_gradient_checkpointing`, and torch.optim.AdamW, the reference path's optimizer.

diffusers is a test dependency, not a runtime one: this module imports it when a peer is built. The GPU
machine has none; benchmarks/gpu_session.sh installs a carried wheel first (benchmarks/README.md).
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gesso import models
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.measure import bench
from gesso.models.configs import UNetConfig
from gesso.models.unet import UNet, timestep_embedding

CHECKPOINT_PREFIX = "model.diffusion_model."


@dataclass
class Inputs:
    """One batch in both models' terms: the engine's `bench.Batch` and diffusers' added conditioning."""

    batch: bench.Batch  # its y is pooled ++ sinusoidal(time_ids), what diffusers computes from the two below
    text_embeds: torch.Tensor | None  # (B, 1280) pooled bigG embedding; None for SD 1.x
    time_ids: torch.Tensor | None  # (B, 6): original size, crop, target size


def make_inputs(case: bench.Case, seed: int, device: torch.device, dtype: torch.dtype) -> Inputs:
    """`bench.make_batch` with an ADM vector built from a pooled embedding and six size numbers, as SDXL's are."""
    b = bench.make_batch(case, seed, device, dtype)
    u = models.configs.get(case.model).unet
    if u.adm_in_channels is None:
        return Inputs(b, None, None)
    g = torch.Generator().manual_seed(seed + 1_000_003)  # another stream than make_batch's
    pooled_dim = u.adm_in_channels - 6 * u.adm_embed_dim
    text_embeds = torch.randn(case.batch, pooled_dim, generator=g)
    time_ids = torch.tensor([case.resolution, case.resolution, 0, 0, case.resolution, case.resolution],
                            dtype=torch.float32).repeat(case.batch, 1)
    sizes = timestep_embedding(time_ids.flatten(), u.adm_embed_dim).reshape(case.batch, -1)
    y = torch.cat([text_embeds, sizes], dim=1).to(device, dtype)
    return Inputs(dataclasses.replace(b, y=y), text_embeds.to(device, dtype), time_ids.to(device, dtype))


def diffusers_config(u: UNetConfig) -> dict:
    """UNet2DConditionModel's arguments for the architecture of `u`."""
    chans = [u.model_channels * m for m in u.channel_mult]
    attn = [d > 0 for d in u.transformer_depth]
    config = dict(
        sample_size=128, in_channels=u.in_channels, out_channels=u.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=chans, layers_per_block=u.num_res_blocks, cross_attention_dim=u.context_dim,
        attention_head_dim=[u.heads_and_dim(c)[0] for c in chans],  # diffusers' historical name for the head count
        use_linear_projection=u.use_linear_in_transformer,
        transformer_layers_per_block=[max(d, 1) for d in u.transformer_depth])
    if u.adm_in_channels is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=u.adm_embed_dim,
                      projection_class_embeddings_input_dim=u.adm_in_channels)
    return config


def base_state(unet: UNet, network: lora.LoRANetwork) -> dict[str, torch.Tensor]:
    """The engine UNet's frozen weights in single-file names, its LoRA modules' bases put back in their places."""
    wrapped = {path for _, path, _ in network.paths.values()}
    out = {}
    for key, value in unet.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in wrapped:
            continue  # lora_down / lora_up
        if module.endswith(".base") and module.removesuffix(".base") in wrapped:
            key = f"{module.removesuffix('.base')}.{leaf}"
        out[CHECKPOINT_PREFIX + key] = value
    return out


@dataclass
class Peer:
    unet: torch.nn.Module  # diffusers.UNet2DConditionModel with a PEFT adapter
    lora_params: list[torch.nn.Parameter]  # fp32, in the engine network's order: down, up per module
    targets: list[str]  # diffusers module paths carrying LoRA
    autocast: torch.dtype | None  # the forward's autocast dtype; None: no autocast (fp32 on the CPU)


def build_peer(unet: UNet, network: lora.LoRANetwork, gradient_checkpointing: bool) -> Peer:
    """diffusers + PEFT on `unet`'s weights (shared, not copied) with `network`'s LoRA weights copied in."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from peft import LoraConfig

    config = diffusers_config(unet.cfg)
    state = convert_ldm_unet_checkpoint(base_state(unet, network), config)
    with torch.device("meta"):
        peer = UNet2DConditionModel(**config)
    peer.load_state_dict(state, strict=True, assign=True)
    peer.requires_grad_(False)
    to_diffusers = names.original_to_diffusers_paths(unet.cfg)
    modules = list(network.modules.items())
    targets = [to_diffusers[network.paths[name][1]] for name, _ in modules]
    ranks = {m.rank for _, m in modules}
    alphas = {m.alpha for _, m in modules}
    assert len(ranks) == len(alphas) == 1, "the peer takes one rank and alpha for every module"
    peer.add_adapter(LoraConfig(r=ranks.pop(), lora_alpha=alphas.pop(), target_modules=targets, lora_dropout=0.0))
    params = []
    for target, (_, m) in zip(targets, modules):
        layer = peer.get_submodule(target)
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        for p, ours in ((down, m.lora_down), (up, m.lora_up)):
            p.data = ours.detach().to(torch.float32).clone()  # fp32 LoRA weights, as cast_training_params leaves them
            params.append(p)
    if gradient_checkpointing:
        peer.enable_gradient_checkpointing()
    peer.train()
    base_dtype = next(iter(state.values())).dtype
    return Peer(peer, params, targets, None if base_dtype == torch.float32 else base_dtype)


def lora_layers(peer: Peer) -> list[str]:
    """The module paths of the peer that PEFT gave a LoRA adapter: what it trains, to compare with the engine's."""
    return [path for path, m in peer.unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def forward(peer: Peer, inputs: Inputs) -> torch.Tensor:
    b = inputs.batch
    added = None if inputs.text_embeds is None else {"text_embeds": inputs.text_embeds, "time_ids": inputs.time_ids}
    with torch.autocast(b.noisy.device.type, dtype=peer.autocast or torch.float32, enabled=peer.autocast is not None):
        return peer.unet(b.noisy, b.t, encoder_hidden_states=b.context, added_cond_kwargs=added).sample


def step(peer: Peer, opt: torch.optim.Optimizer, inputs: Inputs) -> torch.Tensor:
    loss = F.mse_loss(forward(peer, inputs).float(), inputs.batch.noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def optimizer(peer: Peer, device: torch.device) -> torch.optim.Optimizer:
    """The reference path's optimizer (`bench.optimizer("reference", ...)`) on the peer's LoRA weights."""
    return torch.optim.AdamW(peer.lora_params, lr=1e-4, fused=device.type == "cuda")
