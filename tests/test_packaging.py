"""The project's set-up files agree with each other.

pyproject.toml is the source of truth for Python dependencies; environment.yml
(conda) must name the same packages. README.md documents two commands, `./lab
course` and `./lab test`, and CI (.ci/run) must run the second one. These tests
read files only and run `./lab` only on paths that stop before any set-up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "lab"

# Conda packages that are tooling, not project dependencies.
CONDA_TOOLING = {"python", "pip"}


def normalize(name: str) -> str:
    """PEP 503-style name: lowercase, runs of '-', '_', '.' become '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    """Package name of a PEP 508 requirement or a conda match spec.

    'qemu.qmp>=0.0.3' -> 'qemu-qmp'; 'matplotlib >=3.5' -> 'matplotlib';
    'python=3.11' -> 'python'; 'foo[bar]; python_version<"3.10"' -> 'foo'.
    """
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not match:
        raise ValueError(f"not a requirement: {spec!r}")
    return normalize(match.group(1))


def pyproject_requirements(text: str) -> set[str]:
    """Normalized names of [project] dependencies plus every optional extra."""
    project = tomllib.loads(text)["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return {requirement_name(spec) for spec in specs}


def parse_environment_yml(text: str) -> dict:
    """A line parser for the simple environment.yml this project keeps.

    Handles top-level `key: value`, top-level lists (`channels`, `dependencies`)
    and one nested `- pip:` list under `dependencies`. Returns
    {"name": str, "channels": [...], "conda": [...], "pip": [...]}.
    Anything else (anchors, flow lists, multi-line strings) is an error, so a
    change to the file's shape is noticed instead of misread.
    """
    result: dict = {"name": None, "channels": [], "conda": [], "pip": []}
    section = None  # top-level key whose list we are in
    in_pip = False
    pip_indent = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if indent == 0:
            key, sep, value = body.partition(":")
            if not sep:
                raise ValueError(f"environment.yml:{number}: expected 'key:': {raw!r}")
            section, in_pip = key.strip(), False
            if value.strip():
                result[section] = value.strip()
            continue
        if not body.startswith("- "):
            raise ValueError(f"environment.yml:{number}: expected a list item: {raw!r}")
        item = body[2:].strip()
        if in_pip and indent > pip_indent:
            result["pip"].append(item)
            continue
        in_pip = False
        if section == "channels":
            result["channels"].append(item)
        elif section == "dependencies":
            if item == "pip:":
                in_pip, pip_indent = True, indent
            elif item.endswith(":") or item.startswith(("{", "[")):
                raise ValueError(f"environment.yml:{number}: unsupported item: {raw!r}")
            else:
                result["conda"].append(item)
        else:
            raise ValueError(f"environment.yml:{number}: list under {section!r}")
    return result


@pytest.fixture(scope="module")
def environment() -> dict:
    return parse_environment_yml((ROOT / "environment.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject_names() -> set[str]:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11+")
    return pyproject_requirements((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def environment_names(env: dict) -> set[str]:
    names = {requirement_name(spec) for spec in env["conda"] + env["pip"]}
    return names - CONDA_TOOLING


# --- pyproject.toml <-> environment.yml ----------------------------------------------


def test_environment_yml_names_the_same_packages_as_pyproject(environment, pyproject_names):
    conda = environment_names(environment)
    only_pyproject = sorted(pyproject_names - conda)
    only_conda = sorted(conda - pyproject_names)
    assert not only_pyproject and not only_conda, (
        f"pyproject.toml and environment.yml disagree: only in pyproject.toml: "
        f"{only_pyproject}; only in environment.yml: {only_conda}"
    )


def test_environment_yml_header(environment):
    assert environment["name"] == "labkvm"
    assert environment["channels"] == ["conda-forge"]
    assert "python" in {requirement_name(spec) for spec in environment["conda"]}


def test_qemu_qmp_comes_from_pip(environment):
    # qemu.qmp is published on PyPI only, not on conda-forge.
    assert "qemu-qmp" in {requirement_name(spec) for spec in environment["pip"]}
    assert "qemu-qmp" not in {requirement_name(spec) for spec in environment["conda"]}


def test_comparison_notices_a_missing_dependency(pyproject_names):
    """The check above can fail: dropping one dependency is seen."""
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    dropped = "\n".join(line for line in text.splitlines() if "libvirt-python" not in line)
    assert "libvirt-python" in pyproject_names
    assert "libvirt-python" not in environment_names(parse_environment_yml(dropped))


@pytest.mark.parametrize(
    "spec, name",
    [
        ("qemu.qmp>=0.0.3", "qemu-qmp"),
        ("libvirt_python", "libvirt-python"),
        ("matplotlib >=3.5", "matplotlib"),
        ("python=3.11", "python"),
        ("Foo.Bar[baz]>=1; python_version<'3.10'", "foo-bar"),
    ],
)
def test_requirement_name(spec, name):
    assert requirement_name(spec) == name


def test_parser_reads_nested_pip_list():
    env = parse_environment_yml(
        "name: x\nchannels:\n  - conda-forge\ndependencies:\n  - a>=1  # c\n"
        "  - pip\n  - pip:\n      - b.c==2\n  - d\n"
    )
    assert env == {"name": "x", "channels": ["conda-forge"], "conda": ["a>=1", "pip", "d"],
                   "pip": ["b.c==2"]}


# --- README.md, .ci/run and ./lab --------------------------------------------------------


def test_readme_shows_both_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "./lab course" in readme
    assert "./lab test" in readme


def test_ci_runs_the_readme_test_command():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    code = [line.split("#", 1)[0] for line in ci.read_text(encoding="utf-8").splitlines()]
    runs = [line for line in code if re.search(r"(^|\s)(exec\s+)?\./lab\s+test(\s|$)", line)]
    assert runs, ".ci/run must run `./lab test`"


def test_lab_script_is_strict_and_evalless():
    text = LAB.read_text(encoding="utf-8")
    assert os.access(LAB, os.X_OK), "./lab must be executable"
    assert "set -euo pipefail" in text
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert not re.search(r"\beval\b", code)
    subprocess.run(["bash", "-n", str(LAB)], check=True)


def run_lab(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LAB), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **env}, stdin=subprocess.DEVNULL,
    )


def test_lab_help_and_unknown_command():
    assert run_lab("help").returncode == 0
    assert "./lab" in run_lab().stdout
    bad = run_lab("no-such-command")
    assert bad.returncode == 2
    assert "desconocida" in bad.stderr


@pytest.mark.parametrize(
    "os_release, expected",
    [
        ('ID=fedora\nVERSION_ID=40\n', "sudo dnf install"),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\n', "sudo dnf install"),
        ("ID=arch\n", "sudo pacman -S"),
        ('ID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n', "sudo zypper install"),
        ("ID=alpine\n", "qemu-system-x86"),
    ],
)
def test_lab_stops_on_other_distributions(tmp_path, os_release, expected):
    fake = tmp_path / "os-release"
    fake.write_text(os_release, encoding="utf-8")
    result = run_lab("setup", LAB_OS_RELEASE=str(fake))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "libvirt" in result.stderr


def test_sanitize_cfg_rules():
    nbval_plugin = pytest.importorskip("nbval.plugin")
    cfg = (ROOT / "notebooks" / "sanitize.cfg").read_text(encoding="utf-8")
    rules = nbval_plugin.get_sanitize_patterns(cfg)
    assert len(rules) == cfg.count("\nregex: "), "each 'regex:' needs a 'replace:' right after it"

    def sanitize(text: str) -> str:
        for regex, replace in rules:
            text = re.sub(regex, replace, text)
        return text

    assert sanitize("/srv/ci/clone/notebooks/a.ipynb") == "<REPO>/notebooks/a.ipynb"
    assert sanitize("/home/ana/.cache/labkit/k") == "~/.cache/labkit/k"
    assert sanitize("arranque: 1.24 s, QMP 3 ms") == "arranque: <DURACION>, QMP <DURACION>"
    assert sanitize("qemu pid 4242") == "qemu pid <PID>"
    assert sanitize("2026-11-26T02:08:12Z") == "<FECHA>"
    assert sanitize("<Guest object at 0x7f3a2b1c4d50>") == "<Guest object at 0xADDR>"
    # Lesson content stays compared.
    for kept in ("52:54:00:12:34:56", "port 0x3f8, gpa 0x1000", "64 MiB", "5 sectores"):
        assert sanitize(kept) == kept


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    subprocess.run(["shellcheck", str(LAB), str(ROOT / ".ci" / "run")], check=True)
