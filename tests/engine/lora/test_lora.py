import torch
import torch.nn as nn

from gesso.engine.lora import names
from gesso.engine.lora import network as lora


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.to_q, self.ff = nn.Linear(c, c, bias=False), nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return self.ff(self.to_q(x))


class Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj_in = nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList([Block(c)])
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.transformer_blocks[0](self.proj_in(self.norm(x)))


class Net(nn.Module):
    def __init__(self, c=12):
        super().__init__()
        self.conv_in = nn.Linear(c, c)  # outside any transformer: not a target
        self.blocks = nn.ModuleList([Transformer(c), Transformer(c)])

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.blocks:
            x = b(x)
        return x


def test_targets_are_the_linears_inside_transformers():
    targets = names.attention_targets(Net())
    assert targets == [f"blocks.{i}.{n}" for i in range(2) for n in ("proj_in", "transformer_blocks.0.to_q", "transformer_blocks.0.ff.0", "transformer_blocks.0.ff.2")]
    assert names.kohya_name("lora_unet_", "input_blocks.4.1.transformer_blocks.0.attn1.to_q") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_zero_up_leaves_output_unchanged_and_remove_restores_modules():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 5, 12)
    before = net(x)
    originals = {n: net.get_submodule(n) for n in names.attention_targets(net)}
    network = lora.inject(net, list(originals), "lora_unet_", rank=4, alpha=2)
    assert torch.equal(net(x), before)
    for p in network.parameters():
        p.data.normal_()
    assert not torch.allclose(net(x), before)
    network.remove()
    assert all(net.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(net(x), before)


def test_lora_linear_computes_base_plus_scaled_low_rank():
    torch.manual_seed(1)
    base = nn.Linear(10, 6)
    m = lora.LoRALinear(base, rank=3, alpha=6)
    m.lora_up.data.normal_()
    x = torch.randn(4, 10)
    expected = base(x) + 2.0 * (x @ m.lora_down.T @ m.lora_up.T)
    torch.testing.assert_close(m(x), expected)
    m.multiplier = 0.5
    torch.testing.assert_close(m(x), base(x) + 1.0 * (x @ m.lora_down.T @ m.lora_up.T))


def test_locon_conv_matches_merged_weight():
    torch.manual_seed(2)
    base = nn.Conv2d(8, 6, 3, padding=1)
    m = lora.LoRAConv2d(base, rank=2, alpha=1)
    m.lora_up.data.normal_()
    x = torch.randn(2, 8, 9, 7)
    merged = base.weight + 0.5 * (m.lora_up.flatten(1) @ m.lora_down.flatten(1)).reshape(base.weight.shape)
    torch.testing.assert_close(m(x), torch.nn.functional.conv2d(x, merged, base.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_kohya_state_dict_layout():
    network = lora.inject(Net(), ["blocks.0.proj_in"], "lora_unet_", rank=4, alpha=2)
    sd = network.kohya_state_dict(torch.float16)
    assert set(sd) == {"lora_unet_blocks_0_proj_in.lora_down.weight", "lora_unet_blocks_0_proj_in.lora_up.weight", "lora_unet_blocks_0_proj_in.alpha"}
    assert sd["lora_unet_blocks_0_proj_in.lora_down.weight"].shape == (4, 12) and sd["lora_unet_blocks_0_proj_in.lora_up.weight"].shape == (12, 4)
    assert sd["lora_unet_blocks_0_proj_in.alpha"].ndim == 0 and sd["lora_unet_blocks_0_proj_in.alpha"].item() == 2.0
    assert all(t.dtype == torch.float16 for t in sd.values())
