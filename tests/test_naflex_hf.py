"""transformers ``Siglip2Model`` (NaFlex) in and out: embeddings and logits equal transformers' for a
batch of images of different aspect ratios padded to one length, strict loading of the export,
bit-exact round trips; big_vision ``naflex_vit`` ``.npz`` in and out against the same reference.

The reference is built from a config (no download) with every weight randomly perturbed, as in
test_hf.py: a 3x5 position grid would hide nothing, so the grid is 4x4 and every image's grid
differs from it (upsampled, downsampled, both at once).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from openclip_ref import transformers

from clipjax.interop import bigvision, hf
from clipjax.models import build_model

tr = transformers()

SIGLIP2 = dict(
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                       num_patches=16, patch_size=4, layer_norm_eps=1e-6),
    text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=12, projection_size=48, layer_norm_eps=1e-6,
                     bos_token_id=None, eos_token_id=1, pad_token_id=1))
LENGTH = 24
SHAPES = ((4, 6), (2, 7), (6, 3), (1, 1))  # (rows, cols) of each image's patch grid


def _reference(seed=0):
    torch.manual_seed(seed)
    model = tr.Siglip2Model(tr.Siglip2Config(**SIGLIP2))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim <= 1 or name.endswith("probe") else 0.15
            p.add_(scale * torch.randn(p.shape, generator=g))
        model.logit_scale.add_(2.3)
    return model.eval()


def _inputs():
    """HF's (pixel_values, mask, spatial_shapes) and ours: garbage, not zeros, in the padding."""
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(len(SHAPES), LENGTH, 48)).astype(np.float32)
    mask = np.zeros((len(SHAPES), LENGTH), bool)
    yx = np.zeros((len(SHAPES), LENGTH, 2), np.int32)
    for b, (h, w) in enumerate(SHAPES):
        mask[b, :h * w] = True
        yx[b, :h * w] = np.stack(np.divmod(np.arange(h * w), w), axis=1)
    ids = rng.integers(5, 298, size=(3, 12)).astype(np.int64)
    ids[0, 6:] = 1
    return pixels, mask, np.asarray(SHAPES, np.int64), yx, ids


def _hf_outputs(model, pixels, mask, shapes, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                    pixel_attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    spatial_shapes=torch.from_numpy(shapes))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _ours(m, params, pixels, mask, yx, ids):
    images = {"patches": jnp.asarray(pixels), "patch_yx": jnp.asarray(yx), "patch_valid": jnp.asarray(mask)}
    zimg, ztxt, scale, bias = jax.jit(build_model(m).apply)({"params": params}, images, jnp.asarray(ids))
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(scale * zimg @ ztxt.T + bias)


def _gap(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = _reference()
    folder = tmp_path_factory.mktemp("siglip2")
    model.save_pretrained(folder)
    return model, str(folder), _inputs()


def test_siglip2_embeddings_and_logits_equal_transformers(case):
    model, folder, (pixels, mask, shapes, yx, ids) = case
    m, params = hf.import_weights(folder)
    assert (m.image.seq_len, m.image.image_size, m.image.patch_size, m.image.pool) == (16, 16, 4, "map")
    want = _hf_outputs(model, pixels, mask, shapes, ids)
    got = _ours(m, params, pixels, mask, yx, ids)
    assert _gap(got, want) < 1e-4
    assert np.std(want[2]) > 0.05
    # Negative controls: without the padding mask, or with the grid not resized per image, it misses.
    assert _gap(_ours(m, params, pixels, np.ones_like(mask), yx, ids)[:1], want[:1]) > 1e-4
    square = np.zeros_like(yx)
    square[..., 0], square[..., 1] = np.divmod(np.arange(LENGTH) % 16, 4)  # positions of the 4x4 grid as is
    assert _gap(_ours(m, params, pixels, mask, np.where(mask[..., None], square, 0), ids)[:1], want[:1]) > 1e-4


def test_siglip2_export_loads_strict_and_round_trips(case, tmp_path):
    model, folder, (pixels, mask, shapes, yx, ids) = case
    m, params = hf.import_weights(folder, scan=False)
    out = tmp_path / "export"
    assert hf.export_weights(params, m, str(out)) == "Siglip2Model"
    loaded, info = tr.AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert type(loaded).__name__ == "Siglip2Model"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    got = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    m2, params2 = hf.import_weights(str(out), scan=False)
    assert m2.to_dict() == m.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    processor = tr.AutoImageProcessor.from_pretrained(str(out))
    assert (processor.max_num_patches, processor.patch_size) == (16, 4)


def test_bigvision_naflex_npz_in_and_out(case, tmp_path):
    """big_vision's naflex_vit layout, as transformers' converter reads it: the Dense kernel is the
    Linear's weight transposed, the position table the [G, G, D] grid; the import matches transformers."""
    model, folder, (pixels, mask, shapes, yx, ids) = case
    m, params = hf.import_weights(folder)
    path = str(tmp_path / "naflex.npz")
    bigvision.export_weights(params, m, path, scanned=True)
    flat = bigvision.read_npz(path)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(flat["img/embedding/kernel"], sd["vision_model.embeddings.patch_embedding.weight"].T)
    np.testing.assert_array_equal(flat["img/pos_embedding"],
                                  sd["vision_model.embeddings.position_embedding.weight"].reshape(4, 4, 48))
    m2, params2 = bigvision.import_weights(path)
    assert m2.image.seq_len == 16
    assert _gap(_ours(m2, params2, pixels, mask, yx, ids), _hf_outputs(model, pixels, mask, shapes, ids)) < 1e-4
