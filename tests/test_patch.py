"""``patch``/``unpatch``: same tensors and keys, fused activations, faithful refusals, and real
third-party architectures (transformers BERT, diffusers UNet2DModel; tiny configs, random
weights, nothing downloaded) that match their unpatched twins in train and eval mode."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch import nn

from helpers import FP32_RTOL, max_err, scale
from tritonorm.nn import modules as tn
from tritonorm.nn.sync_batchnorm import SyncBatchNorm
from tritonorm.patching import FusedActivation, patch, report, unpatch


def assert_like_torch(ours, eager32, ref64, what):
    """Whole models: the patched fp32 model's error against the float64 twin must be of the order
    of the unpatched fp32 model's own (at most 8x: per-layer rounding differences are amplified
    by every layer after them, and batch statistics over a few samples are ill-conditioned), plus
    the fp32 rule's 2e-5 of the scale and 1e-6 absolute (some gradients are zero in exact
    arithmetic, e.g. a conv bias before a BatchNorm)."""
    err, err_torch = max_err(ours, ref64), max_err(eager32, ref64)
    tol = 8 * err_torch + FP32_RTOL * scale(ref64) + 1e-6
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.3e} (torch fp32 error {err_torch:.3e})"


def _twins(model):
    """(patched model, unpatched fp32 twin, unpatched float64 twin), same weights."""
    eager = copy.deepcopy(model)
    ref = copy.deepcopy(model).double()
    return patch(model), eager, ref


def _compare_models(model, make_input, *, train_steps=1, what="model", forward=None):
    forward = forward or (lambda m, x: m(x))
    patched, eager, ref = _twins(model)
    for training in [True] * train_steps + [False]:
        for m in (patched, eager, ref):
            m.train(training)
            m.zero_grad(set_to_none=True)
        x = make_input()
        outs = [forward(m, x if m is not ref else _double(x)) for m in (patched, eager, ref)]
        mode = "train" if training else "eval"
        assert_like_torch(outs[0], outs[1], outs[2], f"{what} {mode} output")
        dy = torch.randn_like(outs[0])
        for o in outs:
            o.backward(dy.to(o.dtype))
        for (name, p), p32, p64 in zip(patched.named_parameters(), eager.parameters(), ref.parameters()):
            if p64.grad is not None:
                assert_like_torch(p.grad, p32.grad, p64.grad, f"{what} {mode} grad {name}")
        for (name, b), b32, b64 in zip(patched.named_buffers(), eager.buffers(), ref.buffers()):
            if b.is_floating_point():
                assert_like_torch(b, b32, b64, f"{what} {mode} buffer {name}")
            else:
                assert torch.equal(b, b32), f"{what}: buffer {name}"
    return patched


def _double(x):
    return x.double() if torch.is_tensor(x) and x.is_floating_point() else x


class Block(nn.Module):
    """A ResNet basic block with its norms and activations in Sequentials (fusible)."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + x)


def small_cnn():
    # Every torch norm patch replaces, each followed by a fusible activation. Tiny: the kernels
    # run in Triton's interpreter.
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block(4),
                         nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                         nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                         nn.LeakyReLU(0.01), nn.Flatten(), nn.LayerNorm(4 * 3 * 3), nn.Tanh(),
                         nn.Linear(36, 6), nn.BatchNorm1d(6, momentum=None), nn.Sigmoid())


def test_patch_keeps_tensors_keys_and_flags():
    model = small_cnn().train(False)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    keys = list(model.state_dict())
    out = patch(model)
    assert out is model and not model.training
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert {n: id(b) for n, b in model.named_buffers()} == {n: id(b) for n, b in buffers.items()}
    assert list(model.state_dict()) == keys
    assert type(model[1]) is tn.BatchNorm2d and model[1].activation == "relu"
    assert isinstance(model[2], FusedActivation)
    assert type(model[3].body[1]) is tn.BatchNorm2d and model[3].body[1].activation == "relu"
    assert model[5].activation == "silu" and model[7].activation == "leaky_relu"
    assert model[10].activation == "tanh" and model[13].activation == "sigmoid"
    rep = report(model)
    assert len(rep.replaced) == 7 and len(rep.fused) == 6 and not rep.left_alone
    # A state_dict saved from the patched model loads into a plain torch model and back.
    plain = small_cnn()
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


def test_patched_cnn_matches_unpatched():
    _compare_models(small_cnn(), lambda: torch.randn(4, 3, 3, 3), train_steps=2, what="cnn")


def test_unpatch_restores_torch_modules():
    model = small_cnn()
    ids = [id(m) for m in model.modules()]
    twin = copy.deepcopy(model)
    patch(model)
    unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in twin.modules()]
    assert [id(m) for m in model.modules()] == ids
    assert all(not hasattr(m, "activation") for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.eval(), twin.eval()
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(model(x), twin(x))


def test_left_alone_and_reported(caplog):
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    shared = nn.BatchNorm2d(4)
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda m, i, o: None)
    custom_forward = nn.GroupNorm(2, 4)
    custom_forward.forward = lambda x: x
    model = nn.Sequential(MyBN(4), nn.ReLU(), shared, nn.ReLU(), shared, nn.LeakyReLU(0.2), hooked,
                          nn.ReLU(), custom_forward, nn.GELU())
    with caplog.at_level(logging.INFO, logger="tritonorm.patch"):
        patch(model)
    assert "left" in caplog.text
    rep = report(model)
    reasons = " | ".join(f"{n}:{why}" for n, _, why in rep.left_alone)
    assert type(model[0]) is MyBN and "0:subclass" in reasons
    assert type(model[2]) is tn.BatchNorm2d and model[2].activation is None and "more than one place" in reasons
    assert isinstance(model[5], nn.LeakyReLU) and "5:not fused" in reasons
    assert model[6].activation is None and "hooks" in reasons
    assert type(model[8]) is nn.GroupNorm and "overridden" in reasons
    assert isinstance(model[9], nn.GELU)


def test_patch_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        patch("not a model")
    model = small_cnn()
    with pytest.raises(TypeError, match="fuse_activation"):
        patch(model, fuse_activation=1)
    assert type(model[1]) is nn.BatchNorm2d


def test_sync_batchnorm_conversion_single_process():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    twin = copy.deepcopy(model)
    patch(model, sync_batchnorm=True)
    assert type(model[1]) is SyncBatchNorm and model[1].activation == "relu"
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
    unpatch(model)
    assert type(model[1]) is nn.BatchNorm2d and "process_group" not in model[1].__dict__


def test_patched_bert_matches_unpatched():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg)
    patched = _compare_models(model, lambda: torch.randint(0, 40, (2, 7)), what="bert",
                              forward=lambda m, ids: m(input_ids=ids).last_hidden_state)
    assert sum(type(m) is tn.LayerNorm for m in patched.modules()) == 5


def test_patched_diffusers_unet_matches_unpatched():
    diffusers = pytest.importorskip("diffusers")
    # GroupNorm + SiLU ResNet blocks; no attention blocks, to keep the interpreter's work small.
    model = diffusers.UNet2DModel(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(4, 8),
                                  layers_per_block=1, norm_num_groups=2, attention_head_dim=4,
                                  add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"))
    t = torch.tensor([3, 500])
    patched = _compare_models(model, lambda: torch.randn(2, 2, 4, 4), what="unet",
                              forward=lambda m, x: m(x, t).sample)
    assert sum(type(m) is tn.GroupNorm for m in patched.modules()) == 17
    _check_doc_counts("diffusers UNet2DModel", patched)


# --- real model families: counts measured here are the table in docs/patching.md ------------

def _doc_counts() -> dict[str, tuple[int, int, int]]:
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "patching.md").read_text()
    rows = re.findall(r"^\| (.+?) \| (\d+) \| (\d+) \| (\d+) \|$", doc, flags=re.M)
    return {name: tuple(map(int, nums)) for name, *nums in rows}


def _check_doc_counts(model_name: str, patched) -> None:
    rep = report(patched)
    measured = (len(rep.replaced), len(rep.fused), len(rep.left_alone))
    assert _doc_counts().get(model_name) == measured, \
        f"docs/patching.md's row for {model_name} must read {measured} (replaced, fused, left alone)"


def _tiny_lm(family: str):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, family + "Config")(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16, head_dim=8)
    model = getattr(transformers, family + "Model")(cfg)
    with torch.no_grad():  # norm weights start at ones (zeros for Gemma): make them tell
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("family,kind", [("Llama", "rms"), ("Qwen2", "rms"), ("Mistral", "rms"),
                                         ("Gemma", "rms_offset")])
def test_transformers_rmsnorm_families(family, kind):
    from tritonorm.adapters import AdaptedNorm

    model = _tiny_lm(family)
    names = [n for n, m in model.named_modules() if type(m).__name__ == f"{family}RMSNorm"]
    patched = _compare_models(model, lambda: torch.randint(0, 40, (2, 5)), what=family.lower(),
                              forward=lambda m, ids: m(input_ids=ids).last_hidden_state)
    for n in names:
        m = patched.get_submodule(n)
        assert type(m) is AdaptedNorm and m.kind == kind
    _check_doc_counts(f"transformers {family}Model", patched)
    keys = list(patched.state_dict())
    unpatch(patched)
    assert list(patched.state_dict()) == keys
    assert all(type(patched.get_submodule(n)).__name__ == f"{family}RMSNorm" for n in names)


def test_transformers_convnext_layernorms():
    transformers = pytest.importorskip("transformers")
    from tritonorm.adapters import AdaptedNorm

    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16],
                                      depths=[1, 1], num_stages=2, image_size=8)
    model = transformers.ConvNextModel(cfg)
    patched = _compare_models(model, lambda: torch.randn(2, 3, 8, 8), what="convnext",
                              forward=lambda m, x: m(x).last_hidden_state)
    kinds = sorted(m.kind for m in patched.modules() if type(m) is AdaptedNorm)
    assert kinds == ["layer", "layer", "layer_channels_first", "layer_channels_first"]
    _check_doc_counts("transformers ConvNextModel", patched)


def test_candidate_that_behaves_differently_is_left_alone():
    class ScaledRMSNorm(nn.Module):  # looks like an RMSNorm, computes 2 * rms_norm
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

        def forward(self, x):
            return 2 * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight

    model = nn.Sequential(nn.Linear(4, 8), ScaledRMSNorm(8))
    patch(model)
    assert type(model[1]) is ScaledRMSNorm
    (name, typ, why), = report(model).left_alone
    assert (name, typ) == ("1", "ScaledRMSNorm") and "probe" in why


def test_diffusers_resnet_block_fuses_groupnorm_silu():
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    from tritonorm import adapters

    block = ResnetBlock2D(in_channels=4, out_channels=6, temb_channels=5,
                                                  groups=2, groups_out=2)
    temb = torch.randn(2, 5)
    patched = _compare_models(block, lambda: torch.randn(2, 4, 4, 4), what="resnet block",
                              forward=lambda m, x: m(x, temb.to(x.dtype)))
    assert isinstance(patched.__dict__.get("forward"), functools.partial)
    assert [f[0] for f in report(patched).fused] == ["norm1", "norm2"]
    calls = []
    real = adapters.functional.group_norm
    try:
        adapters.functional.group_norm = lambda *a, **k: calls.append(k["activation"]) or real(*a, **k)
        patched(torch.randn(2, 4, 4, 4), temb)
    finally:
        adapters.functional.group_norm = real
    assert calls == ["silu", "silu"]
    unpatch(patched)
    assert "forward" not in patched.__dict__ and type(patched.norm1) is nn.GroupNorm


@pytest.mark.parametrize("affine", [True, False])
def test_diffusers_resnet_block_scale_shift_is_one_norm_call(affine):
    # norm2(h) * (1 + scale) + shift, then SiLU: one GroupNorm call with a per-sample weight and
    # bias (norm2's affine folded in) and the SiLU fused, against the unpatched block at fp32 and
    # float64: outputs, parameter gradients (the _compare_models loop) and input/temb gradients.
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    from tritonorm import adapters

    block = ResnetBlock2D(in_channels=4, out_channels=6, temb_channels=5, groups=2, groups_out=3,
                          time_embedding_norm="scale_shift")
    if not affine:
        block.norm2 = nn.GroupNorm(3, 6, affine=False)
    with torch.no_grad():
        for p in block.parameters():  # norm2's ones/zeros would hide a wrong fold
            p.normal_(0.0, 0.5)
    temb = torch.randn(2, 5)
    patched = _compare_models(block, lambda: torch.randn(2, 4, 4, 4), what="scale_shift block",
                              forward=lambda m, x: m(x, temb.to(x.dtype)))
    assert [f[0] for f in report(patched).fused] == ["norm1", "norm2"]
    unpatched = copy.deepcopy(patched)
    unpatch(unpatched)
    ref = copy.deepcopy(unpatched).double()
    x, t = torch.randn(2, 4, 4, 4), torch.randn(2, 5)
    ins = [(x.clone().requires_grad_(), t.clone().requires_grad_()) for _ in range(2)]
    ins64 = (x.double().requires_grad_(), t.double().requires_grad_())
    calls = []
    real = adapters.norm
    try:
        adapters.norm = lambda x, *a, **k: calls.append((k["activation"], tuple(k["weight"].shape))) or \
            real(x, *a, **k)
        outs = [m(*i) for m, i in zip((patched, unpatched), ins)]
    finally:
        adapters.norm = real
    assert calls == [("silu", (2, 6, 1, 1))]
    out64 = ref(*ins64)
    dy = torch.randn_like(out64)
    g64 = torch.autograd.grad(out64, ins64, dy)
    grads = [torch.autograd.grad(o, i, dy.float()) for o, i in zip(outs, ins)]
    assert_like_torch(outs[0], outs[1], out64, "output")
    for k, name in enumerate(("dx", "dtemb")):
        assert_like_torch(grads[0][k], grads[1][k], g64[k], name)


# --- patched models behave like torch models ------------------------------------------------

def _fused_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8),
                          nn.GELU())
    return patch(model)


def test_deepcopy_then_unpatch_copy_leaves_both_working():
    model = _fused_model()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    twin = copy.deepcopy(model)
    unpatch(twin)
    assert type(twin[1]) is nn.BatchNorm2d and type(twin[2]) is nn.ReLU
    assert type(model[1]) is tn.BatchNorm2d and model[1].activation == "relu"
    assert isinstance(model[2], FusedActivation)
    torch.testing.assert_close(model(x), want)
    torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)
    unpatch(model)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_pickle_and_torch_save_of_fused_model(tmp_path):
    import pickle

    model = _fused_model()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    for loaded in (torch.load(path, weights_only=False), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(loaded(x), want)
        unpatch(loaded)
        assert type(loaded[2]) is nn.ReLU
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    # state_dict both ways: patched -> torch and torch -> patched, same keys.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(64, 8),
                          nn.LayerNorm(8), nn.GELU())
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    plain.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    model.load_state_dict(plain.state_dict())


def test_fx_symbolic_trace_of_patched_model():
    model = _fused_model().eval()
    model.append(tn.RMSNorm(8))
    x = torch.randn(2, 3, 4, 4)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    norms = [n for n in traced.graph.nodes if n.op == "call_function" and n.target.__name__ == "_call_norm"]
    assert len(norms) == 4


def test_compile_fullgraph_of_patched_model():
    model = _fused_model()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
