"""The README, docs/ and the scripts' docstrings stay true to the code: every
`python 0N_*.py ...` or `torchrun ... 0N_*.py ...` command they show names only flags
that script has, and a command without shell variables parses with its flags."""
import glob
import importlib
import os
import re
import shlex

import pytest

import common as C
from conftest import REPO

SCRIPTS = ("01_make_pairs", "02_train_latent_lpips", "03_ode_distill", "04_gan_finetune", "05_evaluate")
TABLES = {"03_ode_distill": "STAGE1", "04_gan_finetune": "STAGE2"}


def documents():
    """(name, text) of the README, every docs/*.md and each script's docstring."""
    docs = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
    out = [(os.path.relpath(p, REPO), open(p).read()) for p in docs]
    return out + [(s + ".py docstring", importlib.import_module(s).__doc__) for s in SCRIPTS]


def commands(text):
    """(script, argv) of every command in a text: a line (joined over trailing
    backslashes) cut at shell separators, comments and inline-code ticks."""
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        if "usage:" in line:  # a --help dump, not a command
            continue
        for part in re.split(r"&&|\|\||;(?=\s)|`|\s#\s|\s\|\s|\s{2,}\(", line):  # ... and a trailing "  (remark)"
            m = re.search(r"\b(?:python|torchrun)\b.*?\b(0[1-5]_\w+)\.py\b(.*)", part)
            if m and m[1] in SCRIPTS:  # a fork's copy (docs/forking.md) is not one of them
                try:
                    argv = shlex.split(m[2])
                except ValueError:  # an unbalanced quote: the command goes on in another code span
                    argv = m[2].split()
                yield m[1], [a for a in argv if a not in ("(", ")")]


def flag_names(script):
    names = {"help"}
    for group in importlib.import_module(script).FLAGS.values():
        for name, default, kind, _ in group:
            names.add(name)
            if isinstance(default, bool) or kind is bool:
                names.add("no-" + name)
    return names


def all_commands():
    return [(doc, script, argv) for doc, text in documents() for script, argv in commands(text)]


def test_the_documents_show_commands():
    found = all_commands()
    scripts = {s for _, s, _ in found}
    assert len(found) > 40 and scripts == set(SCRIPTS), (len(found), scripts)
    readme = open(os.path.join(REPO, "README.md")).read()
    assert "python 01_make_pairs.py && python 02_train_latent_lpips.py && python 03_ode_distill.py" in readme


def fork_flags():
    """The flags that docs/forking.md's own code blocks add (its commands run them; tests/test_forking.py)."""
    text = open(os.path.join(REPO, "docs", "forking.md")).read()
    return {m for block in re.findall(r"```python\n(.*?)```", text, re.S) for m in re.findall(r'\("(\w+)", ', block)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_documented_flag_exists_and_parses(script):
    known, bad, parsed, forks = flag_names(script), [], 0, fork_flags()
    mod = importlib.import_module(script)
    for doc, s, argv in all_commands():
        if s != script:
            continue
        names = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        forked = doc.endswith("forking.md") and names & forks
        bad += [f"{doc}: {script}.py {' '.join(argv)}  (no flag --{n})" for n in sorted(names - known - (forks if forked else set()))]
        if "$" not in " ".join(argv) and "--help" not in argv and not bad and not forked:
            try:  # the values too: types, choices, the preset
                C.parse_config(mod.__doc__, mod.FLAGS, argv, getattr(mod, TABLES.get(script, ""), None))
            except SystemExit as e:
                bad.append(f"{doc}: {script}.py {' '.join(argv)}  ({e})")
            parsed += 1
    assert not bad, "\n".join(bad)
    assert parsed > 0


def test_a_wrong_flag_is_caught(monkeypatch):
    """The check above can fail: a README line with a flag that 03 does not have."""
    real = documents()
    monkeypatch.setattr(__import__(__name__), "documents",
                        lambda: real + [("README.md", "python 03_ode_distill.py --loss mse --lpips_l1\n")])
    with pytest.raises(AssertionError, match=r"no flag --lpips_l1"):
        test_every_documented_flag_exists_and_parses("03_ode_distill")


def test_no_paragraph_runs_into_a_list_item():
    """Markdown joins an unindented line that follows a list item, with no blank line
    between, to that item ("lazy continuation"): the paragraph then renders inside the
    bullet. Every such line in the README and docs/ is reported."""
    swallowed = []
    for name, text in documents()[:-len(SCRIPTS)]:
        in_item = fence = False
        for i, line in enumerate(text.split("\n"), 1):
            if line.startswith("```"):
                fence = not fence
            if fence:
                continue
            if re.match(r"\s*([-*]|\d+\.) ", line):
                in_item = True
            elif not line.strip():
                in_item = False
            elif in_item and not line.startswith((" ", "|", "<")):
                swallowed.append(f"{name}:{i}: {line[:60]}")
                in_item = False
    assert not swallowed, swallowed
