"""Reference models for parity: the engine's weights, in the original single-file layout, converted by
diffusers' own single-file converters and loaded strictly into diffusers / transformers modules."""
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from gesso.models.configs import ModelConfig

SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_BIGG = "conditioner.embedders.1.model."


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def diffusers_unet_config(cfg: ModelConfig) -> dict:
    u = cfg.unet
    chans = [u.model_channels * m for m in u.channel_mult]
    attn = [d > 0 for d in u.transformer_depth]
    heads = [u.heads_and_dim(c)[0] for c in chans]
    config = dict(
        sample_size=16,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=chans,
        layers_per_block=u.num_res_blocks,
        cross_attention_dim=u.context_dim,
        attention_head_dim=heads,  # diffusers' historical name for the head count
        use_linear_projection=u.use_linear_in_transformer,
        transformer_layers_per_block=[max(d, 1) for d in u.transformer_depth],
        norm_num_groups=u.norm_groups,
    )
    assert u.transformer_depth_middle == max(u.transformer_depth[-1], 1) or not attn[-1]
    if u.adm_in_channels is not None:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=u.adm_embed_dim,
            projection_class_embeddings_input_dim=u.adm_in_channels,
        )
    return config


def _load_strict(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def diffusers_unet(cfg: ModelConfig, checkpoint: dict) -> UNet2DConditionModel:
    config = diffusers_unet_config(cfg)
    return _load_strict(UNet2DConditionModel(**config), sfu.convert_ldm_unet_checkpoint(checkpoint, config))


def diffusers_vae_config(cfg: ModelConfig) -> dict:
    v = cfg.vae
    n = len(v.ch_mult)
    return dict(
        in_channels=v.in_channels,
        out_channels=v.in_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[v.ch * m for m in v.ch_mult],
        layers_per_block=v.num_res_blocks,
        latent_channels=v.z_channels,
        scaling_factor=cfg.latent_scale,
        norm_num_groups=v.norm_groups,
    )


def diffusers_vae(cfg: ModelConfig, checkpoint: dict) -> AutoencoderKL:
    config = diffusers_vae_config(cfg)
    return _load_strict(AutoencoderKL(**config), sfu.convert_ldm_vae_checkpoint(checkpoint, config))


def hf_text_config(te) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=te.vocab_size,
        hidden_size=te.width,
        intermediate_size=te.mlp_dim,
        num_hidden_layers=te.layers,
        num_attention_heads=te.heads,
        max_position_embeddings=te.max_positions,
        hidden_act=te.act,
        projection_dim=getattr(te, "proj_dim", None) or te.width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def hf_clip(te, checkpoint: dict) -> CLIPTextModel:
    state = sfu.convert_ldm_clip_checkpoint(checkpoint)
    model = CLIPTextModel(hf_text_config(te))
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _load_strict(model, state)


def hf_openclip_sd2(te, checkpoint: dict) -> CLIPTextModel:
    """SD 2.x: diffusers' converter drops text_projection and the tower is a plain CLIPTextModel."""
    model = CLIPTextModel(hf_text_config(te))
    state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix="cond_stage_model.model.")
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _load_strict(model, state)


def hf_openclip(te, checkpoint: dict, prefix: str = SDXL_BIGG) -> CLIPTextModelWithProjection:
    model = CLIPTextModelWithProjection(hf_text_config(te))
    return _load_strict(model, sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix))


def write_diffusers_folder(model, folder, text_model_prefix: bool = True) -> None:
    """A diffusers pipeline folder holding `model`'s weights, written by diffusers' and transformers' own
    save_pretrained after diffusers' single-file conversion. text_model_prefix rewrites the text encoders'
    keys as older transformers saved them (`text_model.embeddings...`), the layout of the folders on the Hub."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from gesso.models.tokenizer import SHIPPED

    folder = Path(folder)
    cfg, state = model.cfg, model.state_dict()
    diffusers_unet(cfg, state).save_pretrained(folder / "unet")
    diffusers_vae(cfg, state).save_pretrained(folder / "vae")
    hf_clip(cfg.text_encoders[0], state).save_pretrained(folder / "text_encoder")
    if cfg.family == "sdxl":
        hf_openclip(cfg.text_encoders[1], state).save_pretrained(folder / "text_encoder_2")
    for sub in ("text_encoder", "text_encoder_2"):
        weights = folder / sub / "model.safetensors"
        if text_model_prefix and weights.is_file():
            tensors = load_file(weights)
            renamed = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                       for k, v in tensors.items()}
            save_file(renamed, weights, metadata={"format": "pt"})
    for sub in ("tokenizer", "tokenizer_2")[: len(cfg.text_encoders)]:
        shutil.copytree(SHIPPED, folder / sub)
    pipeline = "StableDiffusionXLPipeline" if cfg.family == "sdxl" else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
