import pytest
import torch
import transformers
from torch import nn

from framework.compression.lowrank import LowRankLinear, apply_lowrank_spec, lowrank_factorize


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


class OneLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(weight.shape[1], weight.shape[0])])
        with torch.no_grad():
            self.layers[0].weight.copy_(weight)

    def forward(self, x):
        return self.layers[0](x)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def with_spectrum(singular_values: torch.Tensor, out: int = 48, inp: int = 40) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(out, len(singular_values)))
    V, _ = torch.linalg.qr(torch.randn(inp, len(singular_values)))
    return U @ torch.diag(singular_values) @ V.T


def test_llama_mlp_factorized_smaller():
    model = tiny_llama()
    before = n_params(model)
    spec = lowrank_factorize(model, rank=8)
    assert set(spec) == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert set(spec.values()) == {8}
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)  # not targeted
    assert n_params(model) == before - 6 * (64 * 172 - 8 * (64 + 172))


def test_exact_at_the_matrix_rank_and_error_decreases_with_rank():
    torch.manual_seed(0)
    x = torch.randn(32, 40)
    exact = OneLinear(with_spectrum(torch.linspace(3, 1, 6)))
    with torch.no_grad():
        dense = exact(x)
        assert lowrank_factorize(exact, rank=6, targets=["layers"]) == {"layers.0": 6}
        assert torch.allclose(exact(x), dense, atol=1e-5)

    errors = []
    for rank in (2, 4, 8, 16):
        torch.manual_seed(1)
        model = OneLinear(torch.randn(48, 40))
        with torch.no_grad():
            dense = model(x)
            lowrank_factorize(model, rank=rank, targets=["layers"])
            errors.append((model(x) - dense).pow(2).mean().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.7 * errors[0]


@pytest.mark.parametrize("energy, expected", [(0.5, 1), (0.8, 2), (0.95, 3), (0.999, 5)])
def test_energy_picks_smallest_sufficient_rank(energy, expected):
    torch.manual_seed(0)
    # squared: 16, 4, 1, 0.25, 0.0625 of 21.3125 -> cumulative 0.751, 0.938, 0.985, 0.997, 1.0
    model = OneLinear(with_spectrum(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25])))
    assert lowrank_factorize(model, energy=energy, targets=["layers"]) == {"layers.0": expected}


def test_skips_layers_that_would_not_shrink():
    model = OneLinear(torch.randn(8, 8))
    assert lowrank_factorize(model, rank=4, targets=["layers"]) == {}  # 4 * 16 == 64
    assert isinstance(model.layers[0], nn.Linear)
    assert lowrank_factorize(model, rank=3, targets=["layers"]) == {"layers.0": 3}


def test_gpt2_conv1d_factorized_exactly():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    c_fc = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        c_fc.weight.copy_(with_spectrum(torch.linspace(2, 1, 4), out=32, inp=128))  # [in, out]
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        dense = model(ids).logits
        assert lowrank_factorize(model, rank=4, targets=["c_fc"]) == {"transformer.h.0.mlp.c_fc": 4}
        assert torch.allclose(model(ids).logits, dense, atol=1e-5)


def test_apply_spec_then_load_state_dict_reproduces_outputs():
    model = tiny_llama()
    spec = lowrank_factorize(model, energy=0.5, targets=["mlp", "o_proj"])
    assert any("o_proj" in name for name in spec)
    fresh = apply_lowrank_spec(tiny_llama(seed=1), spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
