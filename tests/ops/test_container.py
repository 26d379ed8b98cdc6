"""The container image (conf/Containerfile) and the Kubernetes manifests (conf/deploy/).

No container engine runs here, so the image is checked through what it is made of: the
Containerfile is parsed; its builder stage's COPY and RUN steps are carried out in a temporary
directory standing for the image's root (every absolute path of the file moved under it); and
the final stage's ENTRYPOINT + CMD run from the virtual environment that made, with the
deployment's own configuration adapted to a machine without a cluster. The manifests are
parsed and checked against each other, the Containerfile, conf/kube/rbac.yaml and the hub's
own configuration parser.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trio_cloudhub.config import Config, parse_config

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "conf" / "Containerfile"
DEPLOY = REPO / "conf" / "deploy"
KUBE = REPO / "conf" / "kube"
CONFIG_PATH = "/etc/kubeedge/config/cloudcore.yaml"
EXPECTED_PORTS = {(10000, "TCP"), (10001, "UDP"), (10002, "TCP")}


# --- a small Containerfile parser ---------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    text: str  # everything after the keyword and its --flags, continuations joined
    flags: dict[str, str] = field(default_factory=dict)

    def exec_form(self) -> list[str]:
        """CMD/ENTRYPOINT/RUN as an argument vector (the shell form runs under /bin/sh -c)."""
        if self.text.startswith("["):
            value = json.loads(self.text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
            return value
        return ["/bin/sh", "-c", self.text]

    def words(self) -> list[str]:
        return shlex.split(self.text)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def logical_lines(text: str) -> Iterator[str]:
    """Lines with `\\` continuations joined; comment and blank lines dropped (also inside a
    continuation, as Docker and Buildah do)."""
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        yield " ".join(pending)
        pending = []
    assert not pending, "the Containerfile ends inside a line continuation"


def parse_containerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"FROM {rest!r}"
            stages.append(Stage(image=words[0], name=name))
            continue
        assert stages, f"{keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, rest, flags))
    return stages


def env_pairs(instruction: Instruction, before: dict[str, str]) -> dict[str, str]:
    """`ENV A=1 B=$A:x` (key=value form), `$VAR`/`${VAR}` expanded from what was set before."""
    result = dict(before)
    for word in instruction.words():
        key, eq, value = word.partition("=")
        assert eq, f"ENV {instruction.text!r}: use the key=value form"
        result[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: result.get(m.group(1), ""), value)
    return result


def printed_files(instruction: Instruction) -> dict[str, str]:
    """Files a RUN writes with `printf '%s\\n' LINE... > PATH`: path -> content."""
    words = shlex.split(instruction.text)
    files: dict[str, str] = {}
    for index, word in enumerate(words):
        if word != "printf" or words[index + 1] != "%s\\n":
            continue
        end = words.index(">", index)
        files[words[end + 1]] = "".join(line + "\n" for line in words[index + 2 : end])
    return files


def containerfile() -> list[Stage]:
    return parse_containerfile(CONTAINERFILE.read_text())


def exposed(stage: Stage) -> list[tuple[int, str]]:
    ports = []
    for instruction in stage.all("EXPOSE"):
        for word in instruction.words():
            number, _, protocol = word.partition("/")
            ports.append((int(number), (protocol or "tcp").upper()))
    return sorted(ports)


def image_user(stage: Stage) -> str:
    user = stage.last("USER")
    assert user is not None, "the final stage sets no USER: it would run as root"
    return user.text.split(":")[0]


def image_config(stage: Stage) -> str:
    files: dict[str, str] = {}
    for run in stage.all("RUN"):
        files.update(printed_files(run))
    assert CONFIG_PATH in files, f"the image has no default {CONFIG_PATH}"
    return files[CONFIG_PATH]


# --- the Containerfile ---------------------------------------------------------------------


def test_containerfile_shape() -> None:
    stages = containerfile()
    assert len(stages) >= 2, "multi-stage: the build tools stay in the builder"
    builder, final = stages[0], stages[-1]
    assert builder.name, "the builder stage is named (COPY --from=<name>)"
    assert final.name is None or final.name != builder.name
    # The venv's python is a link to the base image's interpreter: same base in both.
    assert builder.image == final.image
    assert final.image.startswith("python:3.11")
    copies = [c for c in final.all("COPY") if c.flags.get("from") == builder.name]
    assert [c.words() for c in copies] == [["/opt/venv", "/opt/venv"]]

    user = image_user(final)
    assert user.isdigit(), "a numeric USER, so that Kubernetes' runAsNonRoot can check it"
    assert int(user) != 0

    assert exposed(final) == sorted(EXPECTED_PORTS)
    assert len(final.all("EXPOSE")) == 1

    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert entrypoint.text.startswith("[") and cmd.text.startswith("["), "exec (JSON) form"
    argv = entrypoint.exec_form() + cmd.exec_form()
    assert argv[0] == "/opt/venv/bin/trio-cloudhub"
    command = [Path(argv[0]).name, *argv[1:]]
    assert command == ["trio-cloudhub", "serve", "--config", CONFIG_PATH]
    scripts = _pyproject()["project"]["scripts"]
    assert "trio-cloudhub" in scripts

    # The builder installs the wheel with both extras the hub needs in a cluster.
    builder_runs = " ".join(r.text for r in builder.all("RUN"))
    assert "[kube,quic]" in builder_runs
    assert "python -m venv /opt/venv" in builder_runs


def test_containerfile_bakes_in_no_secrets() -> None:
    for stage in containerfile():
        for instruction in stage.instructions:
            if instruction.keyword in ("ENV", "ARG"):
                names = [w.partition("=")[0].upper() for w in instruction.words()]
                assert not [n for n in names if re.search("SECRET|TOKEN|PASSWORD|KEY", n)]
            if instruction.keyword in ("COPY", "ADD") and "from" not in instruction.flags:
                for source in instruction.words()[:-1]:
                    assert not re.search(r"\.(key|pem|crt)$|pki|kube/config", source), source
                    assert (REPO / source).exists(), f"COPY {source}: not in the build context"


def test_image_default_config() -> None:
    """Without a mounted config the image serves from its own: a data dir its user owns."""
    final = containerfile()[-1]
    config = parse_config(image_config(final), CONFIG_PATH)
    data_dir = config.trio_cloud_hub.data_dir
    assert data_dir == "/var/lib/trio-cloudhub"
    assert not config.cloud_hub.unixsocket.enable
    assert _listener_ports(config) == EXPECTED_PORTS
    runs = " && ".join(r.text for r in final.all("RUN"))
    user = image_user(final)
    assert re.search(rf"chown (-R )?{user}(:\d+)? {re.escape(data_dir)}( |$)", runs)
    assert f"mkdir -p {data_dir}" in runs


# --- the entrypoint from a clean virtual environment -------------------------------------


_ABSOLUTE = re.compile(r"(?<![\w./$-])/(?=\w)")


def _rebase(text: str, root: Path) -> str:
    """Every absolute path in `text` moved under `root` (the stand-in for the image's /)."""
    assert "://" not in text, "URLs would be rebased too"
    return _ABSOLUTE.sub(lambda _: f"{root}/", text)


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _run_stage_build(stage: Stage, root: Path, env: dict[str, str]) -> None:
    """COPY (from the build context, this checkout), WORKDIR and RUN of a stage, in `root`."""
    workdir = root
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = Path(_rebase(instruction.text, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            assert "from" not in instruction.flags
            *sources, dest = instruction.words()
            target = Path(_rebase(dest, root)) if dest.startswith("/") else workdir / dest
            into_dir = dest.endswith("/") or len(sources) > 1
            for source in map(REPO.joinpath, sources):
                # As COPY does: a folder's contents go into the target.
                _copy(source, target / source.name if into_dir and source.is_file() else target)
        elif instruction.keyword == "RUN":
            command = _rebase(instruction.text, root)
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert done.returncode == 0, f"RUN {command}\n{done.stdout}\n{done.stderr[-5000:]}"
        elif instruction.keyword == "ENV":
            env.update(env_pairs(instruction, env))


def _adapted_deploy_config(root: Path) -> str:
    """The ConfigMap's cloudcore.yaml for this machine: no cluster, free loopback ports."""
    raw = yaml.safe_load(_configmap()["data"]["cloudcore.yaml"])
    hub = raw["modules"]["cloudHub"]
    for listener in ("websocket", "quic", "https"):
        hub[listener].update(address="127.0.0.1", port=0)
    hub["advertiseAddress"] = ["127.0.0.1"]
    assert hub["unixsocket"]["enable"] is False
    # KubeEdge's certificate paths, inside the stand-in root: absent, so the hub makes them.
    defaults = Config().cloud_hub
    hub["tlsCAFile"] = _rebase(defaults.tls_ca_file, root)
    hub["tlsCAKeyFile"] = _rebase(defaults.tls_ca_key_file, root)
    hub["tlsCertFile"] = _rebase(defaults.tls_cert_file, root)
    hub["tlsPrivateKeyFile"] = _rebase(defaults.tls_private_key_file, root)
    extra = raw["trioCloudHub"]
    extra["store"] = "local"
    extra["dataDir"] = _rebase(extra["dataDir"], root)
    # Metrics on a free port (other hubs may be running on this machine).
    raw.setdefault("commonConfig", {}).setdefault("monitorServer", {})["bindAddress"] = (
        "127.0.0.1:0"
    )
    text = yaml.safe_dump(raw, sort_keys=False)
    parse_config(text, "adapted cloudcore.yaml")  # fails here, with the reason, if invalid
    return text


def _clean_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
    }
    return env


def _stderr_lines(stream: Any, lines: queue.Queue[str | None], seen: list[str]) -> None:
    for line in stream:
        seen.append(line)
        lines.put(line)
    lines.put(None)


def _get(port: int, path: str) -> tuple[int, bytes]:
    # As the kubelet's HTTPS probes: no certificate verification.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_entrypoint_runs_from_clean_venv(tmp_path: Path) -> None:
    """The Containerfile's entrypoint command runs from a clean virtual environment exactly as
    the image would run it: the builder's steps make the venv, the final stage's user, ENV,
    WORKDIR, ENTRYPOINT and CMD run it with the deployment's configuration."""
    stages = containerfile()
    builder, final = stages[0], stages[-1]
    root = tmp_path / "image"
    assert not re.search(r"\s", str(root))
    root.mkdir()
    # The base image's `python`: this interpreter (the image's is 3.11 too).
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    env = _clean_env()
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"

    started = time.monotonic()
    _run_stage_build(builder, root, dict(env))
    build_seconds = time.monotonic() - started

    venv = root / "opt" / "venv"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    probe = subprocess.run(
        [
            venv / "bin" / "python",
            "-c",
            "import sys, trio_cloudhub, kubernetes, aioquic, trio_asyncio;"
            "print(trio_cloudhub.__file__); print(sys.prefix)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, prefix = probe.stdout.split()
    assert Path(prefix) == venv
    assert Path(module_file).is_relative_to(venv / "lib"), "imported from the venv, not here"

    # The final stage: its directories, its configuration (the deployment's, adapted).
    run_env = dict(env)
    workdir = root
    for instruction in final.instructions:
        if instruction.keyword == "ENV":
            run_env = env_pairs(instruction, run_env)
        elif instruction.keyword == "WORKDIR":
            workdir = Path(_rebase(instruction.text, root))
    run_env["PATH"] = _rebase(run_env["PATH"].split(os.pathsep)[0], root) + os.pathsep + env["PATH"]
    run_env["HOME"] = str(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = root / CONFIG_PATH.lstrip("/")
    config_file.parent.mkdir(parents=True)
    config_file.write_text(_adapted_deploy_config(root))
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    argv = [_rebase(word, root) for word in entrypoint.exec_form() + cmd.exec_form()]
    assert argv[0] == str(venv / "bin" / "trio-cloudhub")

    started = time.monotonic()
    process = subprocess.Popen(
        argv, cwd=workdir, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seen: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_stderr_lines, args=(process.stderr, lines, seen))
    reader.start()
    try:
        serving = None
        deadline = time.monotonic() + 60
        while serving is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no 'serving' line within 60 s:\n" + "".join(seen)) from None
            assert line is not None, "the hub exited before serving:\n" + "".join(seen)
            if re.search(r"\bserving\b", line) and "https" in line:
                serving = line
        start_seconds = time.monotonic() - started
        # "serving: websocket port N, https port M, quic port Q (udp), ..."
        https = re.search(r"https[ _]port[ =:]*(\d+)", serving)
        assert https and re.search(r"quic[ _]port[ =:]*\d+", serving), serving
        https_port = int(https.group(1))
        assert _get(https_port, "/readyz") == (200, b"ok")
        assert _get(https_port, "/livez") == (200, b"ok")
        # The configured data dir (inside the stand-in root) holds what the hub made.
        data_dir = Path(yaml.safe_load(config_file.read_text())["trioCloudHub"]["dataDir"])
        assert (data_dir / "pki").is_dir()

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, "".join(seen)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
    log = "".join(seen)
    assert "Traceback" not in log, log
    print(f"builder steps {build_seconds:.1f} s, start to serving {start_seconds:.1f} s")


# --- the manifests --------------------------------------------------------------------------


def _documents(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(folder.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path
                docs.append(doc)
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"].get("name"))]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _configmap() -> dict[str, Any]:
    return _one(_documents(DEPLOY), "ConfigMap", "cloudcore")


def _listener_ports(config: Config) -> set[tuple[int, str]]:
    hub = config.cloud_hub
    listeners = [(hub.websocket, "TCP"), (hub.quic, "UDP"), (hub.https, "TCP")]
    return {(listener.port, protocol) for listener, protocol in listeners if listener.enable}


def _pyproject() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_deploy_folder_is_only_manifests() -> None:
    """`kubectl apply -f conf/deploy/` applies every .yaml/.yml/.json file there."""
    for path in sorted(DEPLOY.iterdir()):
        if path.suffix not in (".yaml", ".yml", ".json"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] not in ("Kustomization",), path
            assert doc["metadata"]["name"], path
            assert doc["metadata"].get("namespace") == "kubeedge", path


def test_manifests_fit_together() -> None:
    deploy, kube = _documents(DEPLOY), _documents(KUBE)
    final = containerfile()[-1]
    cmd = final.last("CMD")
    assert cmd is not None and cmd.exec_form() == ["serve", "--config", CONFIG_PATH]

    # The service account and its bindings are conf/kube/rbac.yaml's.
    deployment = _one(deploy, "Deployment")
    assert deployment["metadata"]["namespace"] == "kubeedge"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trio-cloudhub"
    account = _one(kube, "ServiceAccount", "trio-cloudhub")
    assert account["metadata"]["namespace"] == "kubeedge"
    subject = {"kind": "ServiceAccount", "name": "trio-cloudhub", "namespace": "kubeedge"}
    assert subject in _one(kube, "ClusterRoleBinding", "trio-cloudhub")["subjects"]
    assert _one(kube, "Namespace", "kubeedge")
    # ... and let the hub keep its ack points in the CRDs of conf/kube/crds.yaml.
    granted = {
        (group, resource)
        for rule in _one(kube, "ClusterRole", "trio-cloudhub")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    for crd in (d for d in kube if d["kind"] == "CustomResourceDefinition"):
        assert (crd["spec"]["group"], crd["spec"]["names"]["plural"]) in granted

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # One container: the image's entrypoint, its command (perhaps with more flags).
    (container,) = pod["containers"]
    assert container["image"]
    assert "command" not in container
    assert container.get("args", cmd.exec_form())[:3] == ["serve", "--config", CONFIG_PATH]
    ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]}
    assert ports == EXPECTED_PORTS
    assert ports == set(exposed(final))
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Probes on the HTTPS port, HTTPS scheme.
    probes = {"readinessProbe": "/readyz", "livenessProbe": "/livez"}
    if "startupProbe" in container:
        probes["startupProbe"] = "/livez"
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert by_name.get(get["port"], get["port"]) == 10002, probe
        assert get["scheme"] == "HTTPS", probe

    # The ConfigMap's configuration: what the hub parses, listening where the pod says.
    configmap = _configmap()
    assert configmap["metadata"]["namespace"] == "kubeedge"
    config = parse_config(configmap["data"]["cloudcore.yaml"], "conf/deploy cloudcore.yaml")
    assert config.store_kind == "kube" and config.trio_cloud_hub.store == "kube"
    assert not config.kube_api_config.kube_config and not config.kube_api_config.master
    assert not config.cloud_hub.unixsocket.enable
    hub = config.cloud_hub
    assert {hub.websocket.address, hub.quic.address, hub.https.address} == {"0.0.0.0"}
    assert _listener_ports(config) == ports

    # Mounted where the image's command reads it.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_mount = mounts["/etc/kubeedge/config"]
    config_volume = volumes[config_mount["name"]]["configMap"]
    assert config_volume["name"] == "cloudcore"
    items = {i["key"]: i["path"] for i in config_volume.get("items", [])} or {
        key: key for key in configmap["data"]
    }
    mounted = {f"/etc/kubeedge/config/{path}" for key, path in items.items()}
    assert CONFIG_PATH in mounted and items["cloudcore.yaml"] == "cloudcore.yaml"

    # Non-root with a read-only root: the data dir is a writable volume.
    pod_security = pod.get("securityContext", {})
    security = {**pod_security, **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert str(security.get("runAsUser", image_user(final))) == image_user(final)
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    data_mount = mounts[config.trio_cloud_hub.data_dir]
    assert "emptyDir" in volumes[data_mount["name"]]
    assert not data_mount.get("readOnly")
    assert container["resources"]["requests"] and container["resources"]["limits"]

    # The Service: the same ports, to this pod; metrics stay inside (127.0.0.1).
    service = _one(deploy, "Service")
    assert service["metadata"]["namespace"] == "kubeedge"
    assert service["spec"]["selector"].items() <= labels.items()
    service_ports = set()
    for port in service["spec"]["ports"]:
        protocol = port.get("protocol", "TCP")
        target = port.get("targetPort", port["port"])
        assert (by_name.get(target, target), protocol) in ports, port
        service_ports.add((port["port"], protocol))
    assert service_ports == ports
    monitor = getattr(getattr(config, "common_config", None), "monitor_server", None)
    bind = getattr(monitor, "bind_address", "127.0.0.1:9091")
    assert bind.startswith("127.0.0.1:") and 9091 not in {p for p, _ in ports}
