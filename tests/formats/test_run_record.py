import json

import pytest

from workbench.errors import UsageError
from workbench.formats.run_record import RunRecord, read_run, versions


def test_a_written_record_reads_back_equal(tmp_path):
    record = RunRecord(recipe={"name": "tiny"}, world_size=2, penalties=["ewc"], data={"n_train": 3})
    record.write(tmp_path)
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert "final" not in on_disk and "wandb" not in on_disk  # left out until set
    assert on_disk["fisher"] is None and on_disk["status"] == "running"
    assert read_run(tmp_path) == record
    record.status, record.final = "completed", {"eval_loss": 1.5}
    record.write(tmp_path)
    assert read_run(tmp_path / "run.json").final == {"eval_loss": 1.5}


def test_later_keys_are_kept(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"recipe": {"name": "x"}, "heartbeat": 12}))
    assert read_run(tmp_path).model_extra == {"heartbeat": 12}


@pytest.mark.parametrize("content, expected", [
    (None, "no run.json"),
    ("{not json", "not a readable run.json"),
    ('{"status": "completed"}', 'not a workbench run record (no "recipe")'),
    ('{"recipe": {}, "schema_version": 9}', "schema_version 9"),
    ('{"recipe": {}, "status": "exploded"}', "status: Input should be"),
    ('{"recipe": {}, "world_size": "two"}', "world_size:"),
])
def test_a_bad_record_is_one_line_naming_the_file(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    with pytest.raises(UsageError) as exc:
        read_run(tmp_path)
    assert str(exc.value).startswith(str(tmp_path)) and expected in str(exc.value) and "\n" not in str(exc.value)


def test_versions_name_every_package_without_importing_it():
    assert set(versions()) == {"python", "workbench", "torch", "transformers", "peft", "accelerate"}
