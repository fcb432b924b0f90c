"""The deployment kit in deploy/: every file parses, has the keys its tool needs, and every
`featx` command line in it names a real command and real options. Nothing is started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
import yaml

from featx.cli import app

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
YAMLS = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
SHARED = "/mnt/featx"  # the shared volume's path on every node

# `featx <command>` or `python -m featx.cli <command>` where a command can start: not part of
# a path, an image name (featx:gpu) or a module name (featx.cli without -m).
INVOCATION = re.compile(
    r"(?:(?<![\w./:=-])featx|python3?\s+-m\s+featx\.cli)[ \t]+([a-z][a-z0-9-]*)(?![\w.:/])"
)
LONG_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
END_OF_COMMAND = re.compile(r"&&|\|\||;|\||`|\n")


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(path: Path, kind: str) -> dict:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def cli_options() -> dict[str, set[str]]:
    """Command name -> every option spelling it accepts (e.g. --gpu and --no-gpu)."""
    group = typer.main.get_command(app)
    options = {}
    for name, command in group.commands.items():
        names = {"--help"}
        for param in command.params:
            names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
        options[name] = names
    return options


def strings(node) -> list[str]:
    """Every string value in a parsed YAML document (entrypoints, commands, ...)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def markdown_code(text: str) -> list[str]:
    """Fenced code blocks and inline code spans: where a README shows commands."""
    fenced = re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, flags=re.M | re.S)
    prose = re.sub(r"^[ \t]*```[^\n]*\n.*?^[ \t]*```", "", text, flags=re.M | re.S)
    return fenced + re.findall(r"`([^`\n]+)`", prose)


def invocations(snippets: list[str]) -> list[tuple[str, list[str], str]]:
    """(command, long options, the command line) for every featx invocation in the snippets."""
    found = []
    for snippet in snippets:
        text = re.sub(r"(?m)(^|\s)#.*$", "", snippet)  # shell comments are prose
        text = re.sub(r"\\\n\s*", " ", text)  # join shell line continuations
        for m in INVOCATION.finditer(text):
            rest = text[m.end() :]
            end = END_OF_COMMAND.search(rest)
            args = rest[: end.start()] if end else rest
            found.append((m.group(1), LONG_OPTION.findall(args), (m.group(0) + args).strip()))
    return found


def deploy_invocations() -> dict[str, list[tuple[str, list[str], str]]]:
    found = {"README.md": invocations(markdown_code((DEPLOY / "README.md").read_text()))}
    for path in YAMLS:
        found[path.name] = invocations([s for d in load_all(path) for s in strings(d)])
    return found


def test_every_yaml_parses():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAMLS}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "cluster-aws.yaml"} <= names
    for path in YAMLS:
        assert load_all(path), f"{path} is empty"


def check_cluster_spec(spec: dict, where: str) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: head rayStartParams"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    pods = [("head", head["template"]["spec"])]
    for g in groups:
        assert isinstance(g["rayStartParams"], dict), f"{where}: {g['groupName']} rayStartParams"
        pods.append((g["groupName"], g["template"]["spec"]))
    for name, pod in pods:
        for c in pod["containers"]:
            assert c.get("image"), f"{where}: container {c['name']} of {name} has no image"
            gpus = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            assert not (name == "head" and gpus), f"{where}: the head asks for a GPU"
        # The shared volume is at the same path in every pod: featx passes plain paths.
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {
            m["mountPath"]
            for c in pod["containers"]
            for m in c.get("volumeMounts", [])
            if m["name"] in claims
        }
        assert mounts == {SHARED}, f"{where}: {name} mounts the shared volume at {mounts}"
    limits = [c["resources"]["limits"] for _, pod in pods[1:] for c in pod["containers"]]
    assert any("nvidia.com/gpu" in lim for lim in limits), f"{where}: no GPU worker group"


def test_raycluster():
    rc = by_kind(DEPLOY / "kuberay/raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    check_cluster_spec(rc["spec"], "raycluster.yaml")
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert rc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_rayjob():
    job = by_kind(DEPLOY / "kuberay/rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "featx train" in spec["entrypoint"] and "featx extract" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True, "the Ray cluster must go when the job ends"
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))  # a YAML string inside the YAML
    check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec["rayClusterSpec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    # Outputs go to the shared volume, or the workers' results land on pods that vanish.
    for _, _, line in invocations([spec["entrypoint"]]):
        for path in re.findall(r"--(?:out|checkpoint)\s+(\S+)", line):
            assert path.startswith(SHARED + "/"), f"{line}: {path} is not on the shared volume"


def test_ray_versions_match_the_image():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, flags=re.M).group(1)
    rc = by_kind(DEPLOY / "kuberay/raycluster.yaml", "RayCluster")
    job = by_kind(DEPLOY / "kuberay/rayjob.yaml", "RayJob")
    assert rc["spec"]["rayVersion"] == version, "raycluster.yaml rayVersion != Dockerfile's Ray"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version, "rayjob.yaml rayVersion"
    assert f"ray[default]=={version}" in (DEPLOY / "cluster-aws.yaml").read_text()


def test_cluster_launcher():
    cfg = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types, (
        f"head_node_type {cfg['head_node_type']} not in {list(types)}"
    )
    assert isinstance(cfg["max_workers"], int) and cfg["max_workers"] >= 1
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert cfg["docker"]["image"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def test_dockerfile():
    lines = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("FROM "))
    base_args = {ln.split()[1].split("=")[0] for ln in lines[:first] if ln.startswith("ARG ")}
    arg = re.fullmatch(r"FROM \$\{?(\w+)\}?(?: AS \w+)?", lines[first], flags=re.I)
    assert arg and arg.group(1) in base_args, f"FROM should use an ARG base: {lines[first]}"
    torch = next(i for i, ln in enumerate(lines) if "pip install" in ln and "TORCH_SPEC" in ln)
    package = next(i for i, ln in enumerate(lines) if re.search(r"pip install.*/opt/featx", ln))
    assert torch < package, "torch must be installed before featx (it pins the build)"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"runs as root: USER {users}"


def test_featx_command_lines_match_the_cli():
    options = cli_options()
    found = deploy_invocations()
    assert len(found["README.md"]) >= 5 and found["rayjob.yaml"], "no featx command lines found"
    problems = []
    for where, calls in found.items():
        for command, opts, line in calls:
            if command not in options:
                problems.append(f"{where}: `{line}`: no command {command!r}")
                continue
            problems += [
                f"{where}: `{line}`: featx {command} has no option {o}"
                for o in opts
                if o not in options[command]
            ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "featx train d --out r --gpu && featx extract d -c r --out f",
            [("train", ["--out", "--gpu"]), ("extract", ["--out"])],
        ),
        ("docker run featx:gpu featx demo --out /x  # the featx user", [("demo", ["--out"])]),
        ("python -m featx.cli probe f --no-baseline", [("probe", ["--no-baseline"])]),
        ("prefect work-pool create featx --type process", []),
        ("pip install -e /opt/featx", []),
        ("ray job submit -- \\\n  featx ingest a b --workers 4", [("ingest", ["--workers"])]),
    ],
)
def test_invocation_parser(text, expected):
    assert [(c, o) for c, o, _ in invocations([text])] == expected


def test_dashboard_not_public_without_opt_in():
    """0.0.0.0 anywhere in deploy/ needs an opt-in comment on its line or in the comment block
    right above it."""
    problems = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if "0.0.0.0" not in line:
                continue
            block = [line]
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#"):
                block.append(lines[j])
                j -= 1
            if not any("opt-in" in b.lower() for b in block):
                problems.append(f"{path.relative_to(DEPLOY)}:{i + 1}: {line.strip()}")
    assert not problems, "bound to all interfaces without an opt-in comment:\n" + "\n".join(
        problems
    )
