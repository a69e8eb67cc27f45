from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from framework.compression.gradual import GradualPruning, cubic_sparsity
from framework.compression.pruning import (
    check_n_m,
    prunable_linears,
    prune_magnitude,
    prune_sparsegpt,
    prune_wanda,
    sparsity_report,
)


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """Tiny Llama whose embeddings are correlated and have outlier channels, like trained LMs."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(_correlated_features(256, 64))
    return model


def _correlated_features(rows: int, dim: int) -> torch.Tensor:
    low_rank = torch.randn(rows, 8) @ torch.randn(8, dim)
    return (low_rank + 0.1 * torch.randn(rows, dim)) * torch.logspace(-1, 1, dim)


class OneLinear(nn.Module):
    """A 'transformer' with one block that is a single Linear: its inputs are the embeddings."""

    def __init__(self, vocab: int = 512, d_in: int = 64, d_out: int = 48):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_in)
        with torch.no_grad():
            self.embed.weight.copy_(_correlated_features(vocab, d_in))
        self.layers = nn.ModuleList([nn.Linear(d_in, d_out)])

    def forward(self, ids, **kwargs):
        return self.layers[0](self.embed(ids))


def calib_batches(n: int = 4, vocab: int = 256, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 32), generator=gen) for _ in range(n)]


def test_prunable_linears_llama_excludes_embeddings_and_head():
    names = set(prunable_linears(tiny_llama()))
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert not any("lm_head" in n or "embed" in n for n in names)


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_prunable_linears_gpt2_conv1d():
    layers = prunable_linears(tiny_gpt2())
    assert len(layers) == 2 * 4 and all(isinstance(m, Conv1D) for m in layers.values())
    assert "transformer.h.1.mlp.c_proj" in layers


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_gpt2_conv1d_pruned_along_input_dim(method):
    calib = calib_batches(2, vocab=128)
    for n_m in [None, (2, 4)]:
        model = tiny_gpt2()
        if method == "magnitude":
            prune_magnitude(model, 0.5, n_m=n_m)
        elif method == "wanda":
            prune_wanda(model, calib, 0.5, n_m=n_m)
        else:
            prune_sparsegpt(model, calib, 0.5, n_m=n_m, block_size=32)
        for layer in prunable_linears(model).values():
            weight = layer.weight.t()  # Conv1D stores [in, out]
            if n_m:
                assert check_n_m(weight, 2, 4)
            elif method != "magnitude":
                assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()
        assert sparsity_report(model)["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.73])
def test_magnitude_layer_scope_exact_and_smallest(sparsity):
    model = tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    report = prune_magnitude(model, sparsity)
    for name, layer in prunable_linears(model).items():
        w, w0 = layer.weight, before[name]
        assert (w == 0).sum() == round(sparsity * w.numel())
        assert report["layers"][name]["nonzero"] == torch.count_nonzero(w)
        kept = w != 0
        assert torch.equal(w[kept], w0[kept])  # survivors untouched
        assert w0[~kept].abs().max() <= w0[kept].abs().min()  # the smallest were removed


def test_magnitude_ties_do_not_break_exactness():
    model = tiny_llama()
    for layer in prunable_linears(model).values():
        nn.init.constant_(layer.weight, 0.5)
    report = prune_magnitude(model, 0.5)
    for name, layer in prunable_linears(model).items():
        assert report["layers"][name]["nonzero"] == layer.weight.numel() - round(0.5 * layer.weight.numel())


def test_magnitude_global_scope_exact_total_with_uneven_layers():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(100)  # a layer that should survive
    report = prune_magnitude(model, 0.5, scope="global")
    assert report["params"] - report["nonzero"] == round(0.5 * report["params"])
    layer_sparsity = {n: r["sparsity"] for n, r in report["layers"].items()}
    assert layer_sparsity["model.layers.0.mlp.up_proj"] < 0.05
    assert max(layer_sparsity.values()) > 0.5


def test_sparsity_report_totals():
    model = tiny_llama()
    report = sparsity_report(model)
    assert report["sparsity"] == 0.0
    assert report["params"] == sum(m.weight.numel() for m in prunable_linears(model).values())
    assert report["params"] == sum(r["params"] for r in report["layers"].values())


def test_check_n_m_detects_violation():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    assert check_n_m(w, 2, 4)
    w[0, 1] = 3.0
    assert not check_n_m(w, 2, 4)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_n_m_2_4_every_group(method):
    model = tiny_llama()
    calib = calib_batches(2)
    if method == "magnitude":
        report = prune_magnitude(model, 0.0, n_m=(2, 4))
    elif method == "wanda":
        report = prune_wanda(model, calib, 0.0, n_m=(2, 4))
    else:
        report = prune_sparsegpt(model, calib, 0.0, n_m=(2, 4), block_size=32)
    for layer in prunable_linears(model).values():
        assert check_n_m(layer.weight, 2, 4)
    assert report["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_methods_exact_per_row(method):
    model = tiny_llama()
    if method == "wanda":
        report = prune_wanda(model, calib_batches(2), 0.6)
    else:  # blocks of 48 do not divide 64 or 128: per-block counts must still add up per row
        report = prune_sparsegpt(model, calib_batches(2), 0.6, block_size=48)
    for layer in prunable_linears(model).values():
        zeros_per_row = (layer.weight == 0).sum(dim=1)
        assert (zeros_per_row == int(0.6 * layer.in_features)).all()
    assert report["sparsity"] == pytest.approx(0.6, abs=0.01)


def _layer_output_error(prune) -> float:
    torch.manual_seed(0)
    model = OneLinear()
    calib = calib_batches(4, vocab=512)
    x = torch.cat([model.embed(ids) for ids in calib]).detach()
    with torch.no_grad():
        dense = model.layers[0](x)
        prune(model, calib)
        return (model.layers[0](x) - dense).pow(2).mean().item()


def test_single_linear_error_ordering_magnitude_wanda_sparsegpt():
    magnitude = _layer_output_error(lambda m, c: prune_magnitude(m, 0.5))
    wanda = _layer_output_error(lambda m, c: prune_wanda(m, c, 0.5))
    sparsegpt = _layer_output_error(lambda m, c: prune_sparsegpt(m, c, 0.5))
    # inputs with channel scales spanning 100x: activation-aware scoring must win clearly
    assert wanda < 0.5 * magnitude
    # correlated inputs: the OBS weight update must reduce the reconstruction error further
    assert sparsegpt < 0.8 * wanda


def test_tiny_llama_sparsegpt_logits_closer_than_wanda():
    calib = calib_batches(4)
    ids = torch.cat(calib)
    with torch.no_grad():
        dense = tiny_llama()(ids).logits
    errors = {}
    for name, prune in [("wanda", prune_wanda), ("sparsegpt", prune_sparsegpt)]:
        model = tiny_llama()
        prune(model, calib, 0.5)
        with torch.no_grad():
            errors[name] = (model(ids).logits - dense).pow(2).mean().item()
    assert errors["sparsegpt"] < 0.5 * errors["wanda"]


def test_sparsegpt_keeps_model_dtype():
    model = tiny_llama().to(torch.bfloat16)
    prune_sparsegpt(model, calib_batches(1), 0.5)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16
    assert ((layer.weight == 0).sum(dim=1) >= 32).all()


# ---------------------------------------------------------------------------------------
# Gradual pruning during training


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 10, 50, 0.8) == 0.0
    assert cubic_sparsity(10, 10, 50, 0.8) == 0.0
    assert cubic_sparsity(30, 10, 50, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(50, 10, 50, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(99, 10, 50, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(10, 10, 50, 0.8, initial_sparsity=0.2) == pytest.approx(0.2)
    values = [cubic_sparsity(s, 0, 20, 0.5) for s in range(21)]
    assert values == sorted(values)  # monotone, fastest early
    assert values[1] - values[0] > values[20] - values[19]


class TinyLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (32, 16), generator=gen)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


class ZerosHold(pl.Callback):
    """After every batch (so after its optimizer step) all masked weights must be zero, and
    weights once pruned must stay pruned."""

    def __init__(self, pruning: GradualPruning, pruned: dict | None = None):
        self.pruning, self.pruned, self.checked = pruning, pruned or {}, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, layer in prunable_linears(pl_module.model).items():
            zero = layer.weight == 0
            if name in self.pruning.masks:
                assert zero[~self.pruning.masks[name]].all(), name
            assert zero[self.pruned.get(name, torch.zeros_like(zero))].all(), name
            self.pruned[name] = zero
        self.checked += 1


def _trainer(max_steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def test_gradual_pruning_reaches_exact_sparsity_and_zeros_hold(tmp_path):
    pruning = GradualPruning(0.6, start_step=1, end_step=12, every_n_steps=4)
    module, check = TinyLM(), ZerosHold(pruning)
    trainer = _trainer(8, [pruning, check])
    trainer.fit(module)
    assert 0.0 < sparsity_report(module.model)["sparsity"] < 0.6  # halfway through the schedule
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    pruned_at_save = {name: layer.weight == 0 for name, layer in prunable_linears(module.model).items()}

    # resume with a new module and callback: the masks must come back from the checkpoint
    pruning = GradualPruning(0.6, start_step=1, end_step=12, every_n_steps=4)
    module, check = TinyLM(), ZerosHold(pruning, pruned_at_save)
    _trainer(16, [pruning, check]).fit(module, ckpt_path=tmp_path / "mid.ckpt")
    assert check.checked == 8
    report = sparsity_report(module.model)
    for name, layer in prunable_linears(module.model).items():
        assert report["layers"][name]["nonzero"] == layer.weight.numel() - round(0.6 * layer.weight.numel())
    assert pruning.masks == {}  # permanent now: masks dropped at the end of training


def test_gradual_pruning_restores_masks_on_load():
    trainer = SimpleNamespace(global_step=0)
    pruning = GradualPruning(0.5, start_step=0, end_step=0)
    pruning.on_train_batch_start(trainer, TinyLM(), None, 0)
    state = pruning.state_dict()
    assert all(mask.dtype == torch.bool for mask in state["masks"].values())

    restored, fresh = GradualPruning(0.5, start_step=0, end_step=0), TinyLM()
    restored.load_state_dict(state)
    with torch.no_grad():  # different magnitudes: recomputing would pick other weights
        for layer in prunable_linears(fresh.model).values():
            layer.weight.normal_()
    restored.on_train_start(trainer, fresh)
    restored.on_train_batch_start(trainer, fresh, None, 0)  # step 0 was already pruned
    for name, layer in prunable_linears(fresh.model).items():
        assert torch.equal(layer.weight != 0, state["masks"][name])


def test_gradual_pruning_n_m():
    pruning = GradualPruning(0.5, start_step=0, end_step=4, every_n_steps=2, n_m=(2, 4))
    module = TinyLM()
    _trainer(6, [pruning]).fit(module)
    for layer in prunable_linears(module.model).values():
        assert check_n_m(layer.weight, 2, 4)
