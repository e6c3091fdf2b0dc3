"""scripts/install, the system installer, run for real into scratch roots (--prefix, DESTDIR):
every file lands where the units expect it, a second run changes nothing, the site's config and
data survive --uninstall and go with --purge; and both units pass `systemd-analyze`.

The installer makes a real venv with pip (about 30 s the first time, then from pip's cache), from
a snapshot of the source tree, so edits made while the tests run do not change what they see.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2]
SHIPPED = [
    "scripts/install",
    "pyproject.toml",
    "README.md",
    "config.toml",
    "gateway",
    "drivers",
    "systemd",
]
UNITS = {
    "edge-gateway.service": ["kafka-password", "mqtt-password", "http-token"],
    "edge-processor.service": ["kafka-password", "influxdb-token", "dashboard-token"],
}
PYTHON = "/usr/bin/python3"

pytestmark = [pytest.mark.timeout(600)]


def _can_make_venvs() -> str | None:
    """Why the installer cannot run here, or None."""
    if not os.access(PYTHON, os.X_OK):
        return f"{PYTHON} is missing (the installer makes the venv from Debian's Python)"
    probe = subprocess.run(
        [PYTHON, "-c", "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True,
    )
    if probe.returncode != 0:
        return f"{PYTHON} is older than 3.11 or has no venv module (apt-get install python3-venv)"
    return None


_why_not = _can_make_venvs()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=_why_not))


# --- helpers -------------------------------------------------------------------------------------


def run_install(source: Path, *args: str, destdir: Path | None = None) -> str:
    """Run the installer from ``source``; fail the test with its output unless it succeeds."""
    env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "PYTHON")}
    if destdir is not None:
        env["DESTDIR"] = str(destdir)
    proc = subprocess.run(
        ["bash", str(source / "scripts/install"), *args],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"scripts/install {' '.join(args)} failed:\n{out}"
    return out


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under root: type, mode, size, mtime (ns) and content hash or link target."""
    state: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                state[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return state


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (all sections; repeated keys keep every value)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of what a clone ships, without build debris."""
    dst = tmp_path_factory.mktemp("checkout")
    for name in SHIPPED:
        src = SRC / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One gateway install into a scratch root, shared; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("root")
    out = run_install(source, "--prefix", str(root))
    yield root, out


# --- layout --------------------------------------------------------------------------------------


def test_every_file_is_where_the_gateway_unit_expects_it(
    source: Path, installed: tuple[Path, str]
) -> None:
    root, out = installed
    unit = root / "usr/lib/systemd/system/edge-gateway.service"
    assert unit.read_bytes() == (source / "systemd/edge-gateway.service").read_bytes()
    assert not (root / "usr/lib/systemd/system/edge-processor.service").exists()
    s = unit_settings(unit)

    # ExecStart: the venv's command, runnable, from the package just installed (not editable).
    exec_start = s["ExecStart"][0].split()
    binary = under(root, exec_start[0])
    assert os.access(binary, os.X_OK), f"{exec_start[0]} not installed"
    imported = subprocess.run(
        [str(binary.parent / "python"), "-I", "-c", "import gateway; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.strip()
    assert imported.startswith(str(under(root, "/opt/edge-gateway/venv/lib"))), imported
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, cwd=root)
    assert help_text.returncode == 0, help_text.stderr
    assert exec_start[1:3] == ["run", "--config"]

    # The config it names, the shipped one, with every probe profile it names beside it.
    config = under(root, exec_start[3])
    assert config.read_bytes() == (source / "config.toml").read_bytes()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    doc = tomllib.loads(config.read_text())
    profiles = [sl["profile"] for bus in doc["modbus"]["serial"] for sl in bus["slaves"]]
    profiles += [dev["profile"] for dev in doc["modbus"]["tcp"]]
    for profile in profiles:
        assert (config.parent / profile).is_file(), f"{profile} named by config.toml is missing"

    # Credentials: the directory is root-only; every LoadCredential= file exists (systemd
    # refuses to start a unit whose credential file is missing), 0600, listed in the README.
    creds = under(root, "/etc/edge-gateway/credentials")
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    readme = (creds / "README").read_text()
    loaded = [v.split(":", 1) for v in s["LoadCredential"]]
    assert sorted(name for name, _ in loaded) == sorted(UNITS["edge-gateway.service"])
    for name, path in loaded:
        f = under(root, path)
        assert f.is_file() and f.parent == creds, path
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert name in readme
    # The config refers to them as cred:NAME.
    config_text = config.read_text()
    for name in ("kafka-password", "mqtt-password", "http-token"):
        assert f'"cred:{name}"' in config_text

    # State, working directory, documentation, the operator's command.
    assert s["StateDirectory"] == ["edge-gateway"]
    assert under(root, s["WorkingDirectory"][0]).is_dir()
    assert under(root, s["WorkingDirectory"][0]) == root / "var/lib/edge-gateway"
    doc_path = s["Documentation"][0].removeprefix("file://")
    assert under(root, doc_path).read_bytes() == (source / "README.md").read_bytes()
    link = root / "usr/local/bin/edge-gateway"
    assert link.is_symlink() and link.resolve() == binary.resolve()

    # Nothing outside the scratch root: no user, no systemctl; it says what it left out.
    for left_out in (
        "useradd",
        "usermod --append --groups dialout",
        "systemctl enable edge-gateway",
    ):
        assert left_out in out, f"'{left_out}' not reported:\n{out}"


def test_a_second_run_changes_nothing(source: Path, installed: tuple[Path, str]) -> None:
    root, _ = installed
    before = tree_state(root)
    out = run_install(source, "--prefix", str(root))
    assert tree_state(root) == before
    assert "up to date" in out
    assert "installed " not in out and "created " not in out, out


def test_the_processor_variant_adds_its_unit_and_credentials(
    source: Path, installed: tuple[Path, str], tmp_path: Path
) -> None:
    root = copy_root(installed[0], tmp_path / "root")
    before = tree_state(root)
    out = run_install(source, "--processor", "--prefix", str(root))
    assert "up to date" in out  # same program, no pip run
    unit = root / "usr/lib/systemd/system/edge-processor.service"
    assert unit.read_bytes() == (source / "systemd/edge-processor.service").read_bytes()
    s = unit_settings(unit)
    assert s["ExecStart"][0].split()[1:3] == ["processor", "run"]
    assert os.access(under(root, s["ExecStart"][0].split()[0]), os.X_OK)
    for value in s["LoadCredential"]:
        assert under(root, value.split(":", 1)[1]).is_file()
    after = tree_state(root)
    added = sorted(set(after) - set(before))
    assert added == [
        "etc/edge-gateway/credentials/dashboard-token",
        "etc/edge-gateway/credentials/influxdb-token",
        "usr/lib/systemd/system/edge-processor.service",
    ]
    assert "systemctl enable edge-processor.service" in out


def test_the_sites_config_credentials_and_profiles_are_kept(
    source: Path, installed: tuple[Path, str], tmp_path: Path
) -> None:
    root = copy_root(installed[0], tmp_path / "root")
    etc = root / "etc/edge-gateway"
    site_config = (etc / "config.toml").read_text().replace("plant-north-gw1", "plant-south-gw7")
    (etc / "config.toml").write_text(site_config)
    (etc / "credentials/kafka-password").write_text("s3cret")
    (etc / "drivers/ph-int16.toml").write_text("# the site's own profile\n")

    out = run_install(source, "--prefix", str(root))
    assert (etc / "config.toml").read_text() == site_config
    assert (etc / "config.toml.dist").read_bytes() == (source / "config.toml").read_bytes()
    assert (etc / "credentials/kafka-password").read_text() == "s3cret"
    assert (etc / "drivers/ph-int16.toml").read_text() == "# the site's own profile\n"
    assert (etc / "drivers/ph-int16.toml.dist").read_bytes() == (
        source / "drivers/ph-int16.toml"
    ).read_bytes()
    assert "config.toml.dist" in out

    before = tree_state(root)
    run_install(source, "--prefix", str(root))
    assert tree_state(root) == before


def test_uninstall_keeps_config_and_state_and_purge_removes_them(
    installed: tuple[Path, str], source: Path, tmp_path: Path
) -> None:
    root = copy_root(installed[0], tmp_path / "root")
    run_install(source, "--processor", "--prefix", str(root))
    state = root / "var/lib/edge-gateway"
    (state / "buffer.db").write_bytes(b"rows not yet in Kafka")
    (state / "calibrations.sqlite").write_bytes(b"slopes and offsets")
    (root / "etc/edge-gateway/credentials/kafka-password").write_text("s3cret")
    kept = {
        rel: v
        for rel, v in tree_state(root).items()
        if rel.startswith(("etc/edge-gateway", "var/lib/edge-gateway"))
    }

    out = run_install(source, "--uninstall", "--prefix", str(root))
    assert not (root / "opt/edge-gateway").exists()
    assert not (root / "usr/local/bin/edge-gateway").is_symlink()
    for unit in UNITS:
        assert not (root / "usr/lib/systemd/system" / unit).exists()
    remaining = tree_state(root)
    assert {rel: v for rel, v in remaining.items() if rel in kept} == kept
    assert "userdel edge-gateway" in out  # left for the target system

    out = run_install(source, "--uninstall", "--purge", "--prefix", str(root))
    assert not (root / "etc/edge-gateway").exists()
    assert not state.exists()
    leftovers = [rel for rel, v in tree_state(root).items() if v[0] != "dir"]
    assert leftovers == [], leftovers


def test_destdir_stages_a_venv_that_runs_from_its_final_place(source: Path, tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    out = run_install(source, destdir=stage)
    venv = stage / "opt/edge-gateway/venv"
    first_line = (venv / "bin/edge-gateway").read_text().splitlines()[0]
    assert first_line == "#!/opt/edge-gateway/venv/bin/python3"
    for f in (venv / "bin").iterdir():
        if f.is_file() and not f.is_symlink():
            assert str(stage) not in f.read_text(errors="replace"), f
    assert str(stage) not in (venv / "pyvenv.cfg").read_text()
    assert (stage / "usr/lib/systemd/system/edge-gateway.service").is_file()
    assert not (stage / "usr/local").exists()  # packages do not ship /usr/local
    assert "useradd" in out and "systemctl enable edge-gateway.service" in out
    # The staged venv still imports the package in place (its python is the system one).
    subprocess.run([str(venv / "bin/python"), "-c", "import gateway.cli"], check=True)


# --- the units -----------------------------------------------------------------------------------

ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"
needs_analyze = pytest.mark.skipif(
    shutil.which(ANALYZE) is None,
    reason="systemd-analyze is missing: apt-get install systemd (scripts/bootstrap does)",
)


@needs_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_verify_passes(
    unit: str, source: Path, installed: tuple[Path, str], tmp_path: Path
) -> None:
    """verify checks every setting and that ExecStart exists: point /opt/edge-gateway at the
    scratch install (the rest of the unit, /bin/kill included, is checked against this host)."""
    root, _ = installed
    text = (source / "systemd" / unit).read_text()
    assert "/opt/edge-gateway/venv/bin/edge-gateway" in text
    checked = tmp_path / unit
    checked.write_text(text.replace("/opt/edge-gateway/", f"{root}/opt/edge-gateway/"))
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(checked)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    about_unit = [line for line in proc.stderr.splitlines() if unit in line or str(checked) in line]
    assert about_unit == [], proc.stderr


@needs_analyze
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_exposure_stays_low(unit: str, source: Path) -> None:
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(source / "systemd" / unit)],
        capture_output=True,
        text=True,
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) < 3.0, proc.stdout
