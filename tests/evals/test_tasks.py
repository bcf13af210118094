import io
import os
import json
import tarfile
from pathlib import Path

import pytest

from workbench.errors import UsageError
from workbench.assets import bigbench as tasks
from workbench.assets import fetch
from workbench.assets.bigbench import fetch_bigbench
from workbench.data.bigbench import MCItem, bigbench_generative, bigbench_mc
from workbench.evals.tasks import load_task_yaml, local_task
from tests.helpers import REPO, repo

# ---------------------------------------------------------------- local lm-eval task files

DOCS = [
    {"question": "Is the sky blue?", "choices": ["yes", "no"], "label": 0, "answer": "yes", "a": "up", "b": "down"},
    {"question": "2 + 2?", "choices": ["3", "4", "five"], "label": 1, "answer": "4", "a": "left", "b": "right"},
    {"question": "Odd one out", "choices": ["cat", "dog", "car", "cow"], "label": 2, "answer": "car",
     "a": "in", "b": "out"},
]

BASE = {
    "task": "demo",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_choice": "choices",
    "doc_to_target": "label",
}


def write_task(directory: Path, docs=DOCS, name="task.yaml", data="docs.jsonl", **overrides) -> Path:
    """A task YAML (BASE with overrides; None deletes a key) next to a JSONL of `docs`."""
    import yaml
    directory.mkdir(parents=True, exist_ok=True)
    if docs is not None:
        (directory / data).write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {**BASE, **overrides}
    config = {k: v for k, v in config.items() if v is not None}
    path = directory / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_template_text_field_choices_field_index_target(tmp_path):
    items = local_task(write_task(tmp_path))
    assert items[1] == MCItem("Question: 2 + 2?\nAnswer:", ("3", "4", "five"), 1, 1, " ")
    assert [i.gold for i in items] == [0, 1, 2] and [i.doc_id for i in items] == [0, 1, 2]


@pytest.mark.parametrize("overrides, golds, choices0", [
    # doc_to_choice as a template producing a list literal; target as a template giving a digit
    ({"doc_to_choice": "{{[a, b]}}", "doc_to_target": "{{label % 2}}"}, [0, 1, 0], ("up", "down")),
    # doc_to_choice as a YAML list; doc_to_target as a constant index
    ({"doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": 3}, [3, 3, 3], ("A", "B", "C", "D")),
    # doc_to_target as a field holding the choice text
    ({"doc_to_target": "answer"}, [0, 1, 2], ("yes", "no")),
    # doc_to_target as a template rendering the choice text
    ({"doc_to_choice": "{{[a, b]}}", "doc_to_target": "{{b}}"}, [1, 1, 1], ("up", "down")),
    # doc_to_choice as a mapping: lm-eval takes its values
    ({"doc_to_choice": {"x": "up", "y": "down"}, "doc_to_target": 1}, [1, 1, 1], ("up", "down")),
])
def test_choice_and_target_forms(tmp_path, overrides, golds, choices0):
    items = local_task(write_task(tmp_path, **overrides))
    assert [i.gold for i in items] == golds
    assert items[0].choices == choices0


def test_field_text_description_delimiter_and_filter(tmp_path):
    path = write_task(tmp_path, doc_to_text="question", target_delimiter="\n",
                      description="{{ a | upper }}: {{ question | regex_replace('[?]', '!') }}\n\n")
    item = local_task(path)[0]
    assert item.context == "UP: Is the sky blue!\n\nIs the sky blue?"
    assert item.delimiter == "\n"


def test_validation_split_limit_file_list_and_json_array(tmp_path):
    (tmp_path / "part2.json").write_text(json.dumps(DOCS[:2]))  # a JSON array, as datasets reads it
    path = write_task(tmp_path, test_split=None, validation_split="val",
                      dataset_kwargs={"data_files": {"val": ["docs.jsonl", "part2.json"]}})
    assert [i.gold for i in local_task(path)] == [0, 1, 2, 0, 1]
    assert len(local_task(path, limit=2)) == 2


def test_data_files_relative_to_the_yaml_not_the_cwd(tmp_path, monkeypatch):
    path = write_task(tmp_path / "suite" / "tasks")
    monkeypatch.chdir(tmp_path)
    assert len(local_task(Path("suite/tasks/task.yaml"))) == 3
    absolute = write_task(tmp_path / "other", docs=None,
                          dataset_kwargs={"data_files": {"test": str(path.parent / "docs.jsonl")}})
    assert len(local_task(absolute)) == 3


def test_the_shipped_example_task():
    items = local_task(REPO / "evals" / "tasks" / "capitals.yaml")
    assert items[0] == MCItem("Q: What is the capital of France?\nA:", ("Paris", "Lyon", "Marseille", "Nice"), 0, 0)


def test_missing_fields_are_none_as_datasets_gives_them(tmp_path):
    docs = [{"question": "q", "choices": ["a", "b"], "label": 0, "hint": "h"},
            {"question": "r", "choices": ["a", "b"], "label": 1}]
    items = local_task(write_task(tmp_path, docs, doc_to_text="{{question}} ({{hint}})"))
    assert [i.context for i in items] == ["q (h)", "r (None)"]


BAD_CASES = {
    "yaml syntax": (dict(), "task: [unclosed\n", None, "invalid YAML"),
    "function tag": (dict(), "task: demo\ndoc_to_text: !function utils.doc_to_text\n", None,
                     "doc_to_text: !function utils.doc_to_text runs Python code"),
    "hub dataset": (dict(dataset_path="super_glue"), None, None, "dataset_path: 'super_glue'"),
    "generate_until": (dict(output_type="generate_until"), None, None, "output_type: 'generate_until'"),
    "unknown key": (dict(doc_to_txt="x"), None, None, "did you mean 'doc_to_text'"),
    "process_docs": (dict(process_docs="x"), None, None, "'process_docs' is not supported"),
    "missing key": (dict(doc_to_target=None), None, None, "'doc_to_target' is missing"),
    "no split": (dict(test_split=None), None, None, "give test_split or validation_split"),
    "split not in files": (dict(test_split="validation"), None, None, "split 'validation' has no entry"),
    "fewshot": (dict(num_fewshot=5), None, None, "zero-shot"),
    "missing data": (dict(dataset_kwargs={"data_files": {"test": "nope.jsonl"}}), None, None, "nope.jsonl"),
    "empty data": (dict(), None, "\n\n", "holds no records"),
    "malformed line": (dict(), None, json.dumps(DOCS[0]) + "\n{not json\n", "docs.jsonl:2: invalid JSON"),
    "not an object": (dict(), None, "[1, 2]\n", "expected an array of objects, found a int"),
    "target not a choice": (dict(doc_to_target="a"), None, None, "'up', which is not one of the choices"),
    "target out of range": (dict(doc_to_target=7), None, None, "not an index into 2 choices"),
    "undefined field": (dict(doc_to_text="{{missing}}"), None, None, "doc_to_text on doc 0: UndefinedError"),
    "choice not a list": (dict(doc_to_choice="{{question}}"), None, None, "not a list literal"),
    "multiple targets": (dict(doc_to_target="{{[0, 1]}}"), None, None, "multiple targets"),
    "multiple inputs": (dict(doc_to_text="{{label}}"), None, None, "multiple-input"),
    # as in lm-eval, a template rendering all digits is an index, even when it is a choice's text
    "digit text is an index": (dict(doc_to_target="{{choices[label]}}"), None, None,
                               "doc 1 gives 4: not an index into 3 choices"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_usage_error_naming_the_file(tmp_path, case):
    overrides, yaml_text, data_text, expected = BAD_CASES[case]
    path = write_task(tmp_path, **overrides)
    if yaml_text is not None:
        path.write_text(yaml_text)
    if data_text is not None:
        (tmp_path / "docs.jsonl").write_text(data_text)
    with pytest.raises(UsageError) as info:
        local_task(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_missing_task_file(tmp_path):
    with pytest.raises(UsageError, match="nope.yaml: lm-eval task file not found"):
        local_task(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"task: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UsageError, match="evil.yaml: line 1: invalid YAML"):
        load_task_yaml(path)
    assert not marker.exists()


# ---------------------------------------------------------------- BIG-bench from a fake sdist

BB_TASKS = {
    "alpha": {"name": "alpha", "examples": [
        {"input": "Pick one.", "target_scores": {"low": 0, "mid": 0.5, "top": 1, "other": 0.2}},
        {"input": "No scores here.", "target": "free text"},
        {"input": "Tie goes to the first.", "target_scores": {"a": 1, "b": 1, "c": 0}},
        {"input": "Last.", "target_scores": {"x": 0.0, "y": 1.0}, "target": ["y", "why"]},
    ]},
    "beta": {"name": "beta", "examples": [{"input": "Spell cat backwards", "target": "tac"}]},
    "parent": {"name": "parent", "description": "split into subtasks"},
    "parent/child_one": {"name": "child_one", "examples": [{"input": "c", "target_scores": {"p": 1, "q": 0}}]},
}


def make_sdist(path: Path, task_files: dict[str, bytes]) -> Path:
    """A .tar.gz laid out like the bigbench sdist, with some non-task files around the tasks."""
    with tarfile.open(path, "w:gz") as archive:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        add("bigbench-1.0.0/setup.py", b"# not a task\n")
        for name, data in task_files.items():
            add(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json", data)
            add(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/README.md", b"readme")
    return path


@pytest.fixture
def bigbench(tmp_path, monkeypatch):
    """An empty workbench cache and a fake sdist in $WORKBENCH_BIGBENCH_SDIST; counts archive opens."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    sdist = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {n: json.dumps(t).encode() for n, t in BB_TASKS.items()})
    monkeypatch.setenv(tasks.SDIST_ENV, str(sdist))
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tasks.tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    return tmp_path / "cache" / "bigbench", opened


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_fetch_extracts_only_the_named_tasks_and_reuses_the_cache(bigbench):
    root, opened = bigbench
    paths = fetch_bigbench(["alpha", "parent/child_one"])
    assert files_under(root) == {"alpha/task.json", "parent/child_one/task.json", "index.json", ".lock"}
    assert json.loads(paths["alpha"].read_text()) == BB_TASKS["alpha"]
    assert len(opened) == 1
    assert fetch_bigbench(["alpha"]) == {"alpha": paths["alpha"]}
    assert len(bigbench_mc("parent/child_one")) == 1
    assert len(opened) == 1  # cached: the archive is not opened again
    fetch_bigbench(["beta"])  # a new task reads the archive once more
    assert len(opened) == 2 and (root / "beta" / "task.json").is_file()


def test_unknown_task_did_you_mean_without_extracting(bigbench):
    root, opened = bigbench
    with pytest.raises(UsageError, match=r"bigbench task 'alpah' is not in bigbench==1\.0\.0 \(did you mean 'alpha'\?\)"):
        fetch_bigbench(["alpha", "alpah"])
    assert files_under(root) == {"index.json", ".lock"}
    # the archive's index is cached: the next unknown name is refused without reading it again
    with pytest.raises(UsageError, match="did you mean 'beta'"):
        fetch_bigbench(["betta"])
    assert len(opened) == 1
    for bad in ("../etc", "alpha/.", "a b"):
        with pytest.raises(UsageError, match="not a task name"):
            fetch_bigbench([bad])


def test_bigbench_mc_items(bigbench, capsys):
    items = bigbench_mc("alpha")
    assert items[0] == MCItem("Q: Pick one.\nA:", ("low", "mid", "top", "other"), 2, 0, " ")
    assert items[1].gold == 0 and items[1].doc_id == 2  # a tie goes to the first highest score
    assert [i.doc_id for i in items] == [0, 2, 3]
    assert "skipped 1 example(s) without target_scores" in capsys.readouterr().err
    assert [i.doc_id for i in bigbench_mc("alpha", limit=1)] == [0]
    with pytest.raises(UsageError, match="'beta' has no multiple-choice examples"):
        bigbench_mc("beta")
    with pytest.raises(UsageError, match="'parent' has no examples of its own; name a subtask: parent/child_one"):
        bigbench_mc("parent")


def test_bigbench_generative_records(bigbench):
    assert bigbench_generative("alpha") == [
        {"prompt": "Q: No scores here.\nA:", "completion": " free text"},
        {"prompt": "Q: Last.\nA:", "completion": " y"},  # the first of several targets
    ]
    assert bigbench_generative("beta", limit=5) == [{"prompt": "Q: Spell cat backwards\nA:", "completion": " tac"}]


@pytest.mark.parametrize("cached", ["alpha/task.json", "index.json"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_file_is_said_removed_and_extracted_again(bigbench, capsys, cached, damage):
    """A cached task.json or the archive's index cut short or with a byte flipped: one line naming
    it, then the task is read from the archive again and its items are the same."""
    root, opened = bigbench
    first = bigbench_mc("alpha")
    path = root / cached
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data.replace(b"[", b"\xff", 1))
    capsys.readouterr()
    if cached == "index.json":  # read when a name is checked: a new name reads the archive again
        assert fetch_bigbench(["alpha", "beta"])["beta"].is_file()
    assert bigbench_mc("alpha") == first
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bigbench: ")]
    assert len(lines) == 1 and str(path) in lines[0] and "extracted again" in lines[0], lines
    assert len(opened) == 2


def test_a_bad_archive_member_leaves_the_cache_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    sdist = make_sdist(tmp_path / "bad.tar.gz", {"good": b'{"examples": []}', "broken": b'{"examples": ['})
    with pytest.raises(UsageError, match="'broken': its task.json in the archive is not JSON"):
        fetch_bigbench(["good", "broken"], sdist=sdist)
    assert files_under(tmp_path / "cache" / "bigbench") == {"index.json", ".lock"}


def test_a_write_killed_midway_leaves_no_partial_file(bigbench, monkeypatch):
    root, _ = bigbench

    def half_then_die(self, data):
        Path.write_text(self, data[: len(data) // 2].decode())
        raise KeyboardInterrupt

    real_write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch_bigbench(["alpha"])
    assert files_under(root) == {"index.json", ".lock"}  # no task.json, no temp file
    # a SIGKILL skips the cleanup: the temp file stays, task.json still does not exist
    (root / "alpha").mkdir(exist_ok=True)
    (root / "alpha" / ".task.json.x1y2.tmp").write_text('{"exam')
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    assert bigbench_mc("alpha")[0].gold == 2  # the next fetch extracts it and clears the leftover
    assert files_under(root) == {"index.json", ".lock", "alpha/task.json"}


def test_unreadable_archive_and_failed_download(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UsageError, match="cannot read the archive"):
        fetch_bigbench(["alpha"], sdist=tmp_path / "junk.tar.gz")
    monkeypatch.delenv(tasks.SDIST_ENV, raising=False)

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for bigbench==1.0.0\n"

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: Failed())  # no network in a unit test
    with pytest.raises(UsageError, match=r"could not download bigbench==1\.0\.0 .*No matching distribution"):
        fetch_bigbench(["alpha"])
    assert not list((tmp_path / "cache" / "bigbench").glob(".sdist-*"))  # the download dir is gone


def test_bigbench_mc_in_the_chat_format(bigbench):
    """prompt: chat renders the input as a user turn of the model's chat template (the tiny
    model's is ChatML) and scores each choice right after the assistant's turn opens."""
    from workbench.evals.evaluate import _mc_items
    from workbench.evals.suite import Suite
    from workbench.modeling.load import load_tokenizer
    from workbench.config.recipe import ModelSection

    tokenizer = load_tokenizer(ModelSection(name="tiny-random-llama"))
    suite = Suite(name="t", multiple_choice=[{"bigbench": "alpha", "prompt": "chat", "limit": 1}])
    item = _mc_items(suite, Path("."), tokenizer)["alpha"][0]
    assert item == MCItem("<|im_start|>user\nPick one.<|im_end|>\n<|im_start|>assistant\n",
                          ("low", "mid", "top", "other"), 2, 0, "")
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="'alpha': prompt: chat needs a tokenizer with a chat template"):
        _mc_items(suite, Path("."), tokenizer)
    with pytest.raises(ValueError, match="'prompt' applies to bigbench tasks"):
        Suite(name="t", multiple_choice=[{"local": "task.yaml", "prompt": "chat"}])


def test_one_eval_of_three_bigbench_tasks_reads_the_archive_once(bigbench, tmp_path, capsys):
    """A suite of three BIG-bench tasks on an empty cache: the eval fetches them in one pass over
    the archive (358 MB on PyPI), not one pass a task; a second eval reads none."""
    from workbench.cli import main
    from workbench.config.recipe import load_recipe
    from workbench.training.run import train

    root, opened = bigbench
    mc = {"examples": [{"input": f"Q{i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(6)]}
    make_sdist(Path(os.environ[tasks.SDIST_ENV]), {name: json.dumps({"name": name, **mc}).encode()
                                                  for name in ("one", "two", "three")})
    opened.clear()  # writing the archive opened it too
    run = train(load_recipe(repo("recipes/tiny.yaml"), ["train.max_steps=2", "data.max_examples=32"]),
                tmp_path / "run")
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: three\nbatch_size: 8\nmax_length: 64\ngeneral: null\noverfitting: null\n"
                     "multiple_choice:\n  - {bigbench: one}\n  - {bigbench: two}\n  - {bigbench: three}\n")
    args = ["eval", "--suite", str(suite), "--run", str(run), "--out", str(tmp_path / "results.json")]
    assert main(args) == 0, capsys.readouterr().err
    assert len(opened) == 1 and {"one/task.json", "two/task.json", "three/task.json"} <= files_under(root)
    assert main(args) == 0 and len(opened) == 1
