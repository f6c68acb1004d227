"""Config selection, overrides, derived values and error messages."""

import math
import pathlib

import pytest

from clipjax.config import load_config, parse_arg, validate
from clipjax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIP = str(ROOT / "configs" / "clip.py")
SIGLIP = str(ROOT / "configs" / "siglip.py")
DEMO = str(ROOT / "configs" / "demo.py")


def test_argument_selects_variant_and_overrides_apply():
    c = load_config(f"{CLIP}:model=B/16,batch=4096,data=/data/shards", ["--config.optim.lr=0.001", "--config.loss.impl=ring",
                                                       "--config.model.image.depth=6"])
    assert c.model.size == "B/16" and c.train.batch_size == 4096
    assert c.optim.lr == 0.001 and c.loss.impl == "ring"
    validate(c, num_devices=8)
    assert c.model.image.width == 768 and c.model.image.patch_size == 16
    assert c.model.image.depth == 6  # an explicit override beats the size table
    assert c.model.text.heads == 8 and c.model.embed_dim == 512
    assert c.mesh.fsdp == 8 and c.mesh.data == 1  # -1 filled in
    assert c.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    assert c.model.init_logit_bias is None


def test_siglip_derives_scale_and_bias():
    c = load_config(f"{SIGLIP}:model=B/16,batch=1024,data=/data/shards")
    validate(c, num_devices=8)
    assert c.model.init_logit_scale == pytest.approx(math.log(10.0))
    assert c.model.init_logit_bias == -10.0
    assert c.optim.b2 == 0.95


def test_demo_config_validates_on_eight_devices():
    c = load_config(DEMO)
    validate(c, num_devices=8)
    assert c.model.size == "tiny"


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(CLIP, ["--config.optim.learning_rate=1.0"])


def test_wrong_type_fails_naming_it():
    with pytest.raises(ConfigError, match="steps"):
        load_config(CLIP, ["--config.train.steps=abc"])


def test_data_path_is_required_for_arrayrecord():
    with pytest.raises(ValueError, match="config.data.path"):
        validate(load_config(CLIP), num_devices=8)


def test_unknown_config_argument_fails():
    with pytest.raises(ConfigError, match="modle"):
        load_config(f"{CLIP}:modle=B/16")
    with pytest.raises(ValueError, match="known"):
        parse_arg("x=1", model="B/32")


@pytest.mark.parametrize("overrides,num_devices,match", [
    (["--config.train.batch_size=100"], 8, r"batch_size=100 .*data-parallel size 8"),
    (["--config.train.batch_size=64", "--config.train.grad_accum=3"], 8, "grad_accum=3"),
    (["--config.mesh.data=3", "--config.mesh.fsdp=-1"], 8, "not divisible"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], 8, "at most one axis"),
    (["--config.loss.kind=hinge"], 8, "loss.kind"),
    (["--config.loss.impl=magic"], 8, "loss.impl"),
    (["--config.model.size=XL/7"], 8, "model.size"),
    (["--config.model.image.heads=5"], 8, "model.image.width=768 is not divisible by model.image.heads=5"),
    (["--config.model.image.image_size=100"], 8, "image_size=100"),
    (["--config.optim.lock_image=true", "--config.optim.lock_text=true"], 8, "nothing would train"),
])
def test_validate_errors_name_the_key(overrides, num_devices, match):
    c = load_config(f"{CLIP}:batch=1024,data=/data/shards", overrides)
    with pytest.raises(ValueError, match=match):
        validate(c, num_devices=num_devices)


def test_sizes_are_one_table():
    from clipjax.models.sizes import SIZES

    # The anchors' towers (OpenCLIP ViT-B/32, L/14, H/14): width, depth, heads, patch; text width, depth, heads.
    anchors = {"B/32": (768, 12, 12, 32, 512, 12, 8, 512), "L/14": (1024, 24, 16, 14, 768, 12, 12, 768),
               "H/14": (1280, 32, 16, 14, 1024, 24, 16, 1024)}
    for name, (iw, idepth, iheads, patch, tw, tdepth, theads, embed) in anchors.items():
        row = SIZES[name]
        assert (row["image"]["width"], row["image"]["depth"], row["image"]["heads"], row["image"]["patch_size"],
                row["text"]["width"], row["text"]["depth"], row["text"]["heads"], row["embed_dim"]) == (
                    iw, idepth, iheads, patch, tw, tdepth, theads, embed), name
    # Every size resolves from its row alone: configs/clip.py declares no tower widths of its own.
    for name, row in SIZES.items():
        m = validate(load_config(f"{CLIP}:model={name},batch=64,data=/data/shards"), num_devices=8).model
        assert m.embed_dim == row["embed_dim"], name
        for tower in ("image", "text"):
            assert {k: m[tower][k] for k in row[tower]} == row[tower], (name, tower)


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
    from clipjax.config import base_config, validate

    assert base_config().model.dtype == "auto"
    assert validate(base_config()).model.dtype == "float32"  # the tests run on CPU
    assert validate(base_config(), platform="tpu").model.dtype == "bfloat16"
    assert validate(base_config(), platform="gpu").model.dtype == "bfloat16"
    c = base_config()
    c.model.dtype = "bfloat16"
    assert validate(c).model.dtype == "bfloat16"  # an explicit choice stands
