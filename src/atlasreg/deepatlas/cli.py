"""The ``atlasreg deepatlas`` commands (issue 15 item 5): ``pretrain`` (self-supervised training on a
folder of images), ``template`` (a one-shot or few-shot template from labelled exams), ``propagate``
(its segmentation of new images, outputs on each input's own grid) and ``crop`` (a named region's
bounding cube). :func:`add_deepatlas_parser` adds them to the ``atlasreg`` parser.

Building the parser imports nothing heavy (no torch, SimpleITK or numpy): each command imports what it
runs, so ``atlasreg --help`` stays fast. Every bad input ends with one line ``atlasreg: error: <file>:
<problem>`` and exit status 2 (:func:`atlasreg.cli.main`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..contracts import FINAL_CHECKPOINT, TEMPLATE_INFO, TEMPLATE_PROBABILITIES
from ..errors import AtlasregError

_DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:<index>"
_QUIET_HELP = "no progress bars"


def _numbers(text: str, kind, what: str, count: int | None = None) -> list:
    """`text` 'a,b,c' as a list of `kind`; AtlasregError naming the option otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AtlasregError(f"{what} expects comma-separated numbers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise AtlasregError(f"{what} expects {count} numbers, got {text!r}")
    return values


def _model(args):
    """The DeepATLAS module of --checkpoint; AtlasregError naming the file when it is another method's."""
    from ..models.registry import load_model
    from .method import DeepAtlasModule

    module = load_model(args.checkpoint, args.device)
    if not isinstance(module, DeepAtlasModule):
        raise AtlasregError(f"holds a model of the method {type(module).name} ({type(module).title}), not DeepATLAS "
                            "(train one with `atlasreg deepatlas pretrain`)", args.checkpoint)
    return module


def _output(path) -> Path:
    from ..data.io import check_output_folder, remove_temporaries

    remove_temporaries(check_output_folder(path))
    return Path(path)


def cmd_pretrain(args) -> int:
    from ..config import load_config, parse_set
    from ..contracts import run_paths
    from .method import pretrain

    _output(args.out)
    overrides = parse_set(args.set)
    overrides.setdefault("model", {}).setdefault("method", "deepatlas")
    config = load_config(args.config, overrides)
    final = pretrain(config, args.out, resume=not args.force_new, progress=not args.quiet, device=args.device)
    print(f"model: {final}\natlas: {run_paths(args.out).atlas}")
    return 0


def cmd_template(args) -> int:
    from .files import build_template

    out = _output(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise AtlasregError(f"exists and is not empty (a template folder holds {TEMPLATE_PROBABILITIES} and "
                            f"{TEMPLATE_INFO}): choose another --out, or pass --overwrite to replace it", out)
    module = _model(args)
    labels = None
    if args.label_values:
        labels = {v: str(v) for v in _numbers(args.label_values, int, "--label-values")}
        if len(labels) < 2:
            raise AtlasregError(f"--label-values expects the background and at least one structure, got "
                                f"{args.label_values!r}")
    build_template(module, args.images, args.labels, out, args.checkpoint, labels, args.smoothness,
                   progress=not args.quiet)
    print(f"template: {out}")
    return 0


def cmd_propagate(args) -> int:
    from .files import propagate_files

    _output(args.out)
    module = _model(args)
    written = propagate_files(module, args.template, args.inputs, args.out, args.checkpoint, args.image_suffix,
                              progress=not args.quiet, overwrite=args.overwrite)
    print(f"{len(written)} case(s) written to {args.out}")
    return 0


def cmd_crop(args) -> int:
    from .files import crop_files, read_template, template_box

    _output(args.out)
    module = _model(args)
    d = int(module.config["model"]["ndim"])
    if (args.box is None) == (args.structure is None):
        raise AtlasregError("crop needs either --box or --template with --structure")
    if args.box is not None:
        box = _numbers(args.box, float, "--box", 2 * d)
        lo, hi = box[:d], box[d:]
    else:
        if args.template is None:
            raise AtlasregError("--structure needs --template (the template folder that names it)")
        lo, hi = template_box(read_template(args.template, module, args.checkpoint), args.structure, args.margin)
    size = _numbers(args.size, int, "--size")
    size = size * d if len(size) == 1 else size
    written = crop_files(module, args.inputs, args.out, lo, hi, size, args.image_suffix, progress=not args.quiet)
    print(f"{len(written)} crop(s) written to {args.out}")
    return 0


def add_deepatlas_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``deepatlas`` command and its four subcommands to an argparse sub-parser collection
    (``add_subparsers()``) and return its parser; the subcommands' parsers are of the collection's
    parser class (the command line's: one-line errors, defaults in --help). Imports nothing heavy."""
    d = subparsers.add_parser(
        "deepatlas", help="DeepATLAS: self-supervised coordinates, one-shot templates, propagation, crops",
        description="DeepATLAS (Chang, 'DeepATLAS: One-Shot Localization for Biomedical Data'): a network "
        "maps every voxel to a coordinate of a learnt template space (pretrain, without labels); a template "
        "drawn once in that space from one or a few labelled exams (template) segments any new exam by one "
        "forward pass (propagate), and a template box crops a region from any exam (crop).")
    sub = d.add_subparsers(dest="deepatlas_command", required=True, metavar="{pretrain,template,propagate,crop}",
                           help="the step; `atlasreg deepatlas <step> --help` describes its options")

    p = sub.add_parser("pretrain", help="self-supervised training on images without labels (resumes if "
                       "interrupted)")
    p.add_argument("config", help="experiment YAML with model.method deepatlas and a deepatlas section, e.g. "
                   "configs/deepatlas_chest.yaml")
    p.add_argument("--out", required=True, help="output folder (checkpoints, atlas, logs)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. "
                   "deepatlas.steps_per_level=100 (repeatable)")
    p.add_argument("--force-new", action="store_true", help="start a new run even if --out holds one (its "
                   "checkpoints, atlas and logs are deleted); without it a run with the same config resumes from its "
                   "last checkpoint and one with another config is refused")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    p.set_defaults(func=cmd_pretrain)

    t = sub.add_parser("template", help="a template (Eq. 14) from one or a few labelled exams")
    t.add_argument("--checkpoint", required=True, help=f"{FINAL_CHECKPOINT} of `atlasreg deepatlas pretrain`")
    t.add_argument("--images", nargs="+", required=True, help="labelled images (any grids), or one folder of them")
    t.add_argument("--labels", nargs="+", required=True, help="their labelmaps in the same order, or one folder "
                   "paired by case name")
    t.add_argument("--out", required=True, help=f"template folder ({TEMPLATE_PROBABILITIES}, {TEMPLATE_INFO}, ...)")
    t.add_argument("--label-values", help="declared label values, background first, e.g. 0,1,2,3 (default: the "
                   "checkpoint config's data.labels)")
    t.add_argument("--smoothness", type=float, help="membrane weight of the fit (default from the config: "
                   "deepatlas.template_smoothness)")
    t.add_argument("--device", default="auto", help=_DEVICE_HELP)
    t.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    t.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    t.set_defaults(func=cmd_template)

    g = sub.add_parser("propagate", help="segment images with a template, outputs on each input's own grid")
    g.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    g.add_argument("--checkpoint", required=True, help=f"{FINAL_CHECKPOINT} the template was built with")
    g.add_argument("--template", required=True, help="template folder of `atlasreg deepatlas template`")
    g.add_argument("--out", required=True, help="output folder, one subfolder per case (read by `atlasreg evaluate`)")
    g.add_argument("--image-suffix", default="", help="in folders, take only images named <case><suffix>.<ext>, "
                   "e.g. _img (B901_img.png -> case B901)")
    g.add_argument("--device", default="auto", help=_DEVICE_HELP)
    g.add_argument("--overwrite", action="store_true", help="delete the results of another run that --out holds "
                   "(without it such a folder is refused)")
    g.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    g.set_defaults(func=cmd_propagate)

    c = sub.add_parser("crop", help="crop a region's bounding cube (Sec. 5.2.4) from images")
    c.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    c.add_argument("--checkpoint", required=True, help=f"{FINAL_CHECKPOINT} of `atlasreg deepatlas pretrain`")
    c.add_argument("--box", help="the box in template coordinates ([-1, 1], x, y[, z]): the minima, then the "
                   "maxima, e.g. --box=-0.5,-0.5,0.5,0.5 (with '=': the value starts with '-')")
    c.add_argument("--template", help="template folder naming the structure of --structure")
    c.add_argument("--structure", help="name or value of a template structure whose bounding box to crop")
    c.add_argument("--margin", type=float, default=0.1, help="margin around the structure, a fraction of its box")
    c.add_argument("--size", default="64", help="crop size in voxels, one number or one per array axis")
    c.add_argument("--out", required=True, help="output folder, one subfolder per case (crop image and its box)")
    c.add_argument("--image-suffix", default="", help="in folders, take only images named <case><suffix>.<ext>")
    c.add_argument("--device", default="auto", help=_DEVICE_HELP)
    c.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    c.set_defaults(func=cmd_crop)
    return d
