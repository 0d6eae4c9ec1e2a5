"""Tests of atlasreg.outputs: which run an output folder belongs to."""

import hashlib

import pytest

from atlasreg.errors import AtlasregError
from atlasreg.outputs import claim_output, file_sha256


def test_file_sha256_is_the_hash_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    with pytest.raises(AtlasregError, match="missing.ckpt: cannot read"):
        file_sha256(tmp_path / "missing.ckpt")


def test_claim_output_same_other_unknown_and_overwrite(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "case1").mkdir()
    (folder / "notes.txt").write_text("the user's own file")
    manifest = folder / "m.yaml"
    manifest.write_text("x")
    identity = {"checkpoint": "/a.ckpt", "refinement": {"iterations": 50, "lambda": (0.1,)}}
    stored = {"checkpoint": "/a.ckpt", "refinement": {"iterations": 50, "lambda": [0.1]}, "status": "complete"}
    owned = [folder / "case1"]
    # the same identity (tuples stored as lists; other manifest keys ignored): the run continues
    assert claim_output(folder, manifest, stored, identity, owned, "cases") is True
    # a key the manifest lacks (an older atlasreg's) is not compared
    assert claim_output(folder, manifest, {"checkpoint": "/a.ckpt"}, identity, owned, "cases") is True
    # nothing of this kind there: a new run
    assert claim_output(folder, manifest, {}, identity, [], "cases") is False
    with pytest.raises(AtlasregError) as error:
        claim_output(folder, manifest, dict(stored, refinement={"iterations": 20, "lambda": [0.1]}), identity,
                     owned, "cases")
    assert str(error.value) == (f"{manifest}: holds cases of another run (refinement.iterations: 20 -> 50): "
                                "choose another --out, or pass --overwrite to delete them")
    with pytest.raises(AtlasregError, match=rf"^{folder}: holds cases \(case1\) without m.yaml, from an unknown run"):
        claim_output(folder, manifest, {}, identity, owned, "cases")
    assert (folder / "case1").is_dir() and manifest.is_file()
    # --overwrite deletes the other run's entries and manifest, nothing else
    assert claim_output(folder, manifest, {"checkpoint": "/b.ckpt"}, identity, owned, "cases", overwrite=True) is False
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
