"""transformers CLIPModel / SiglipModel in and out: embeddings and logits equal transformers', strict
loading of exports, bit-exact round trips, and negative controls that show the checks can fail.

transformers' random init has zero biases and unit LayerNorm scales, which would hide a wrong mapping
of those tensors: every bias, LayerNorm parameter, probe, logit scale and bias is perturbed first.
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from openclip_ref import transformers

from clipjax.interop import blocks
from clipjax.interop import hf
from clipjax.models import build_model

tr = transformers()

# Small sizes none of transformers' defaults use: head widths 16 and 8, MLP ratios 5/3 and 2.25,
# 32 px images in 8 px patches, 12 tokens, a 1152-style text projection to the image width.
SIGLIP = dict(
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                       image_size=32, patch_size=8, layer_norm_eps=1e-5),
    text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=12, projection_size=48, layer_norm_eps=1e-5,
                     bos_token_id=None, eos_token_id=1, pad_token_id=1))
CLIP = dict(
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                       image_size=32, patch_size=8, hidden_act="gelu"),
    text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=12, hidden_act="gelu", eos_token_id=299,
                     bos_token_id=298, pad_token_id=0),
    projection_dim=24)


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or name.endswith("probe"):  # biases, LayerNorms, class token, probe, scale, bias
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:  # wider pre-activations, where the GELU approximations part
                p.add_(0.15 * torch.randn(p.shape, generator=g))
        model.logit_scale.add_(2.3)  # a trained model's temperature (exp 10), not 1
    return model.eval()


def _reference(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "siglip":
        model = tr.SiglipModel(tr.SiglipConfig(**SIGLIP))
    else:
        model = tr.CLIPModel(tr.CLIPConfig(**CLIP))
    return _perturb(model, seed + 1)


def _inputs(kind):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(5, 298, size=(4, 12)).astype(np.int64)
    if kind == "clip":  # end token then padding, one row cut without an end token's padding
        ids[0, 5:], ids[0, 4] = 0, 299
        ids[1, 11] = 299
        ids[2, 8:], ids[2, 7] = 0, 299
    else:  # SigLIP pads (id 1) after the text and attends to them
        ids[0, 6:] = 1
    return images, ids


def _hf_outputs(model, images, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _ours(m, params, images, ids):
    zimg, ztxt, scale, bias = jax.jit(build_model(m).apply)({"params": params}, jnp.asarray(images), jnp.asarray(ids))
    logits = scale * zimg @ ztxt.T + (0.0 if bias is None else bias)
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits)


def _gap(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.fixture(scope="module", params=["siglip", "clip"])
def case(request, tmp_path_factory):
    kind = request.param
    model = _reference(kind)
    folder = tmp_path_factory.mktemp(kind)
    model.save_pretrained(folder)
    images, ids = _inputs(kind)
    return kind, model, str(folder), images, ids


def test_embeddings_and_logits_equal_transformers(case):
    kind, model, folder, images, ids = case
    m, params = hf.import_weights(folder)
    assert (m.image.pool, m.text.pool, m.act) == (("map", "final", "gelu_tanh") if kind == "siglip"
                                                  else ("tok", "eot", "gelu"))
    want = _hf_outputs(model, images, ids)
    got = _ours(m, params, images, ids)
    assert _gap(got, want) < 1e-4
    assert np.std(want[2]) > 0.05  # the logits are not flat, so the comparison can see a wrong weight


def test_negative_controls_miss(case):
    """Exact GELU for tanh weights, and a MAP head with query and key swapped, miss by more than 1e-4."""
    kind, model, folder, images, ids = case
    if kind != "siglip":
        pytest.skip("the controls concern SigLIP's activation and MAP head")
    m, params = hf.import_weights(folder)
    want = _hf_outputs(model, images, ids)
    exact = ml_collections.ConfigDict(m.to_dict())
    exact.act = "gelu"
    assert _gap(_ours(exact, params, images, ids), want) > 1e-4
    swapped = jax.tree.map(lambda a: a, params)
    attn = swapped["image"]["map_head"]["attn"]
    attn["query_kernel"], attn["key_kernel"] = attn["key_kernel"], attn["query_kernel"]
    attn["query_bias"], attn["key_bias"] = attn["key_bias"], attn["query_bias"]
    assert _gap(_ours(m, swapped, images, ids)[:1], want[:1]) > 1e-4


def test_export_loads_strict_and_round_trips(case, tmp_path):
    kind, model, folder, images, ids = case
    m, params = hf.import_weights(folder, scan=kind == "siglip")
    out = tmp_path / "export"
    hf.export_weights(params, m, str(out))
    loaded, info = tr.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert type(loaded).__name__ == hf.ARCHITECTURES[kind]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ref, got = _sd(model), _sd(loaded)
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    m2, params2 = hf.import_weights(str(out), scan=kind == "siglip")
    assert m2.to_dict() == m.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_unknown_missing_wrong_shape_named_in_one_error(case, tmp_path):
    kind, model, folder, _, _ = case
    config, sd = hf.read_files(folder)
    m = hf.model_config_from_hf(config, sd)
    sd["vision_model.extra.weight"] = np.zeros(3, np.float32)
    del sd["text_model.final_layer_norm.bias"]
    sd["text_model.encoder.layers.1.mlp.fc1.bias"] = np.zeros(5, np.float32)
    with pytest.raises(blocks.WeightsError) as e:
        hf.params_from_state_dict(sd, m)
    msg = str(e.value)
    assert "vision_model.extra.weight" in msg and "text_model.final_layer_norm.bias" in msg
    assert "text_model.encoder.layers.1.mlp.fc1.bias (5,)" in msg and "\n" not in msg


def test_export_refuses_what_transformers_cannot_express(case):
    kind, _, folder, _, _ = case
    m, _ = hf.import_weights(folder)
    m.text.pad_mask = m.text.causal = True  # neither SigLIP's nor CLIP's text tower masks pads this way
    m.text.causal = kind == "siglip"
    with pytest.raises(blocks.WeightsError, match="model.text.causal"):
        hf.hf_config(m)


@pytest.mark.parametrize("scanned,prefix", [(False, True), (True, False)])
def test_big_vision_round_trip_and_parity(case, tmp_path, scanned, prefix):
    """clipjax -> big_vision .npz (per-layer / scanned, with / without params/) -> clipjax is bit-exact,
    and the model read from the .npz still equals transformers'."""
    from clipjax.interop import bigvision

    kind, model, folder, images, ids = case
    if kind != "siglip":
        pytest.skip("big_vision's two_towers is SigLIP")
    m, params = hf.import_weights(folder)
    m.ln_eps = 1e-6  # big_vision's LayerNorm eps; the reference used 1e-5
    path = str(tmp_path / "siglip.npz")
    bigvision.export_weights(params, m, path, scanned=scanned, prefix=prefix)
    with np.load(path) as z:
        assert any(k.startswith("params/") for k in z.files) == prefix
        assert any("encoderblock/" in k for k in z.files) == scanned
        assert z["params/img/embedding/kernel" if prefix else "img/embedding/kernel"].shape == (8, 8, 3, 48)
        for tower, width in (("img", 48), ("txt", 32)):  # big_vision stores position tables as (1, N, D)
            pos = z[f"{'params/' if prefix else ''}{tower}/pos_embedding"]
            assert pos.shape[0] == 1 and pos.shape[2:] == (width,), (tower, pos.shape)
    m2, params2 = bigvision.import_weights(path, scan=not scanned)
    assert m2.to_dict() == {**m.to_dict(), "scan": not scanned, "text": {**m.text.to_dict(), "eot_id": None,
                                                                         "pad_id": 0}}
    jax.tree.map(np.testing.assert_array_equal, bigvision.params_from_npz(bigvision.read_npz(path), m), params)
    m2.ln_eps = 1e-5
    assert _gap(_ours(m2, params2, images, ids), _hf_outputs(model, images, ids)) < 1e-4
    with np.load(path) as z:
        broken = dict(z)
    gone = next(k for k in broken if "txt/Encoder_0/encoderblock" in k and k.endswith("LayerNorm_1/bias"))
    broken.pop(gone)
    broken["img/extra"] = np.zeros(2, np.float32)
    np.savez(path, **broken)
    with pytest.raises(blocks.WeightsError, match=f"{gone.removeprefix('params/')}.*img/extra"):
        bigvision.import_weights(path)


def test_convert_cli_and_init_from(case, tmp_path):
    """from-hf -> clipjax checkpoint -> to-hf loads strict with the reference's tensors; init_from reads the
    transformers directory and the big_vision .npz onto a model's abstract params."""
    from flax import linen as nn

    from clipjax import checkpoint as ckpt_lib
    from clipjax.interop import bigvision, cli
    from clipjax.models import dummy_inputs

    kind, model, folder, _, _ = case
    assert cli.main(["from-hf", "--checkpoint", folder, "--workdir", str(tmp_path / "run")]) == 0
    assert cli.main(["to-hf", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    loaded, info = tr.AutoModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ref, got = _sd(model), _sd(loaded)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    m, params = hf.import_weights(folder)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    boxed = jax.eval_shape(lambda: build_model(m).init(jax.random.key(0), *dummy_inputs(m)))["params"]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.unbox(boxed))
    sources = [folder]
    if kind == "siglip":
        m.ln_eps = 1e-6
        bigvision.export_weights(params, m, str(tmp_path / "bv.npz"))
        sources.append(str(tmp_path / "bv.npz"))
    for source in sources:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(ckpt_lib.load_params(source, abstract)), params)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


# The SigLIP architecture on the demo's smoke run (configs/siglip.py sets the same tower options).
SIGLIP_OVERRIDES = (
    "--config.model.image.pool=map", "--config.model.image.class_token=False", "--config.model.image.ln_pre=False",
    "--config.model.image.patch_bias=True", "--config.model.image.proj=False", "--config.model.image.norm=siglip",
    "--config.model.text.pool=final", "--config.model.text.causal=False", "--config.model.text.pad_mask=False",
    "--config.model.text.proj_bias=True", "--config.model.act=gelu_tanh", "--config.model.ln_eps=1e-6",
    "--config.loss.kind=sigmoid", "--config.train.steps=4", "--config.checkpoint.every=4",
    "--config.evals.synthetic_zeroshot.every=0")


def test_siglip_demo_run_exports_and_transformers_predicts_the_same(data_dir, tmp_path):
    """A short SigLIP-architecture demo run, exported with clipjax-convert to-hf: transformers' zero-shot
    classifier and predictions (through get_image_features / get_text_features, as CLIP_benchmark calls
    them) equal clipjax's."""
    from helpers import smoke

    from clipjax.data.tokenizer import get_tokenizer
    from clipjax.evals import zeroshot
    from clipjax.interop import cli
    from clipjax.models import CLIP
    from clipjax.train import train

    config = smoke(data_dir, *SIGLIP_OVERRIDES, "--config.model.embed_dim=32")
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    state = train(config, workdir, evaluate_fn=lambda *args, **kwargs: None)
    assert cli.main(["to-hf", f"--workdir={workdir}", f"--out={out}"]) == 0
    loaded, info = tr.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(loaded).__name__ == "SiglipModel" and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    m, params = config.model, jax.device_get(state.params)
    model = build_model(m)
    tokenize = get_tokenizer("bytes", context_length=m.text.context_length)
    names, templates = ["red circle", "blue square", "green triangle", "small star", "large cross"], ["a {}.", "{}"]
    ours_cls = zeroshot.class_embeddings(
        jax.jit(lambda ids: model.apply({"params": params}, ids, method=CLIP.encode_text)), tokenize, names, templates,
        batch_size=16)

    def hf_text(ids):
        with torch.no_grad():
            z = loaded.get_text_features(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).pooler_output
        return torch.nn.functional.normalize(z, dim=-1).numpy()

    hf_cls = zeroshot.class_embeddings(hf_text, tokenize, names, templates, batch_size=16)
    images = np.random.default_rng(3).normal(size=(16, m.image.image_size, m.image.image_size, 3)).astype(np.float32)
    ours_img = np.asarray(model.apply({"params": params}, jnp.asarray(images), method=CLIP.encode_image))
    with torch.no_grad():
        z = loaded.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
    hf_img = torch.nn.functional.normalize(z, dim=-1).numpy()
    assert np.abs(ours_cls - hf_cls).max() < 1e-4 and np.abs(ours_img - hf_img).max() < 1e-4
    ours_pred, hf_pred = np.argmax(ours_img @ ours_cls.T, -1), np.argmax(hf_img @ hf_cls.T, -1)
    np.testing.assert_array_equal(ours_pred, hf_pred)
    assert len(set(ours_pred.tolist())) > 1  # not a constant prediction


def test_preprocessor_config_equals_clipjax_eval_transform(case, tmp_path):
    """AutoImageProcessor of an export gives clipjax's eval pixels (eval_crop=openclip, as clipjax-convert
    sets) to 1e-2, or one uint8 level where that is more."""
    from helpers import photo_framings

    from clipjax.data import resize, transforms

    kind, _, folder, _, _ = case
    m, params = hf.import_weights(folder)
    hf.export_weights(params, m, str(tmp_path / "out"))
    processor = tr.AutoImageProcessor.from_pretrained(str(tmp_path / "out"))
    size = m.image.image_size
    opts = transforms.ImageOptions(size, eval_crop="openclip")
    for name, (encoded, pil) in photo_framings().items():
        batch = transforms.batch_regions([transforms.eval_image(encoded, opts)], opts.buffer_size)
        mine = np.asarray(resize.model_images({k: jnp.asarray(v) for k, v in batch.items()}, size,
                                              norm=m.image.norm))[0]
        ref = processor(images=pil, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        # transformers rounds the resized image to uint8: one level is 1/255/std (0.0078 for SigLIP's
        # statistics, 0.0146 for OpenAI's), and clipjax's float pixels are within it.
        level = 1 / 255 / min(resize.NORMS[m.image.norm][1])
        assert np.abs(mine - ref).max() < max(1e-2, level * 1.01), (name, np.abs(mine - ref).max())
