"""The container image, checked without a Docker engine.

* ``Dockerfile.alpine`` is parsed as text (continuation lines joined, one entry per instruction, stages
  split at ``FROM``) and its structure is asserted: an Alpine Python base, no compiler, binary wheels
  only, a non-root user, tini, exec-form commands, the health check and the environment.
* ``requirements/container.txt`` is checked against ``pyproject.toml`` offline, and (``slow``) resolved
  with pip for the image's platform (CPython 3.11 on musl): every pin must come as a musllinux or
  pure-Python wheel, and the set must be closed under the wheels' own dependencies. The same for
  ``requirements/container-vips.txt`` (``--build-arg RESIZER=vips``), where only pure-Python pyvips
  comes as a source archive.
* From those wheels, an estimate of the image size is printed and bounded.
"""

from __future__ import annotations

import fnmatch
import json
import marshal
import re
import shlex
import subprocess
import sys
import tarfile
import tomllib
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from optimizer.settings import setting_fields
from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile.alpine"
DOCKERIGNORE = ROOT / ".dockerignore"
REQUIREMENTS = ROOT / "requirements" / "container.txt"
# The optional libvips resize engine, on top of REQUIREMENTS when built with --build-arg RESIZER=vips.
VIPS_REQUIREMENTS = ROOT / "requirements" / "container-vips.txt"
# What building pyvips's wheel in that stage needs, pinned (its source archive's [build-system]).
VIPS_BUILD_REQUIREMENTS = ROOT / "requirements" / "container-vips-build.txt"
# Published as a source archive only (pure Python); the image builds its wheel without a compiler.
SOURCE_ONLY = frozenset({canonicalize_name("pyvips")})
PYPROJECT = ROOT / "pyproject.toml"

# The image's interpreter and platform, as pip names them. They must agree with the base image.
IMAGE_PYTHON = "3.11"
IMAGE_PLATFORM = "musllinux_1_2_x86_64"
# Markers of the image's environment, for evaluating the dependencies' environment markers.
IMAGE_MARKERS = {
    "python_version": IMAGE_PYTHON,
    "python_full_version": IMAGE_PYTHON + ".0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}

COMPILER_PACKAGES = frozenset(
    {"gcc", "g++", "clang", "musl-dev", "libc-dev", "build-base", "make", "cmake", "cargo", "rust"}
)

# --- Dockerfile parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the instruction, continuation lines joined with single spaces
    line: int  # where it starts in the file


@dataclass
class Stage:
    base: str  # the image after ARG substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"the stage FROM {self.base} has no {keyword}"
        return found[-1]


def parse_instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, as the builder does: a trailing backslash continues the line,
    comment lines and empty lines inside a continuation are dropped."""
    result: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # between instructions, or inside a continuation: ignored either way
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(p for p in parts if p).partition(" ")
            result.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a continuation line"
    return result


def _substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is used in FROM but has no default ARG"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def parse_stages(text: str) -> list[Stage]:
    """The build stages; global ARG defaults (before the first FROM) are substituted into FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_substitute(words[0], global_args), name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may precede FROM"
            key, _, default = instruction.args.partition("=")
            global_args[key.strip()] = default.strip().strip("\"'")
        else:
            stages[-1].instructions.append(instruction)
    return stages


def dockerfile_stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text())


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def root_image(stage: Stage, stages: list[Stage]) -> str:
    """The image a stage finally builds on, following ``FROM <earlier stage>``."""
    named = {s.name: s for s in stages if s.name}
    while stage.base in named:
        stage = named[stage.base]
    return stage.base


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; fails if it is in shell form."""
    assert instruction.args.startswith("["), f"{instruction.keyword} is in shell form: {instruction.args}"
    value = json.loads(instruction.args)
    assert isinstance(value, list), instruction.args
    assert all(isinstance(item, str) for item in value), instruction.args
    return [str(item) for item in value]


def shell_commands(instruction: Instruction) -> Iterator[list[str]]:
    """The simple commands of a shell-form RUN, split at &&, ||, ;, | and &, each as its words."""
    lexer = shlex.shlex(instruction.args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            if words:
                yield words
            words = []
        else:
            words.append(token)
    if words:
        yield words


def env_values(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: use ENV KEY=value, not the legacy ENV KEY value form"
            values[key] = value
    return values


def user_id(stage: Stage) -> str:
    """The user part of the stage's last USER instruction (before any :group)."""
    return stage.last("USER").args.split(":")[0].strip()


# --- Dockerfile structure ------------------------------------------------------------------------------


def test_dockerfile_parser_joins_continuations_and_skips_comments() -> None:
    text = (
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11-alpine\nFROM ${BASE} AS one\n"
        'RUN a \\\n  # a comment inside the continuation\n\n  && b\nFROM $BASE\nCMD ["x"]\n'
    )
    stages = parse_stages(text)
    assert [(s.base, s.name) for s in stages] == [("python:3.11-alpine", "one"), ("python:3.11-alpine", None)]
    assert stages[0].instructions == [Instruction("RUN", "a && b", 4)]
    assert exec_form(stages[1].last("CMD")) == ["x"]


def test_multi_stage_on_official_python_alpine() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "expected a build stage and a final stage"
    final = stages[-1]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-alpine(\d+\.\d+)?", final.base), final.base
    # The venv made in the build stage is copied as is: its compiled extensions must match the final
    # stage's interpreter and C library, so every stage that installs Python packages shares the base.
    for stage in stages:
        if any("pip" in i.args for i in stage.all("RUN")):
            root = root_image(stage, stages)
            assert root == final.base, f"stage {stage.name} builds on {root}, not {final.base}"
    copies = final.all("COPY")
    assert copies, "the final stage copies nothing from the build stage"
    assert all(i.args.startswith("--from=") for i in copies), "the final stage must take only build output"


def test_no_compiler_in_any_stage() -> None:
    for stage in dockerfile_stages():
        for instruction in stage.all("RUN"):
            for words in shell_commands(instruction):
                if words[:2] not in (["apk", "add"], ["apt-get", "install"], ["apt", "install"]):
                    continue
                packages = {w for w in words[2:] if not w.startswith("-")}
                forbidden = packages & COMPILER_PACKAGES | {p for p in packages if p.endswith("-dev")}
                assert not forbidden, f"line {instruction.line} installs a toolchain: {sorted(forbidden)}"


def _runs_pip(words: list[str]) -> bool:
    """``pip ...``, ``pip3 ...`` or ``python -m pip ...``, under any path."""
    if re.fullmatch(r"pip3?(\.\d+)?", Path(words[0]).name):
        return True
    return re.fullmatch(r"python3?(\.\d+)?", Path(words[0]).name) is not None and words[1:3] == ["-m", "pip"]


def test_pip_installs_only_binary_wheels() -> None:
    copied_to = [
        i.args.split()[-1]
        for stage in dockerfile_stages()
        for i in stage.all("COPY")
        if i.args.split()[0] == str(REQUIREMENTS.relative_to(ROOT))
    ]
    assert copied_to, f"{REQUIREMENTS.relative_to(ROOT)} is never copied into the build"
    pip_runs = 0
    installs_requirements = False
    for stage in dockerfile_stages():
        for instruction in stage.all("RUN"):
            for words in shell_commands(instruction):
                if not _runs_pip(words) or not {"install", "wheel", "download"} & set(words):
                    continue
                pip_runs += 1
                joined = " ".join(words)
                assert re.search(r"--only-binary[= ]:all:", joined), f"line {instruction.line}: {joined}"
                if "-r" in words and words.index("-r") + 1 < len(words):
                    installs_requirements |= words[words.index("-r") + 1] in copied_to
    assert pip_runs >= 2, "expected pip to install the pinned dependencies and the project"
    assert installs_requirements, "pip never installs the copied requirements/container.txt with -r"


def test_final_stage_runs_as_non_root_user() -> None:
    user = user_id(final_stage())
    assert user not in ("", "root", "0"), f"USER {user}"
    if user.isdigit():
        assert int(user) >= 1000, "a fixed, unprivileged UID"


def test_entrypoint_is_tini_and_cmd_is_the_service_in_exec_form() -> None:
    final = final_stage()
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    assert Path(entrypoint[0]).name == "tini", entrypoint
    assert "--" in entrypoint, "tini needs -- before the command"
    command = exec_form(final.last("CMD"))
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert command[0] in scripts, f"CMD {command} is not one of the project's scripts {sorted(scripts)}"
    assert any("apk add" in i.args and "tini" in i.args for i in final.all("RUN")), "tini is not installed"
    assert final.last("STOPSIGNAL").args == "SIGTERM"


def test_healthcheck_hits_healthz() -> None:
    check = final_stage().last("HEALTHCHECK").args
    assert " CMD " in f" {check} ", check
    assert re.search(r"http://(127\.0\.0\.1|localhost):(8080|\$\{OPTIMIZER_PORT[^}]*\})/healthz", check), (
        check
    )


def test_environment_listens_on_all_interfaces_on_the_exposed_port() -> None:
    final = final_stage()
    env = env_values(final)
    assert env.get("OPTIMIZER_HOST") == "0.0.0.0"
    assert env.get("OPTIMIZER_PORT") == "8080"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    exposed = {port.split("/")[0] for i in final.all("EXPOSE") for port in i.args.split()}
    assert env["OPTIMIZER_PORT"] in exposed
    real = {str(spec.metadata["env"]) for spec in setting_fields()}
    unknown = {name for name in env if name.startswith("OPTIMIZER_")} - real
    assert not unknown, f"the Dockerfile sets settings that do not exist: {sorted(unknown)}"


def test_oci_labels() -> None:
    labels: dict[str, str] = {}
    for instruction in final_stage().all("LABEL"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            labels[key] = value
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, ``!`` re-includes, a pattern that matches
    a directory excludes what is inside it, and ``**/`` matches any number of directories."""
    candidates = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        forms = {body, body.removeprefix("**/")} if body.startswith("**/") else {body}
        for candidate in candidates:
            tails = {"/".join(candidate.split("/")[i:]) for i in range(candidate.count("/") + 1)}
            names = tails if body.startswith("**/") else {candidate}
            if any(fnmatch.fnmatchcase(name, form) for name in names for form in forms):
                excluded = not negate
                break
    return excluded


def test_dockerignore_keeps_out_local_state_but_not_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (".venv", ".venv/bin/python", ".git", ".git/HEAD", "tests/test_api.py", "bench-results/x"):
        assert _dockerignore_excludes(patterns, path), f".dockerignore lets {path} into the build context"
    assert _dockerignore_excludes(patterns, "optimizer/__pycache__/app.cpython-311.pyc")
    for instruction in (i for stage in dockerfile_stages() for i in stage.all("COPY")):
        words = instruction.args.split()
        if words[0].startswith("--from="):
            continue
        for source in words[:-1]:
            assert not _dockerignore_excludes(patterns, source), f"COPY {source} is excluded"
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    assert not _dockerignore_excludes(patterns, "optimizer/app.py")


# --- Pinned runtime requirements -----------------------------------------------------------------------


def pinned_requirements(path: Path = REQUIREMENTS) -> dict[NormalizedName, Version]:
    pins: dict[NormalizedName, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1, f"{line}: pin exactly one version"
        assert specifiers[0].operator == "==", f"{line}: pin with =="
        assert requirement.marker is None and not requirement.extras, f"{line}: no markers or extras"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def test_vips_pins_satisfy_the_extra_and_add_to_the_base_set() -> None:
    base, extra = pinned_requirements(), pinned_requirements(VIPS_REQUIREMENTS)
    assert not base.keys() & extra.keys(), "a package is pinned in both requirement files"
    for text in tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["vips"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in extra, f"{requirement.name} (the vips extra) is not pinned in {VIPS_REQUIREMENTS.name}"
        assert requirement.specifier.contains(extra[name], prereleases=True), (
            f"{name}=={extra[name]} vs {text}"
        )


def test_the_resizer_build_argument_picks_the_venv_and_sets_the_engine() -> None:
    stages = dockerfile_stages()
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG RESIZER=pillow$", text, re.MULTILINE), "the default image uses Pillow's resize"
    names = {s.name for s in stages}
    assert {"build-pillow", "build-vips"} <= names
    # FROM build-${RESIZER} AS venv, with the default substituted
    assert any(s.name == "venv" and s.base == "build-pillow" for s in stages)
    copies = [i.args for i in final_stage().all("COPY")]
    assert "--from=venv /opt/venv /opt/venv" in copies
    assert env_values(final_stage()).get("OPTIMIZER_RESIZER") == "${RESIZER}"
    # Without its own ARG the final stage would expand ${RESIZER} to "" and the service refuse to start.
    assert any(i.args.split("=")[0].strip() == "RESIZER" for i in final_stage().all("ARG"))
    vips_stage = next(s for s in stages if s.name == "build-vips")
    sources = [word for i in vips_stage.all("COPY") for word in i.args.split()[:-1]]
    assert str(VIPS_REQUIREMENTS.relative_to(ROOT)) in sources
    assert str(VIPS_BUILD_REQUIREMENTS.relative_to(ROOT)) in sources
    runs = " ".join(i.args for i in vips_stage.all("RUN"))
    assert "--only-binary=:all:" in runs and "--no-binary=pyvips" in runs  # only the pure-Python one built
    # built with the pinned build requirements, not with whatever build isolation would fetch
    assert "--no-build-isolation" in runs and "-r /tmp/container-vips-build.txt" in runs
    assert "Settings(resizer='vips')" in runs  # libvips is loaded once at build time


def _applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(IMAGE_MARKERS)


def test_pins_cover_and_satisfy_pyproject_dependencies() -> None:
    pins = pinned_requirements()
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert dependencies, "pyproject.toml declares no runtime dependencies"
    for text in dependencies:
        requirement = Requirement(text)
        if not _applies(requirement):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} (a runtime dependency) is not pinned in {REQUIREMENTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy pyproject.toml's {text!r}"
        )


def test_marker_environment_is_the_image() -> None:
    assert Marker('python_version < "3.13"').evaluate(IMAGE_MARKERS)
    assert not Marker('python_version < "3.11"').evaluate(IMAGE_MARKERS)


# --- Wheels for the image's platform (needs a package index) --------------------------------------------

# Phrases pip and urllib3 print when no index can be reached at all (as opposed to a missing version).
_CONNECTION_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No route to host",
    "Connection refused",
    "ProxyError",
    "Could not fetch URL",
    "Max retries exceeded",
)
DOWNLOAD_TIMEOUT = 50.0


def download_for_image(requirements: Path, target: Path, *extra: str) -> list[Path]:
    """The pinned set, downloaded as pip would pick it for the image; skips when no index is reachable."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--platform", IMAGE_PLATFORM, "--python-version", IMAGE_PYTHON,
        "--implementation", "cp", "--abi", "cp" + IMAGE_PYTHON.replace(".", ""),
        "--timeout", "15", "--retries", "1", "--disable-pip-version-check", "--no-input",
        *extra, "-r", str(requirements), "-d", str(target),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download got no answer from the package index within {DOWNLOAD_TIMEOUT:.0f} s")
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if "No module named pip" in output:
            pytest.skip(f"{sys.executable} has no pip")
        reached = [line.strip() for line in output.splitlines() if any(e in line for e in _CONNECTION_ERRORS)]
        if reached:
            pytest.skip(f"no package index is reachable: {reached[-1][:200]}")
        pytest.fail(f"pip could not resolve {requirements.name} for {IMAGE_PLATFORM}:\n{output[-4000:]}")
    return sorted(target.iterdir())


@pytest.fixture(scope="module")
def image_wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return download_for_image(
        REQUIREMENTS, tmp_path_factory.mktemp("container-wheels"), "--only-binary=:all:"
    )


@pytest.fixture(scope="module")
def vips_distributions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The vips engine's pins as the image's build stage gets them: wheels, and pyvips's source archive."""
    return download_for_image(
        VIPS_REQUIREMENTS,
        tmp_path_factory.mktemp("container-vips"),
        "--only-binary=:all:",
        "--no-binary=" + ",".join(sorted(SOURCE_ONLY)),
    )


@pytest.mark.slow
def test_pins_resolve_to_musllinux_or_pure_python_wheels(image_wheels: list[Path]) -> None:
    pins = pinned_requirements()
    found: dict[NormalizedName, Version] = {}
    for path in image_wheels:
        assert path.suffix == ".whl", f"{path.name} is not a wheel"
        name, version, _, tags = parse_wheel_filename(path.name)
        platforms = {tag.platform for tag in tags}
        assert any(p == "any" or (p.startswith("musllinux_") and p.endswith("_x86_64")) for p in platforms), (
            f"{path.name} is not for musl: {sorted(platforms)}"
        )
        assert any(tag.interpreter in ("py3", "py311", "cp311") or tag.abi == "abi3" for tag in tags), (
            f"{path.name} is not for CPython {IMAGE_PYTHON}"
        )
        found[name] = version
    assert found == pins, "pip downloaded a different set than the pins"


def _wheel_requirements(path: Path) -> list[Requirement]:
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as archive:
            member = next(
                m for m in archive.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")
            )
            handle = archive.extractfile(member)
            assert handle is not None
            lines = handle.read().decode().splitlines()
    else:
        with zipfile.ZipFile(path) as wheel:
            metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
            lines = wheel.read(metadata).decode().splitlines()
    return [Requirement(line.partition(":")[2]) for line in lines if line.startswith("Requires-Dist:")]


@pytest.mark.slow
def test_vips_pins_resolve_for_the_image_and_close_over_both_sets(vips_distributions: list[Path]) -> None:
    pins = pinned_requirements() | pinned_requirements(VIPS_REQUIREMENTS)
    found: dict[NormalizedName, Version] = {}
    for path in vips_distributions:
        if path.name.endswith(".tar.gz"):
            name = canonicalize_name(path.name.removesuffix(".tar.gz").rpartition("-")[0])
            assert name in SOURCE_ONLY, f"{path.name}: only {sorted(SOURCE_ONLY)} may come as source"
            found[name] = Version(path.name.removesuffix(".tar.gz").rpartition("-")[2])
        else:
            name, version, _, tags = parse_wheel_filename(path.name)
            platforms = {tag.platform for tag in tags}
            assert any(
                p == "any" or (p.startswith("musllinux_") and p.endswith("_x86_64")) for p in platforms
            )
            found[name] = version
        for requirement in filter(_applies, _wheel_requirements(path)):
            needed = canonicalize_name(requirement.name)
            assert needed in pins, f"{path.name} needs {requirement}, which is not pinned"
            assert requirement.specifier.contains(pins[needed], prereleases=True), (path.name, requirement)
    assert found == pinned_requirements(VIPS_REQUIREMENTS)


def test_vips_build_pins_agree_with_the_engines_pins() -> None:
    build, engine = pinned_requirements(VIPS_BUILD_REQUIREMENTS), pinned_requirements(VIPS_REQUIREMENTS)
    for name in build.keys() & engine.keys():  # cffi, pycparser: one version in the build and the image
        assert build[name] == engine[name], f"{name}: {build[name]} to build, {engine[name]} in the image"


@pytest.mark.slow
def test_vips_build_pins_cover_the_source_archives_build_requirements(
    vips_distributions: list[Path], tmp_path: Path
) -> None:
    archive = next(path for path in vips_distributions if path.name.endswith(".tar.gz"))
    with tarfile.open(archive) as contents:
        member = next(
            m for m in contents.getmembers() if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml")
        )
        handle = contents.extractfile(member)
        assert handle is not None
        needed = tomllib.loads(handle.read().decode())["build-system"]["requires"]
    pins = pinned_requirements(VIPS_BUILD_REQUIREMENTS)
    for text in needed:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{archive.name} builds with {text}, which is not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, str(pins[name]))
    # and they install in the image as wheels (the stage uses --only-binary=:all: for them)
    wheels = download_for_image(VIPS_BUILD_REQUIREMENTS, tmp_path, "--only-binary=:all:")
    assert {parse_wheel_filename(path.name)[0] for path in wheels} == pins.keys()


@pytest.mark.slow
def test_pins_are_closed_under_the_wheels_dependencies(image_wheels: list[Path]) -> None:
    pins = pinned_requirements()
    for path in image_wheels:
        for requirement in filter(_applies, _wheel_requirements(path)):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{path.name} needs {requirement}, which is not pinned"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{path.name} needs {requirement}, but {name}=={pins[name]} is pinned"
            )


# --- Image size estimate ---------------------------------------------------------------------------------

MB = 1_000_000
# python:3.11-alpine (linux/amd64), uncompressed, as `docker image ls` reports it: about 55-60 MB for the
# recent Alpine releases (Alpine ~8 MB, its runtime libraries ~10 MB, CPython 3.11 with its standard
# library ~33 MB, pip + setuptools + wheel ~15 MB; the image keeps no .pyc files); Docker Hub lists the
# compressed download at roughly 19-20 MB. These are published figures as remembered and a sum of
# components, NOT measured here (there is no Docker engine): the upper end is used.
BASE_IMAGE_BYTES = 60 * MB
BASE_IMAGE_COMPRESSED_BYTES = 20 * MB
# `apk add tini` (a ~40 KB binary) and the user/group entries.
TINI_AND_USER_BYTES = 100_000
SIZE_GOAL_BYTES = 80 * MB
SIZE_BOUND_BYTES = 120 * MB  # generous: catches a wrong base or a dependency explosion, not drift


def _pyc(source: bytes, filename: str) -> bytes:
    """The .pyc pip writes for a source file (a 16-byte header and the marshalled code), or nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning for an invalid escape in a dependency
        try:
            code = compile(source, filename, "exec", dont_inherit=True)
        except SyntaxError:
            return b""  # pip skips files it cannot compile
    return bytes(16) + marshal.dumps(code)


@pytest.mark.slow
def test_image_size_estimate(image_wheels: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    installed = compressed = pyc = 0
    for path in image_wheels:
        compressed += path.stat().st_size
        with zipfile.ZipFile(path) as wheel:
            for entry in wheel.infolist():
                installed += entry.file_size
                if entry.filename.endswith(".py"):
                    code = _pyc(wheel.read(entry), entry.filename)
                    pyc += len(code)
                    compressed += len(zlib.compress(code))
    project = 0
    for source in (ROOT / "optimizer").rglob("*.py"):
        data = source.read_bytes()
        code = _pyc(data, str(source))
        project += len(data) + len(code)
        compressed += len(zlib.compress(data)) + len(zlib.compress(code))
    total = BASE_IMAGE_BYTES + installed + pyc + project + TINI_AND_USER_BYTES
    rows = [
        ("python:3.11-alpine base (documented figure, not measured)", BASE_IMAGE_BYTES),
        (f"{len(image_wheels)} dependency wheels, installed (zip entries' sizes)", installed),
        ("their .pyc files, compiled at build time (measured by compiling)", pyc),
        ("the optimizer package and its .pyc files", project),
        ("tini and the service user", TINI_AND_USER_BYTES),
    ]
    verdict = "within" if total <= SIZE_GOAL_BYTES else "OVER"
    with capsys.disabled():
        print("\nEstimated size of the Dockerfile.alpine image (uncompressed):")
        for label, size in rows:
            print(f"  {size / MB:7.1f} MB  {label}")
        print(f"  {total / MB:7.1f} MB  total: {verdict} the {SIZE_GOAL_BYTES / MB:.0f} MB goal")
        download = BASE_IMAGE_COMPRESSED_BYTES + compressed
        print(
            f"  ~{download / MB:.0f} MB to pull, compressed (base ~{BASE_IMAGE_COMPRESSED_BYTES / MB:.0f} MB"
            f" + the wheels as downloaded + the .pyc files deflated)"
        )
    assert total < SIZE_BOUND_BYTES, f"the image would be about {total / MB:.0f} MB"
