"""Which run an output folder belongs to (issue 14 item 4).

`segment`, `evaluate` and `report` write a manifest into their output folder (:mod:`atlasreg.contracts`:
:data:`~atlasreg.contracts.SEGMENT_INFO`, :data:`~atlasreg.contracts.EVALUATION_INFO`,
:data:`~atlasreg.contracts.REPORT_INFO`) naming what the results were made from: the
checkpoint (path and SHA-256) and refinement settings, the predictions and references, the
evaluation folders. A later run into the same folder with the same identity continues or rewrites it;
one with another identity is refused with a one-line error naming the manifest and the differing
entries, unless the user asks for the old results to be deleted (``--overwrite``). A folder holding
results without a manifest (from an unknown run) is refused the same way. So a folder never mixes the
results of two runs, and evaluate never attributes old cases to a new checkpoint. (`correspond`
writes one file, replaced atomically; it has no folder to mix.)
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from .config import differences
from .errors import AtlasregError


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes (a 16 MB checkpoint: about 30 ms). AtlasregError naming the file
    if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError as error:
        raise AtlasregError(f"cannot read ({error.strerror or error})", path) from error


def claim_output(folder: str | Path, manifest: str | Path, previous: Mapping, identity: Mapping,
                 owned: Sequence[Path], what: str, overwrite: bool = False) -> bool:
    """Decide whether a run may write into `folder`, before it writes anything.

    previous: the folder's manifest as read (``{}`` when it has none); identity: what this run's results
    are made from (plain YAML values), compared with the same keys of `previous` (a key the manifest
    lacks, from an older atlasreg, is not compared); owned: the entries of `folder` this kind of run
    writes (case folders, CSV files, ...); what: their name in messages (e.g. "segmentations").

    Returns True when the folder holds results of the same identity (the run continues it), False when
    the folder holds none of `what` (or they were deleted). Raises AtlasregError (one line, naming the
    manifest, or the folder when it has none) when it holds results of another identity, or results
    without a manifest, unless `overwrite`: those entries and the manifest are then deleted (only
    `owned` and the manifest: nothing else in the folder is touched)."""
    folder, manifest = Path(folder), Path(manifest)
    plain = yaml.safe_load(yaml.safe_dump(dict(identity), sort_keys=False))  # tuples -> lists, as stored
    if previous:
        changed = differences({k: previous[k] for k in plain if k in previous},
                              {k: v for k, v in plain.items() if k in previous})
        if not changed:
            return True
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        problem, where = f"holds {what} of another run ({shown})", manifest
    elif owned:
        names = ", ".join(sorted(p.name for p in owned)[:3]) + (", ..." if len(owned) > 3 else "")
        problem, where = f"holds {what} ({names}) without {manifest.name}, from an unknown run", folder
    else:
        return False
    if not overwrite:
        raise AtlasregError(f"{problem}: choose another --out, or pass --overwrite to delete them", where)
    for entry in owned:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)
    return False
