"""`clipjax-bench patches`: a patch-level linear probe of frozen image-tower tokens.

Each patch of a synthetic-shapes image is labelled by the object under its centre
(its colour, or its shape; "background" outside every region box). A ridge-regression
probe on the final-norm patch tokens, fitted on train-split images, is scored on
held-out images: what the tokens say about *where* things are, which the pooled
embedding need not keep (SigLIP 2 adds the LocCa decoder for this).

    clipjax-bench patches --config=configs/demo.py --workdir=workdirs/demo \\
        --workdir=workdirs/demo_decoder --config_arg=decoder
"""

from __future__ import annotations

import numpy as np

from clipjax.errors import ArgumentParser


def _parse(argv):
    p = ArgumentParser(prog="clipjax-bench patches", doc=__doc__)
    p.add_argument("--config", default="configs/demo.py", help="the runs' config file")
    p.add_argument("--workdir", action="append", required=True, help="a run to probe (repeat to compare runs)")
    p.add_argument("--config_arg", action="append", default=None,
                   help="config argument of each --workdir, in order (e.g. '' and 'decoder'); default none")
    p.add_argument("--num_train", type=int, default=2000, help="train-split images the probe is fitted on")
    p.add_argument("--num_test", type=int, default=1000, help="held-out images it is scored on")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge penalty (times the feature count)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def patch_labels(regions: list[tuple[np.ndarray, str]], grid: int, attribute: int) -> np.ndarray:
    """int ``[grid * grid]``: 1 + the index of word ``attribute`` of the region text under each patch
    centre (last region wins; 0: background), row-major like the tower's patches."""
    from clipjax.data import synth

    vocab = (list(synth.COLOURS), list(synth.SHAPES))[attribute - 1] if attribute else []
    centres = (np.arange(grid) + 0.5) / grid
    labels = np.zeros((grid, grid), np.int32)
    for box, text in regions:
        word = text.split()[-2:][attribute - 1]  # "[which] size colour shape": colour, shape
        inside_y = (centres >= box[1]) & (centres < box[3])
        inside_x = (centres >= box[0]) & (centres < box[2])
        labels[np.ix_(inside_y, inside_x)] = 1 + vocab.index(word)
    return labels.reshape(-1)


def ridge_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   num_classes: int, ridge: float) -> float:
    """Accuracy of the closed-form ridge regression onto one-hot labels (argmax), in float64."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    a = np.concatenate([a, np.ones((len(a), 1))], 1)
    b = np.concatenate([b, np.ones((len(b), 1))], 1)
    onehot = np.eye(num_classes)[y_train]
    w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ onehot)
    return float(np.mean(np.argmax(b @ w, axis=1) == y_test))


def _tokens(config, workdir: str, split: str, limit: int) -> tuple[np.ndarray, list]:
    """Final-norm patch tokens ``[N, P, D]`` (class token dropped) and each image's regions."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from clipjax import run
    from clipjax.data import resize, sources, transforms
    from clipjax.data.locca import regions_in_crop
    from clipjax.models import CLIP

    setup, checkpointer = run.prepare(config, workdir, async_save=False)
    try:
        params = checkpointer.restore_params(checkpointer.latest_step(), setup.abstract_state.params)
    finally:
        checkpointer.close()
    m = config.model
    opts = transforms.ImageOptions.from_config(config.data, m.image.image_size)
    source = sources.open_source(config.data, split)

    @jax.jit
    def encode(params, crops):
        images = resize.model_images(crops, m.image.image_size, config.data.interpolation)
        return setup.model.apply({"params": params}, images.astype(jnp.float32), method=CLIP.encode_image_tokens)[1]

    feats, regions = [], []
    for start in range(0, limit, 250):
        rows = [transforms.eval_image(source[i]["image"], opts, crop=True) for i in range(start, min(limit, start + 250))]
        regions += [regions_in_crop(source[i]["regions"], r.pop("crop_xyxy"), 0.5)
                    for i, r in zip(range(start, limit), rows)]
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            tokens = np.asarray(encode(params, transforms.batch_regions(rows, opts.buffer_size)))
        feats.append(tokens[:, int(m.image.class_token):])
    return np.concatenate(feats), regions


def main(argv: list[str]) -> int:
    args = _parse(argv)
    from clipjax.host_env import simulated_cpu_devices

    simulated_cpu_devices(1)
    from clipjax.bench.table import emit
    from clipjax.config import load_config
    from clipjax.data import synth

    rows = []
    arg_list = args.config_arg or [""] * len(args.workdir)
    for workdir, arg in zip(args.workdir, arg_list):
        config = load_config(f"{args.config}:{arg}" if arg else args.config, ["--config.mesh.data=1",
                                                                                "--config.mesh.fsdp=1"])
        grid = config.model.image.image_size // config.model.image.patch_size
        x_tr, reg_tr = _tokens(config, workdir, synth.SPLIT_TRAIN, args.num_train)
        x_te, reg_te = _tokens(config, workdir, synth.SPLIT_HELDOUT, args.num_test)
        row = {"workdir": workdir}
        for attribute, name, k in ((1, "colour", len(synth.COLOURS)), (2, "shape", len(synth.SHAPES))):
            y_tr = np.concatenate([patch_labels(r, grid, attribute) for r in reg_tr])
            y_te = np.concatenate([patch_labels(r, grid, attribute) for r in reg_te])
            d = x_tr.shape[-1]
            row[f"{name}_acc"] = ridge_accuracy(x_tr.reshape(-1, d), y_tr, x_te.reshape(-1, d), y_te, k + 1,
                                                args.ridge)
            row[f"{name}_majority"] = float(np.mean(y_te == np.bincount(y_tr).argmax()))
        rows.append(row)
    emit(rows, args.json)
    return 0
