"""requirements.lock and infra/Dockerfile: the image installs what pyproject.toml asks for, from a fresh lock.

A dependency added to pyproject.toml without `make lock`, a version range the lock falls outside of, or a
Dockerfile that copies the code before it installs the lock (so that every code change reinstalls every
dependency) fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
DOCKERFILE = REPO / "infra" / "Dockerfile"
#: The extras of pyproject.toml the image installs (`make lock`: --extra orchestration).
IMAGE_EXTRAS = ("orchestration",)
#: The interpreter the lock is resolved for (`make lock`: --python-version 3.11, x86_64 Linux).
IMAGE_ENVIRONMENT: dict[str, str] = {
    **{key: str(value) for key, value in default_environment().items()},
    "python_version": "3.11",
    "sys_platform": "linux",
    "platform_system": "Linux",
}


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        declared += project["optional-dependencies"][extra]
    requirements = [Requirement(line) for line in declared]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(IMAGE_ENVIRONMENT)]


def _lock() -> dict[str, tuple[str, list[str]]]:
    """Package -> (pinned version, the packages it is there for: uv's ``# via`` lines)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(" "):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
            assert match, f"requirements.lock: not a plain `name==version` pin: {line!r}"
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), [])
            continue
        via = re.sub(r"^\s*#\s*(via)?\s*", "", line)
        if via and current is not None:
            pins[current][1].append(canonicalize_name(via.split()[0]))
    return pins


def test_every_dependency_of_pyproject_is_pinned_in_the_lock_within_its_range() -> None:
    pins = _lock()
    problems = []
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement}: missing (run `make lock`)")
        elif not requirement.specifier.contains(Version(pins[name][0]), prereleases=True):
            problems.append(f"{requirement}: the lock pins {pins[name][0]} (run `make lock`)")
    assert problems == []


def test_the_extras_of_dependencies_are_in_the_lock_too() -> None:
    """``dvc[s3]`` is dvc plus dvc-s3: the packages of each requested extra must be pinned as well."""
    pins = _lock()
    missing = []
    for requirement in _pyproject_requirements():
        for extra in requirement.extras:
            for needed in metadata.requires(requirement.name) or []:
                dependency = Requirement(needed)
                marker = dependency.marker
                only_with_extra = (
                    marker is not None
                    and marker.evaluate({**IMAGE_ENVIRONMENT, "extra": extra})
                    and not marker.evaluate({**IMAGE_ENVIRONMENT, "extra": ""})
                )
                if only_with_extra and canonicalize_name(dependency.name) not in pins:
                    missing.append(f"{requirement.name}[{extra}] needs {dependency.name}")
    assert missing == []


def test_the_lock_pins_everything_for_the_image_and_says_how_to_remake_it() -> None:
    pins = _lock()
    assert len(pins) > 100  # the whole closure, not only the direct dependencies
    assert "make lock" in LOCK.read_text().splitlines()[1]
    assert "bonetumor" not in pins  # the project itself is installed from src/, not from the lock
    for name in ("dvc-s3", "boto3", "psycopg2-binary", "kfp-kubernetes", "torch", "torchvision"):
        assert name in pins, name
    assert "+" not in pins["torch"][0]  # the public version: the cpu variant installs its +cpu build


def test_the_image_can_run_the_mlflow_basic_auth_server() -> None:
    # `mlflow server --app-name basic-auth` (infra/k8s/base/mlflow) imports Flask-WTF: mlflow[auth].
    assert "flask-wtf" in _lock()


# --- infra/Dockerfile ---


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    ]


def _index(instructions: list[tuple[str, str]], keyword: str, pattern: str) -> int:
    for index, (word, arguments) in enumerate(instructions):
        if word == keyword and re.search(pattern, arguments):
            return index
    raise AssertionError(f"infra/Dockerfile has no {keyword} matching {pattern!r}")


def test_the_dockerfile_installs_the_lock_before_it_copies_the_code() -> None:
    instructions = _instructions()
    copy_lock = _index(instructions, "COPY", r"\brequirements\.lock\b")
    install_lock = _index(instructions, "RUN", r"pip install .*-r /tmp/requirements\.txt")
    copy_src = _index(instructions, "COPY", r"(^|\s)\.?/?src\b")
    install_project = _index(instructions, "RUN", r"pip install --no-deps \.")

    assert copy_lock < install_lock < copy_src < install_project
    # Nothing else of the repository is copied before the dependencies are installed: only the lock.
    copies_before = [args for word, args in instructions[:install_lock] if word in {"COPY", "ADD"}]
    assert copies_before == ["requirements.lock ./"]
    # The install reads the lock (through the variant's filtered copy), and nothing but it.
    assert "requirements.lock" in instructions[install_lock][1]
    assert not re.search(r"pip install[^;&]*\s\.(\[|\s|$)", instructions[install_lock][1])


def test_the_commit_argument_comes_after_the_dependency_layers() -> None:
    """Every RUN after an ARG sees it: declared early, each new commit would reinstall all dependencies."""
    instructions = _instructions()
    assert _index(instructions, "ARG", r"^GIT_COMMIT\b") > _index(instructions, "RUN", r"pip install --no-deps \.")


def test_the_dockerfile_has_cpu_and_cuda_variants() -> None:
    instructions = _instructions()
    assert instructions[_index(instructions, "ARG", r"^VARIANT=")][1] == "VARIANT=cpu"
    install = instructions[_index(instructions, "RUN", r"pip install .*-r /tmp/requirements\.txt")][1]
    assert re.search(r"\bcpu\)", install)
    assert re.search(r"\bcuda\)", install)
    assert '--index-url "${TORCH_INDEX}"' in install
    assert "download.pytorch.org/whl/cpu" in instructions[_index(instructions, "ARG", r"^TORCH_INDEX=")][1]


def _torch_cuda_only_pattern() -> re.Pattern[str]:
    instructions = _instructions()
    argument = instructions[_index(instructions, "ARG", r"^TORCH_CUDA_ONLY=")][1]
    return re.compile(shlex.split(argument.split("=", 1)[1])[0])


def _cuda_build_requirements() -> set[str]:
    """What PyPI's (CUDA) torch needs beyond its CPU build: its requirements for Linux only (torch's metadata)."""
    torch = metadata.distribution("torch")
    if "+" in torch.version:
        pytest.skip(f"the installed torch is {torch.version}, whose metadata lists no CUDA runtime to compare with")
    requirements = [Requirement(line) for line in torch.requires or []]
    return {
        canonicalize_name(r.name)
        for r in requirements
        if r.marker and re.search(r"platform_system|sys_platform|platform_machine", str(r.marker))
    }


def test_the_cpu_variant_drops_exactly_the_cuda_runtime_of_torch() -> None:
    """TORCH_CUDA_ONLY (grep -vE) must match the lock's packages that are there for torch's CUDA build alone.

    Too few: the CPU image carries gigabytes of CUDA runtime; too many: it lacks a package something else needs.
    """
    pins = _lock()
    cuda_only = _cuda_build_requirements() & pins.keys()
    changed = True
    while changed:  # and what only those need (cuda-toolkit's nvidia-* libraries, ...)
        changed = False
        for name, (_, via) in pins.items():
            if name not in cuda_only and via and set(via) <= cuda_only:
                cuda_only.add(name)
                changed = True
    pattern = _torch_cuda_only_pattern()

    dropped = {name for name, (version, _) in pins.items() if pattern.match(f"{name}=={version}")}
    assert cuda_only, "no CUDA runtime packages in the lock: is torch pinned from PyPI?"
    assert dropped == cuda_only


def test_the_image_runs_the_service_as_a_non_root_user() -> None:
    instructions = _instructions()
    users = [arguments for word, arguments in instructions if word == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert users[-1] == "1000"  # numeric: Kubernetes' runAsNonRoot can verify it (infra/k8s runs uid 1000)
    healthcheck = instructions[_index(instructions, "HEALTHCHECK", r".")][1]
    assert "/readyz" in healthcheck
    command = json.loads(instructions[_index(instructions, "CMD", r".")][1])
    assert command == [
        "bentoml",
        "serve",
        "service:BoneTumorClassifier",
        "--working-dir",
        "/app/serving",
        "--host",
        "0.0.0.0",  # noqa: S104 (the container's port, published by Docker or a Service)
        "--port",
        "3000",
    ]


def test_make_lock_compiles_pyproject_with_the_image_extras() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe, "the Makefile has no `lock` target"
    command = re.sub(r"\\\n\s*", " ", recipe.group(1))
    assert "uv pip compile pyproject.toml" in command
    assert all(f"--extra {extra}" in command for extra in IMAGE_EXTRAS)
    assert "--python-version 3.11" in command
    assert "-o requirements.lock" in command
    assert re.search(r"^\.PHONY:.*\block\b", makefile, flags=re.MULTILINE)
