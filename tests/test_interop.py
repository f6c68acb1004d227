"""OpenCLIP/OpenAI weights in and out: embeddings equal open_clip's, exact round trips, files, the CLI.

OpenCLIP's random init has zero biases and unit LayerNorm scales, which would hide a
wrong mapping of those tensors: every bias, LayerNorm parameter and logit_scale is
perturbed first.
"""

import json
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from openclip_ref import open_clip

from clipjax import checkpoint as ckpt_lib
from clipjax import sharding
from clipjax.data import resize, transforms
from clipjax.data.tokenizer import get_tokenizer
from clipjax.evals import classnames as classnames_lib
from clipjax.evals import zeroshot
from clipjax.interop import cli
from clipjax.interop import openclip as interop
from clipjax.models import CLIP, build_model
from helpers import photo_framings
from clipjax.train_step import make_setup

# Empty, unicode, and longer than the context (truncated, last token forced to end-of-text).
CAPTIONS = ["", "Ünïcödé café ☕ — 東京の猫 naïve", "a photo of a very small dog on a red sofa " * 12]
# A non-B/32 OpenCLIP model with the options clipjax maps: head width, MLP ratios, average
# pooling, no ln_pre, a logit bias (SigLIP-style), another context length.
TINY = {"embed_dim": 48, "init_logit_bias": -10.0,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 3.0,
                       "patch_size": 8, "pool_type": "avg", "no_ln_pre": True},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.5}}


@pytest.fixture(scope="module")
def oc():
    return open_clip()


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim <= 1:  # biases, LayerNorm scales and shifts, class token, logit_scale
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _numpy_sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def b32(oc):
    """ViT-B-32 and ViT-B-32-quickgelu with the same (perturbed) weights: only the activation differs."""
    torch.manual_seed(0)
    gelu = _perturb(oc.create_model("ViT-B-32"), 1)
    quick = oc.create_model("ViT-B-32-quickgelu").eval()
    quick.load_state_dict(gelu.state_dict())
    return {"ViT-B-32": gelu, "ViT-B-32-quickgelu": quick}


@pytest.fixture(scope="module")
def b32_sd(b32):
    return _numpy_sd(b32["ViT-B-32"])


@pytest.fixture(scope="module")
def tiny(oc):
    torch.manual_seed(2)
    return _perturb(oc.CLIP(**TINY), 3)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_embed(model, images_nhwc, ids):
    with torch.no_grad():
        zi = model.encode_image(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()), normalize=True)
        zt = model.encode_text(torch.from_numpy(np.asarray(ids, np.int64)), normalize=True)
    return zi.numpy(), zt.numpy()


def _clipjax_embed(model_config, params, images_nhwc, ids):
    model = build_model(model_config)

    @jax.jit
    def embed(p, x, t):
        zi, zt, scale, bias = model.apply({"params": p}, x, t)
        return zi, zt, scale, bias

    return jax.device_get(embed(params, jnp.asarray(images_nhwc), jnp.asarray(ids, jnp.int32)))


NAMES = ("ViT-B-32", "ViT-B-32-quickgelu")


@pytest.fixture(scope="module")
def b32_clipjax(b32_sd):
    """OpenCLIP name -> clipjax (model config, params) of the shared B/32 weights."""
    return {name: interop.import_weights(b32_sd, model=name) for name in NAMES}


@pytest.fixture(scope="module")
def b32_embeddings(b32, b32_clipjax, bpe_path, oc):
    """name -> (clipjax (zimg, ztxt, scale, bias), open_clip (zimg, ztxt)) for two images and CAPTIONS."""
    ids = get_tokenizer("clip", context_length=77, bpe_path=bpe_path)(CAPTIONS)
    np.testing.assert_array_equal(ids, oc.get_tokenizer("ViT-B-32")(CAPTIONS).numpy())
    images = _images(2, 224)
    return {name: (_clipjax_embed(*b32_clipjax[name], images, ids), _torch_embed(b32[name], images, ids))
            for name in NAMES}


# ---------------------------------------------------------------- parity with open_clip


@pytest.mark.parametrize("name", NAMES)
def test_b32_embeddings_and_scale_equal_openclip(b32, b32_clipjax, b32_embeddings, name):
    config, _ = b32_clipjax[name]
    assert (config.size, config.act) == ("B/32", "quick_gelu" if name.endswith("quickgelu") else "gelu")
    (zi, zt, scale, bias), (ri, rt) = b32_embeddings[name]
    assert np.abs(zi - ri).max() < 1e-4 and np.abs(zt - rt).max() < 1e-4, (np.abs(zi - ri).max(), np.abs(zt - rt).max())
    np.testing.assert_allclose(scale, b32[name].logit_scale.exp().item(), rtol=1e-6)
    assert bias is None


def test_quickgelu_weights_read_as_gelu_miss(b32_embeddings):
    """Negative control: the parity test sees a wrong activation (the two models share their weights)."""
    (gelu_zi, gelu_zt, _, _), _ = b32_embeddings["ViT-B-32"]
    _, (quick_ri, quick_rt) = b32_embeddings["ViT-B-32-quickgelu"]
    assert np.abs(gelu_zi - quick_ri).max() > 1e-4 and np.abs(gelu_zt - quick_rt).max() > 1e-4


def test_custom_tiny_model_embeddings_equal_openclip(tiny, bpe_path):
    config, params = interop.import_weights(_numpy_sd(tiny), model=TINY)
    assert (config.image.heads, config.text.heads, config.image.pool, config.image.ln_pre) == (4, 2, "gap", False)
    assert (config.image.mlp_dim, config.text.mlp_dim, config.text.context_length) == (192, 80, 16)
    ids = get_tokenizer("clip", context_length=16, bpe_path=bpe_path)(CAPTIONS)
    images = _images(2, 32, seed=1)
    zi, zt, scale, bias = _clipjax_embed(config, params, images, ids)
    ri, rt = _torch_embed(tiny, images, ids)
    assert np.abs(zi - ri).max() < 1e-4 and np.abs(zt - rt).max() < 1e-4
    np.testing.assert_allclose([scale, bias], [tiny.logit_scale.exp().item(), tiny.logit_bias.item()], rtol=1e-6)
    assert interop.openclip_model_config(config) == TINY and interop.openclip_name(config) is None


# ---------------------------------------------------------------- export and round trips


def test_export_loads_in_openclip_strict_and_bit_exact(oc, b32, b32_clipjax, tmp_path):
    config, params = b32_clipjax["ViT-B-32-quickgelu"]
    path = str(tmp_path / "b32.safetensors")
    model_cfg = interop.export_weights(params, config, path)
    assert interop.openclip_name(config) == "ViT-B-32-quickgelu"
    assert model_cfg == oc.get_model_config("ViT-B-32-quickgelu")
    loaded = oc.create_model("ViT-B-32-quickgelu", pretrained=path)  # load_state_dict(strict=True)
    want = b32["ViT-B-32"].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_openclip_clipjax_openclip_round_trip_is_bit_exact(b32_sd, b32_clipjax):
    config, params = b32_clipjax["ViT-B-32"]
    back = interop.state_dict_from_params(params, config)
    assert set(back) == set(b32_sd)
    for key, value in b32_sd.items():
        np.testing.assert_array_equal(back[key], value.reshape(back[key].shape), err_msg=key)


@pytest.mark.parametrize("scan", [True, False])
def test_clipjax_openclip_clipjax_round_trip_through_files_is_bit_exact(tiny, tmp_path, scan):
    config, params = interop.import_weights(_numpy_sd(tiny), model=TINY, scan=scan)
    assert ("blocks" in params["image"]["transformer"]) == scan
    rng = np.random.default_rng(0)  # fresh clipjax values everywhere, not OpenCLIP's
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    for suffix in (".safetensors", ".bin"):
        path = str(tmp_path / f"tiny{suffix}")
        interop.export_weights(params, config, path)
        config2, params2 = interop.import_weights(path, model=TINY, scan=scan)
        assert config2 == config
        jax.tree.map(np.testing.assert_array_equal, params2, params)


# ---------------------------------------------------------------- files that must fail clearly


def _tiny_file(tiny, tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    interop.write_state_dict(_numpy_sd(tiny), path)
    return path


def test_truncated_foreign_and_unsafe_files_fail_clearly(tiny, tmp_path):
    good = _tiny_file(tiny, tmp_path)
    truncated = str(tmp_path / "truncated.safetensors")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:-1000])
    with pytest.raises(interop.WeightsError, match="truncated"):
        interop.import_weights(truncated)
    foreign = str(tmp_path / "bert.safetensors")
    interop.write_state_dict({"bert.embeddings.word_embeddings.weight": np.zeros((4, 2), np.float32)}, foreign)
    with pytest.raises(interop.WeightsError, match="not an OpenCLIP/OpenAI ViT CLIP state_dict"):
        interop.import_weights(foreign)
    extra = dict(_numpy_sd(tiny), **{"visual.extra_head.weight": np.zeros(3, np.float32)})
    with pytest.raises(interop.WeightsError, match=r"unknown \(1\): visual.extra_head.weight"):
        interop.import_weights(extra, model=TINY)
    unsafe = str(tmp_path / "unsafe.pt")
    torch.save({"state_dict": {}, "note": Fraction(1, 3)}, unsafe)  # a Python object beyond tensors
    with pytest.raises(interop.WeightsError, match="refused to load"):
        interop.import_weights(unsafe)
    timm = {"visual.trunk.patch_embed.proj.weight": np.zeros((2, 3, 4, 4), np.float32)}
    with pytest.raises(interop.WeightsError, match="timm image towers"):
        interop.import_weights(timm)


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    assert cli.main(["from-openclip", f"--checkpoint={bad}", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "junk.safetensors" in err and "truncated or another format" in err


# ---------------------------------------------------------------- command line and init_from


def test_convert_cli_and_init_from_a_weights_file(oc, tiny, tmp_path, capsys, devices):
    weights, cfg_json = _tiny_file(tiny, tmp_path), str(tmp_path / "tiny.json")
    with open(cfg_json, "w") as f:
        json.dump(TINY, f)
    workdir = str(tmp_path / "converted")
    assert cli.main(["from-openclip", f"--checkpoint={weights}", f"--model={cfg_json}", f"--workdir={workdir}"]) == 0
    printed = capsys.readouterr().out
    assert "--config.loss.kind=sigmoid" in printed and "--config.model.image.pool=gap" in printed

    out = str(tmp_path / "export" / "model.safetensors")
    assert cli.main(["to-openclip", f"--workdir={workdir}", f"--out={out}"]) == 0
    loaded = oc.create_model("local-dir:" + os.path.dirname(out))  # config + weights, strict
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # checkpoint.init_from: the converted workdir and the weights file give the same params.
    config = cli.run_config(interop.import_weights(weights, model=TINY)[0])
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp = 4, 2
    setup = make_setup(config, sharding.mesh_from_config(config.mesh, devices))
    from_file = ckpt_lib.load_params(weights, setup.abstract_state.params)
    from_dir = ckpt_lib.load_params(workdir, setup.abstract_state.params)
    _, expected = interop.import_weights(weights, model=TINY)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_file), expected)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_dir), expected)
    with config.unlocked():
        config.model.image.image_size = 64
    other = make_setup(config, sharding.mesh_from_config(config.mesh, devices))
    with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match="image/pos_embedding"):
        ckpt_lib.load_params(weights, other.abstract_state.params)


# ---------------------------------------------------------------- preprocessing and zero-shot parity


def test_openclip_eval_crop_equals_openclip_preprocess(oc):
    preprocess = oc.image_transform(224, is_train=False)
    opts = transforms.ImageOptions(224, eval_crop="openclip")
    for name, (encoded, pil) in photo_framings().items():
        batch = transforms.batch_regions([transforms.eval_image(encoded, opts)], opts.buffer_size)
        mine = np.asarray(resize.model_images({k: jnp.asarray(v) for k, v in batch.items()}, 224))[0]
        ref = preprocess(pil).numpy().transpose(1, 2, 0)
        assert np.abs(mine - ref).max() < 0.02, (name, np.abs(mine - ref).max())


def test_zero_shot_classifier_equals_openclip(oc, tiny, bpe_path):
    from open_clip import zero_shot_metadata as meta

    templates = [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    assert sorted(templates) == sorted(classnames_lib.get_templates("openai"))
    names = list(meta.IMAGENET_CLASSNAMES[:12]) + ["jack-o'-lantern", "potter's wheel"]
    tok = oc.tokenizer.SimpleTokenizer(context_length=16)
    want = oc.build_zero_shot_classifier(tiny, tok, names, meta.OPENAI_IMAGENET_TEMPLATES,
                                         num_classes_per_batch=7).numpy().T
    config, params = interop.import_weights(_numpy_sd(tiny), model=TINY)
    model = build_model(config)
    encode = jax.jit(lambda ids: model.apply({"params": params}, ids, method=CLIP.encode_text))
    got = zeroshot.class_embeddings(encode, get_tokenizer("clip", context_length=16, bpe_path=bpe_path), names,
                                    templates, batch_size=128)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


# ---------------------------------------------------------------- a model trained by clipjax


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.slow
def test_demo_trained_model_exports_and_openclip_embeds_the_same(oc, data_dir, tmp_path):
    from helpers import smoke

    from clipjax.train import train

    workdir = str(tmp_path / "run")
    config = smoke(data_dir, "--config.train.steps=4", "--config.checkpoint.every=4")
    state = train(config, workdir, evaluate_fn=lambda *args, **kwargs: None)
    out = str(tmp_path / "export" / "demo.safetensors")
    assert cli.main(["to-openclip", f"--workdir={workdir}", f"--out={out}"]) == 0
    loaded = oc.create_model("local-dir:" + os.path.dirname(out)).eval()  # strict load
    ids = get_tokenizer("bytes", context_length=config.model.text.context_length)(CAPTIONS)
    images = _images(2, config.model.image.image_size, seed=2)
    zi, zt, *_ = _clipjax_embed(config.model, jax.device_get(state.params), images, ids)
    ri, rt = _torch_embed(loaded, images, ids)
    assert np.abs(zi - ri).max() < 1e-4 and np.abs(zt - rt).max() < 1e-4
