import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

from framework.compression.distillation import (
    check_same_vocabulary,
    check_vocab_sizes,
    derive_student,
    distillation_loss,
)

VOCAB = 64


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, VOCAB, generator=generator)
    teacher = 3 * torch.randn(2, 6, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 6), generator=generator)
    return student, teacher, labels


def _soft(student, teacher, labels, kind, temperature=2.0):
    return distillation_loss(student, teacher, labels, kind=kind, temperature=temperature, alpha=1.0)[0]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_zero_for_identical_logits_positive_otherwise(logits, kind):
    student, teacher, labels = logits
    assert _soft(teacher, teacher, labels, kind).abs() < 1e-6
    assert _soft(student, teacher, labels, kind) > 1e-3


def test_forward_kl_matches_manual_temperature_scaled_formula(logits):
    student, teacher, labels = logits
    t = 3.0
    log_s = F.log_softmax(student[:, :-1] / t, -1)
    log_t = F.log_softmax(teacher[:, :-1] / t, -1)
    manual = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t**2
    torch.testing.assert_close(_soft(student, teacher, labels, "forward_kl", t), manual)


def test_reverse_kl_differs_from_forward_kl(logits):
    student, teacher, labels = logits
    forward = _soft(student, teacher, labels, "forward_kl")
    reverse = _soft(student, teacher, labels, "reverse_kl")
    assert not torch.isclose(forward, reverse, rtol=1e-2)


def test_jsd_is_symmetric_and_bounded(logits):
    student, teacher, labels = logits
    t = 2.0
    jsd = _soft(student, teacher, labels, "jsd", t)
    torch.testing.assert_close(jsd, _soft(teacher, student, labels, "jsd", t))
    # Disjoint one-hot distributions reach the bound log 2 · T².
    one_hot_a, one_hot_b = torch.full((2, 1, 2, VOCAB), -1e4).unbind(0)
    one_hot_a[..., 0] = 1e4
    one_hot_b[..., 1] = 1e4
    extreme = _soft(one_hot_a, one_hot_b, torch.zeros(1, 2, dtype=torch.long), "jsd", t)
    assert jsd < extreme
    torch.testing.assert_close(extreme, torch.tensor(math.log(2) * t**2))


def test_alpha_zero_is_plain_cross_entropy(logits):
    student, teacher, labels = logits
    loss, parts = distillation_loss(student, teacher, labels, alpha=0.0)
    expected = F.cross_entropy(student[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["hard"], expected)


def test_alpha_mixes_soft_and_hard(logits):
    student, teacher, labels = logits
    loss, parts = distillation_loss(student, teacher, labels, alpha=0.3)
    torch.testing.assert_close(loss, 0.3 * parts["soft"] + 0.7 * parts["hard"])
    assert not parts["soft"].requires_grad and not parts["hard"].requires_grad


def test_ignored_positions_are_excluded_from_both_terms(logits):
    student, teacher, labels = logits
    masked = labels.clone()
    masked[:, 3:] = -100  # predictions from positions 2.. are ignored
    changed = student.clone()
    changed[:, 2:-1] = 100 * torch.randn_like(changed[:, 2:-1])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        original = distillation_loss(student, teacher, masked, kind=kind)[0]
        torch.testing.assert_close(distillation_loss(changed, teacher, masked, kind=kind)[0], original)
    truncated = distillation_loss(student[:, :3], teacher[:, :3], labels[:, :3])[0]
    torch.testing.assert_close(distillation_loss(student, teacher, masked)[0], truncated)


def test_all_ignored_gives_zero_not_nan(logits):
    student, teacher, labels = logits
    loss, _ = distillation_loss(student, teacher, torch.full_like(labels, -100))
    assert loss.item() == 0.0


def test_gradient_reaches_student_only(logits):
    student, teacher, labels = logits
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    distillation_loss(student, teacher, labels, kind="jsd")[0].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_and_extreme_logits_give_finite_float32_loss(logits, kind):
    student, teacher, labels = logits
    student = (student * 1e4).bfloat16().requires_grad_()
    loss, _ = distillation_loss(student, (teacher * 1e4).bfloat16(), labels, kind=kind)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


def test_vocab_mismatch_names_both_sizes(logits):
    student, teacher, labels = logits
    with pytest.raises(ValueError, match=r"64.*65"):
        distillation_loss(student, torch.randn(2, 6, 65), labels)
    with pytest.raises(ValueError, match=r"64.*65"):
        check_vocab_sizes(SimpleNamespace(vocab_size=64), SimpleNamespace(vocab_size=65))
    check_vocab_sizes(SimpleNamespace(vocab_size=64), SimpleNamespace(vocab_size=64))


def test_unknown_kind_raises(logits):
    with pytest.raises(ValueError, match="forward_kl"):
        distillation_loss(*logits, kind="mse")


def test_check_same_vocabulary():
    def tokenizer(vocab):
        return SimpleNamespace(get_vocab=lambda: dict(vocab))

    check_same_vocabulary(tokenizer({"a": 0, "b": 1}), tokenizer({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="differ"):
        check_same_vocabulary(tokenizer({"a": 0, "b": 1}), tokenizer({"a": 1, "b": 0}))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_student_keeps_evenly_spaced_layers_with_teacher_weights(teacher):
    student = derive_student(teacher, num_layers=3)
    assert student.config.num_hidden_layers == 3
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    for new_index, old_index in enumerate([0, 2, 4]):  # first and last always kept
        new, old = student.model.layers[new_index], teacher.model.layers[old_index]
        for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
            assert torch.equal(a, b), name
        assert new.self_attn.layer_idx == new_index
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight


def test_layer_ratio(teacher):
    assert derive_student(teacher, layer_ratio=0.4).config.num_hidden_layers == 2


def test_full_width_full_depth_student_is_identical(teacher):
    tokens = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(derive_student(teacher)(tokens).logits, teacher(tokens).logits)


def test_narrow_mlp_keeps_most_important_channels(teacher):
    student = derive_student(teacher, num_layers=2, intermediate_ratio=0.5)
    assert student.config.intermediate_size == 48
    old, new = teacher.model.layers[4].mlp, student.model.layers[1].mlp
    importance = (
        old.down_proj.weight.norm(dim=0) * old.up_proj.weight.norm(dim=1) * old.gate_proj.weight.norm(dim=1)
    )
    kept = importance.topk(48).indices.sort().values
    assert torch.equal(new.up_proj.weight, old.up_proj.weight[kept])
    assert torch.equal(new.down_proj.weight, old.down_proj.weight[:, kept])


def test_student_generates_and_round_trips(teacher, tmp_path):
    student = derive_student(teacher, num_layers=2, intermediate_ratio=0.5).eval()
    tokens = torch.randint(0, 128, (1, 5))
    generated = student.generate(tokens, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)

    student.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, student(tokens).logits)


def test_invalid_layer_count_raises(teacher):
    with pytest.raises(ValueError, match="layers"):
        derive_student(teacher, num_layers=6)
