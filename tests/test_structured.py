import torch
import transformers

from framework.compression.structured import prune_structured


def tiny_llama(layers: int = 3) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2)]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def make_dead_units(model) -> None:
    """Zero what the pruner should remove: KV group 1's output columns in every layer, the first 43
    MLP channels' down_proj columns, and all of layer 1's residual writes (an identity block)."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight[:, 32:] = 0  # query heads 2, 3 = KV group 1
            layer.mlp.down_proj.weight[:, :43] = 0
            if i == 1:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()


def test_removes_dead_units_without_changing_outputs():
    model = tiny_llama()
    make_dead_units(model)
    layers = list(model.model.layers)
    kept_q = model.model.layers[2].self_attn.q_proj.weight[:32].clone()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        size_before = n_params(model)
        prune_structured(model, calib(), heads_ratio=0.5, mlp_ratio=0.25, drop_layers=1)
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5)  # only dead units were removed
    assert list(model.model.layers) == [layers[0], layers[2]]  # the identity block was dropped
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, kept_q)  # group 0 kept
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert n_params(model) < size_before


def test_config_and_shapes_updated():
    model = tiny_llama()
    prune_structured(model, calib(), heads_ratio=0.5, mlp_ratio=0.25, drop_layers=1)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    assert cfg.intermediate_size == 172 - 43 and cfg.num_hidden_layers == 2
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
        assert attn.o_proj.weight.shape == (64, 32) and attn.num_key_value_groups == 2
        assert mlp.up_proj.weight.shape == (129, 64) and mlp.down_proj.weight.shape == (64, 129)


def test_head_count_rounded_to_divide_hidden_size():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # removing 1/6 would leave 5 heads (48 % 5 != 0): 4 and 6 are equally near, keep more
    prune_structured(model, [torch.randint(0, 64, (1, 8))], heads_ratio=1 / 6)
    assert model.config.num_attention_heads == 6
    prune_structured(model, [torch.randint(0, 64, (1, 8))], heads_ratio=1 / 3)
    assert model.config.num_attention_heads == 4 and model.config.head_dim == 8


def test_generate_and_save_reload(tmp_path):
    model = tiny_llama()
    prune_structured(model, calib(), heads_ratio=0.5, mlp_ratio=0.5, drop_layers=1)
    ids = torch.randint(0, 256, (1, 8))
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)  # KV cache layer_idx correct
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert n_params(reloaded) == n_params(model)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits)
