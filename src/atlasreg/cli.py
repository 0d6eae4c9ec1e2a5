"""The `atlasreg` command line: train, segment, evaluate, correspond, register, report, demo, letter-b,
deepatlas (its subcommands in :mod:`atlasreg.deepatlas.cli`).

Every bad input ends with one line `atlasreg: error: <file>: <problem>` and exit status 2. One
exception: `segment` goes on past inputs that cannot be read (a corrupt scan of a large folder), with
one such line per failed case, then the summary line `atlasreg: error: <k> of <n> cases failed, see
<case manifest>` and exit status 1 (the other cases are written).

Building the parser imports nothing heavy (no torch, SimpleITK or numpy: ``atlasreg --help`` and
``atlasreg --version`` answer at once, tests/test_cli.py checks); each command imports what it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .contracts import (FINAL_CHECKPOINT, FORWARD_TRANSFORM, INVERSE_FIELD, INVERSE_TRANSFORM, METRICS_PER_CASE,
                        REPORT_HTML, REPORT_MD, SEGMENT_INFO, case_labelmap_path, read_segment_info, run_paths)
from .config import ATLAS_TOPOLOGIES, LABEL_LOSSES, REFINEMENT_STRUCTURES, REFINEMENT_TARGETS
from .errors import AtlasregError


def _refinement_overrides(args) -> dict:
    out = {}
    for key, attr in (("iterations", "iterations"), ("beta", "beta"), ("gamma", "gamma"),
                      ("lambda", "lam"), ("lr", "refine_lr"), ("cases_at_once", "cases_at_once"),
                      ("image_similarity", "image_similarity"), ("image_weight", "image_weight"),
                      ("target", "refine_target"), ("structures", "refine_structures"),
                      ("atlas_topology", "atlas_topology"), ("label_loss", "refine_loss")):
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    return out


def _output_folder(path) -> Path:
    """Check an output folder before anything is read or written (:func:`check_output_folder`) and
    clean the temporary entries a killed run left there (:func:`remove_temporaries`)."""
    from .data.io import check_output_folder, remove_temporaries

    remove_temporaries(check_output_folder(path))
    return Path(path)


def cmd_train(args) -> int:
    from .config import load_config, parse_set
    from .distributed import launched_as_rank_zero
    from .models.train import train

    _output_folder(args.out)
    overrides = parse_set(args.set)
    if args.epochs is not None:
        overrides.setdefault("training", {})["epochs"] = args.epochs
    cfg = load_config(args.config, overrides)
    final = train(cfg, args.out, resume=not args.force_new, progress=not args.quiet, device=args.device,
                  devices=args.devices, num_nodes=args.num_nodes)
    if launched_as_rank_zero():  # DDP: the other processes end silently
        print(f"model: {final}\natlas: {run_paths(args.out).atlas}")
    return 0


def cmd_segment(args) -> int:
    from tqdm import tqdm

    from .data.io import check_output_folder
    from .models.train import load_module
    from .parallel import launcher_part, run_local_parts
    from .segment import CasesFailed, check_part, segment

    check_part(args.num_parts, args.part_id)
    check_output_folder(args.out)  # segment() removes what a killed run left there (a part: its own)
    if args.devices > 1:  # this machine's part as that many child processes
        rest = args.argv[args.argv.index("segment") + 1:]
        return run_local_parts(rest, args.out, args.devices, args.num_parts, args.part_id, args.device,
                               progress=not args.quiet)
    launched = launcher_part()
    if launched is not None and args.num_parts == 1:  # torchrun / SLURM: the part of this rank
        args.part_id, args.num_parts = launched
    module = load_module(args.checkpoint, args.device)
    inputs = list(args.inputs)
    if args.split:
        inputs += [p.image for p in _split_pairs(module.config, args.split, need_labels=False)]
    if not inputs:
        raise AtlasregError("give input images/folders or --split")
    refinement = _refinement_overrides(args)

    def failed(message: str) -> None:  # one line per case that could not be read, above the bar
        tqdm.write(f"atlasreg: error: {message}", file=sys.stderr)

    # segment() writes the run's manifest (checkpoint, settings, status, cases), read back by `atlasreg
    # evaluate` (and the report's sensitivity study), and the case manifest
    try:
        result = segment(module, inputs, args.out, refinement, progress=not args.quiet,
                         image_suffix=args.image_suffix, checkpoint=args.checkpoint, overwrite=args.overwrite,
                         num_parts=args.num_parts, part_id=args.part_id, num_workers=args.num_workers,
                         on_failure=failed)
    except CasesFailed as e:
        result, summary = e.result, str(e)
    else:
        summary = None
    skipped = f", {len(result.skipped)} skipped (complete already)" if result.skipped else ""
    print(f"{len(result)} case(s) written to {args.out}{skipped}")
    if summary is not None:  # the last line
        print(f"atlasreg: error: {summary}", file=sys.stderr)
        return 1
    return 0


def _split_pairs(config: dict, split: str, need_labels: bool = True):
    from .data.cases import pairs_from_spec

    spec = config["data"].get(split)
    if not spec:
        raise AtlasregError(f"the config has no data split '{split}'")
    return pairs_from_spec(spec, need_labels=need_labels)


def _config_from(args) -> dict:
    if args.checkpoint:
        from .models.train import load_module
        return load_module(args.checkpoint).config
    segment_info = read_segment_info(args.predictions)
    if not args.config and segment_info:
        from .models.train import load_module
        return load_module(segment_info.get("checkpoint", "")).config
    if args.config:
        from .config import load_config
        return load_config(args.config)
    raise AtlasregError("evaluate needs --config or --checkpoint to know the declared labels")


def _parse_merge(texts: list[str] | str | None) -> dict[int, list[int]] | None:
    """``--merge`` values (each ``TARGET=A,B``, several separated by ';' or given as repeated options) as
    ``{target: [sources]}``; None for none. AtlasregError for a malformed item or a target given twice."""
    if not texts:
        return None
    merge: dict[int, list[int]] = {}
    for item in [t.strip() for text in ([texts] if isinstance(texts, str) else texts) for t in text.split(";")]:
        if not item:
            continue
        try:
            target, sources = item.split("=")
            key, values = int(target), [int(s) for s in sources.split(",")]
        except ValueError:
            raise AtlasregError(f"--merge expects TARGET=A,B (e.g. 255=1,2; several separated by ';'), "
                                f"got '{item}'") from None
        if key in merge:
            raise AtlasregError(f"--merge: target {key} is given twice")
        merge[key] = values
    return merge or None


def _evaluation_info(config: dict, args, references: dict) -> dict:
    """What the report needs to name and draw an evaluation: the model, its method and variant, the
    refinement settings of the segmentation run, and the reference files."""
    info = {"model": config.get("name"), "method": config["model"].get("method", "atlas_istn"),
            "stn_variant": config["model"].get("stn_variant"),
            "fixed_atlas": config["training"].get("fixed_atlas"),
            "seg_weight": config["training"].get("seg_weight", 1.0), "label": args.label,
            "references": {k: str(Path(v).resolve()) for k, v in references.items()}}
    info.update({k: v for k, v in read_segment_info(args.predictions).items()
                 if k not in ("status", "cases", "parts")})
    if args.checkpoint:
        info["checkpoint"] = str(Path(args.checkpoint).resolve())
    return info


def cmd_evaluate(args) -> int:
    from .data.dataset import find_pairs
    from .evaluation.evaluate import evaluate_predictions

    _output_folder(args.out)
    config = _config_from(args)
    labels = config["data"]["labels"]
    merge = _parse_merge(args.merge)
    if args.split:
        refs = {p.name: p.label for p in _split_pairs(config, args.split)}
    elif args.references:
        refs = {p.name: p.image for p in find_pairs(args.references, image_suffix=args.reference_suffix)}
    else:
        raise AtlasregError("evaluate needs --references or --split")
    info = _evaluation_info(config, args, refs)
    per_case, summary = evaluate_predictions(args.predictions, refs, labels, args.out, merge=merge,
                                             test_set=args.test_set, info=info, overwrite=args.overwrite,
                                             progress=not args.quiet)
    print(Path(summary).read_text())
    print(f"per-case metrics: {per_case}")
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    _output_folder(args.out)
    html_path, md_path = build_report(args.evaluations, args.out, sensitivity=args.sensitivity,
                                      reference=args.reference, title=args.title, n_boot=args.bootstrap,
                                      overwrite=args.overwrite, progress=not args.quiet)
    print(f"report: {html_path}\nmarkdown: {md_path}")
    return 0


def cmd_correspond(args) -> int:
    from .correspondence import cmd_correspond as run

    return run(args)


def cmd_letter_b(args) -> int:
    from .data.letter_b import write_letter_b_dataset

    _output_folder(args.out)
    files = write_letter_b_dataset(args.out, args.n, seed=args.seed, corrupt=args.corrupt,
                                   start_index=args.start)
    print(f"{len(files)} files written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _output_folder(args.out)
    run_demo(args.out, epochs=args.epochs, n_train=args.train_cases, n_test=args.test_cases,
             progress=not args.quiet)
    return 0


def _int_at_least(minimum: int):
    """argparse type: an integer >= minimum (argparse reports anything else in one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default, except where there is none to show (None, False,
    empty) or the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, "", []) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`atlasreg: error: <problem> (see <command> --help)`),
    exit status 2, and the defaults in --help (:class:`_HelpFormatter`); subcommand parsers inherit
    both."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"atlasreg: error: {message} (see {self.prog} --help)\n")


_DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:<index>"
_OVERWRITE_HELP = "delete the results of another run that --out holds (without it such a folder is refused)"
_QUIET_HELP = "no progress bars"


def add_correspond_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``correspond`` command to an argparse sub-parser collection (``add_subparsers()``) and
    return its parser; its ``func`` imports :mod:`atlasreg.correspondence` when the command runs."""
    c = subparsers.add_parser(
        "correspond", help="map a labelmap or points of one segmented case onto another via the atlas "
        "(Eqs. 22-23)",
        description="Inter-subject correspondence through atlas space (Atlas-ISTN Eqs. 22-23), using the "
        f"transforms that `atlasreg segment` writes in each case folder ({INVERSE_TRANSFORM}, "
        f"{FORWARD_TRANSFORM}; {INVERSE_FIELD} gives the case's grid).")
    c.add_argument("--from", dest="from_case", required=True, metavar="CASE_DIR",
                   help="case folder of `atlasreg segment` of the source subject A")
    c.add_argument("--to", dest="to_case", required=True, metavar="CASE_DIR",
                   help="case folder of `atlasreg segment` of the target subject B")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--labelmap", metavar="FILE",
                      help="labelmap of A to resample onto B's grid (e.g. "
                           f"{case_labelmap_path('CASE_DIR', 'refine', '.nii.gz')})")
    what.add_argument("--points", metavar="FILE.csv",
                      help="CSV of world points (mm) of A, columns x,y[,z] (other columns are kept)")
    c.add_argument("--out", required=True, metavar="FILE",
                   help="output labelmap (.nii.gz, .png, ...) or CSV file")
    c.add_argument("--labels", metavar="L0,L1,...",
                   help="declared label values, background first (default: 0 and the values present)")
    c.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                   help="labelmap interpolation: per-label linear + argmax, or nearest neighbour")
    c.set_defaults(func=cmd_correspond)
    return c


def build_parser() -> argparse.ArgumentParser:
    """The `atlasreg` parser: one sub-parser per command, each option with its help and default, and
    ``--version``. Imports no command's module (no torch, SimpleITK or numpy)."""
    from .deepatlas.cli import add_deepatlas_parser
    from .demo import DEMO_SETTINGS
    from .register import add_register_parser

    p = _Parser(prog="atlasreg", description="Atlas-ISTN: joint segmentation, registration "
                "and atlas construction (Sinclair et al. 2022).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True,
                           help="the command; `atlasreg <command> --help` describes its options")

    t = sub.add_parser("train", help="train Atlas-ISTN from a YAML config (resumes if interrupted)")
    t.add_argument("config", help="experiment YAML, e.g. configs/letter_b.yaml")
    t.add_argument("--out", required=True, help="output folder (checkpoints, atlas, logs)")
    t.add_argument("--epochs", type=int, help="override training.epochs")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. "
                   "training.lambda=0.2 (repeatable)")
    t.add_argument("--force-new", "--no-resume", dest="force_new", action="store_true",
                   help="start a new run even if --out holds one (its checkpoints, atlas and logs are deleted); "
                   "without it a run with the same config resumes and one with another config is refused")
    t.add_argument("--device", default="auto", help=_DEVICE_HELP)
    t.add_argument("--devices", type=_positive_int, default=1,
                   help="processes on this machine (one per GPU; on a CPU, processes with the gloo backend): "
                   "more than one trains with Lightning's DDP; training.batch_size is per process")
    t.add_argument("--num-nodes", type=_positive_int, default=1,
                   help="machines (launch with torchrun or SLURM, see the README)")
    t.add_argument("--quiet", action="store_true", help="no progress bar: one summary line per epoch (losses, "
                   "seconds, validation Dice), then the paths of the model and the atlas (default: also a "
                   "progress bar on stderr with the running losses and the epoch's time)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("segment", help="ITN, 1-pass and refined segmentation of images or folders")
    s.add_argument("inputs", nargs="*", help="image files and/or folders of images")
    s.add_argument("--split", help="also segment the images of this data split of the checkpoint's config, "
                   "e.g. validation")
    s.add_argument("--checkpoint", required=True, help=f"{FINAL_CHECKPOINT} written by `atlasreg train`")
    s.add_argument("--out", required=True, help="output folder, one subfolder per case")
    s.add_argument("--image-suffix", default="", help="in folders, take only images named <case><suffix>.<ext>, "
                   "e.g. _img for Letter-B (B901_img.png -> case B901); without it, files named with the "
                   "label suffix of the checkpoint's config are left out, and a folder mixing images and "
                   "what look like labelmaps (*_seg, *_label, *_mask, ...) is refused")
    s.add_argument("--iterations", type=int, help="refinement iterations K (default from the config: 50)")
    s.add_argument("--beta", type=float, help="weight of L*_a2s (Eq. 17; default from the config)")
    s.add_argument("--gamma", type=float, help="weight of L*_s2a (Eq. 18; default from the config)")
    s.add_argument("--lambda", dest="lam", type=float, help="regularisation weight lambda* (world units; "
                   "default from the config)")
    s.add_argument("--refine-lr", type=float, help="Adam learning rate of the refinement (default from the "
                   "config)")
    s.add_argument("--cases-at-once", type=int, help="cases refined together, each with its own STN copy "
                   "(default from the config)")
    s.add_argument("--image-similarity", help="also fit the deformed atlas image to the image during the "
                   "refinement: lncc, mind, ngf, mi or mse (default from the config: none)")
    s.add_argument("--image-weight", type=float, help="weight of that image term (default from the config: 1)")
    s.add_argument("--refine-target", choices=REFINEMENT_TARGETS, help="what the deformed atlas labelmap is "
                   "fitted to: the ITN logits (the paper's Eq. 17) or the one-hot of their argmax (default from "
                   "the config)")
    s.add_argument("--refine-structures", choices=REFINEMENT_STRUCTURES, help="which structures the refinement "
                   "fits: all (the paper's) or those the ITN segmented in the case, so that one it missed follows "
                   "its neighbours (default from the config)")
    s.add_argument("--refine-loss", choices=LABEL_LOSSES, help="how the refinement compares the deformed atlas "
                   "labelmap with the ITN's output: mse (the paper's) or dice (every structure weighing the same; "
                   "default from the config)")
    s.add_argument("--atlas-topology", choices=ATLAS_TOPOLOGIES, help="none: the atlas labelmap as built (the "
                   "paper's); connected: one connected component per structure in the atlas the refinement fits "
                   "and in every labelmap warped from it (default from the config)")
    s.add_argument("--device", default="auto", help=_DEVICE_HELP + "; the model and the refinement run there")
    s.add_argument("--num-parts", type=_positive_int, default=1, metavar="P",
                   help="split the run into P parts, each a command of its own (on any machine) writing the "
                   "same --out: the cases go to the parts by batches of --cases-at-once, so the parts write "
                   "exactly the files of one run; the folder is complete when every part has finished")
    s.add_argument("--part-id", type=_non_negative_int, default=0, metavar="I",
                   help="which part this command runs, 0 <= I < P")
    s.add_argument("--devices", type=_positive_int, default=1, metavar="N",
                   help="segment with N processes of this machine (one per GPU; on a CPU, each with 1/N of the "
                   "threads): N parts of the run (of this --part-id's share), started together; under torchrun "
                   "or SLURM each process takes the part of its rank by itself")
    s.add_argument("--num-workers", type=_non_negative_int, metavar="N",
                   help="processes reading the cases ahead of the computation (0: none; default: 1 on up to 4 "
                   "CPUs, else 2)")
    s.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    s.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="Dice, HD, HD95, ASD per structure for ITN, 1-pass, refine, atlas")
    e.add_argument("predictions", help="output folder of `atlasreg segment`")
    e.add_argument("--references", help="folder of reference labelmaps named like the cases")
    e.add_argument("--split", help="take the references from this data split of the config, e.g. validation")
    e.add_argument("--reference-suffix", default="", help="suffix of reference files, e.g. _seg")
    e.add_argument("--checkpoint", help="checkpoint whose config declares the labels (default: the one "
                   f"the predictions' {SEGMENT_INFO} names)")
    e.add_argument("--config", help="config that declares the labels")
    e.add_argument("--merge", action="append", help="merge labels before evaluating, e.g. 255=1,2 (lungs); several "
                   "targets separated by ';' or as repeated options, e.g. 101=1,21;102=2,22 (hemispheres grouped)")
    e.add_argument("--out", required=True, help=f"folder for {METRICS_PER_CASE} and summary tables")
    e.add_argument("--test-set", help="name of the test set in the report (default: the predictions folder)")
    e.add_argument("--label", help="name of the model in the report (default: from its config, e.g. "
                   "'Atlas-ISTN', 'U-Net', 'VML', 'Fixed', 'SVF')")
    e.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    e.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    e.set_defaults(func=cmd_evaluate)

    add_correspond_parser(sub)
    add_register_parser(sub)
    add_deepatlas_parser(sub)

    r = sub.add_parser("report", help="one HTML page (and Markdown) with tables, statistics and figures "
                       "from evaluation folders")
    r.add_argument("evaluations", nargs="+", help="folders written by `atlasreg evaluate`")
    r.add_argument("--out", required=True, help=f"folder for {REPORT_HTML}, {REPORT_MD} and figures")
    r.add_argument("--sensitivity", nargs="*", default=[], help="evaluation folders of one model refined "
                   "with different lambda* (the paper's regularisation study)")
    r.add_argument("--reference", default="Refine", help="column compared with every other one")
    r.add_argument("--title", default="atlasreg evaluation report", help="title of the page")
    r.add_argument("--bootstrap", type=int, default=10000, help="bootstrap repetitions (paper: 10,000)")
    r.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    r.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal)")
    r.set_defaults(func=cmd_report)

    g = sub.add_parser("letter-b", help="generate synthetic Letter-B pairs (paper Sec. 3.1)")
    g.add_argument("--out", required=True, help="output folder (B<i>_img.png and B<i>_seg.png pairs)")
    g.add_argument("--n", type=_positive_int, default=100, help="number of image/labelmap pairs")
    g.add_argument("--start", type=_positive_int, default=1, help="index of the first case (B<start>)")
    g.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same images)")
    g.add_argument("--corrupt", action="store_true", help="add clutter and missing pieces")
    g.set_defaults(func=cmd_letter_b)

    d = sub.add_parser("demo", help="generate Letter-B, train, segment and evaluate (no external data)")
    d.add_argument("--out", default="demo_output", help="output folder (data, model, segmentations, "
                   "evaluations, report)")
    d.add_argument("--epochs", type=_positive_int, default=DEMO_SETTINGS["epochs"], help="training epochs")
    d.add_argument("--train-cases", type=_positive_int, default=DEMO_SETTINGS["n_train"],
                   help="generated training pairs")
    d.add_argument("--test-cases", type=_positive_int, default=DEMO_SETTINGS["n_test"],
                   help="generated test pairs, clean and corrupt each")
    d.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    d.set_defaults(func=cmd_demo)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return "atlasreg: warning: " + " ".join(str(message).split()) + "\n"


#: The warnings shown by this process's `main` (one-line texts), so each distinct one shows once.
_SHOWN_WARNINGS: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning of the command line: each distinct warning once, in one line
    `atlasreg: warning: <message>` on stderr (no file path, no source line), above any progress bar.
    Replaces showwarning rather than formatwarning, which Lightning replaces when imported."""
    text = _one_line_warning(message, category, filename, lineno)
    if text in _SHOWN_WARNINGS:
        return
    _SHOWN_WARNINGS.add(text)
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr, end="")


def _recording(warnings) -> bool:
    """Whether a ``warnings.catch_warnings(record=True)`` (pytest.warns, a test harness) is collecting
    the warnings: it replaces the module's low-level writer by its list's bound ``append``."""
    return getattr(getattr(warnings, "_showwarnmsg_impl", None), "__self__", None) is not None


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    _SHOWN_WARNINGS.clear()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # a bad argument (one line, status 2) or --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    try:
        with warnings.catch_warnings():  # showwarning and the filters are restored when the command ends
            if not _recording(warnings):
                warnings.showwarning = _show_warning
            return args.func(args)
    except AtlasregError as e:
        print(f"atlasreg: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output problem found while writing: a full disk, a file system gone read-only
        where = f"{e.filename}: " if e.filename else ""
        print(f"atlasreg: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlasreg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
