"""The promises around the code: README commands, the man page, and `pip install .`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv

import pytest

from sockserv.config import ENV_PREFIX, SETTINGS

from .conftest import ROOT

MAN = ROOT / "man" / "sockserv.1"


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    text = "\n".join(head)
    assert "python -m sockserv echo" in text
    assert "pip install -e '.[test]' && python -m coverage run -m pytest" in text


def test_ci_runs_the_readme_test_command():
    assert "pip install -e '.[test]' && python -m coverage run -m pytest" in (
        ROOT / ".ci" / "run").read_text()


def test_man_page_documents_every_setting_flag_and_variable():
    text = MAN.read_text().replace("\\-", "-").replace("\\_", "_")
    for name in SETTINGS:
        assert name in text, name
        assert ENV_PREFIX + name.upper() in text, name
        if name != "service":
            assert "--" + name.replace("_", "-") in text, name


def test_readme_settings_list_names_every_setting():
    text = (ROOT / "README.md").read_text()
    listed = text[text.index("Settings: "):].split(";", 1)[0]
    missing = [name for name in SETTINGS if name != "service" and f"`{name}`" not in listed]
    assert not missing


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed")
def test_man_page_has_no_groff_warnings():
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    assert result.stderr == ""


@pytest.mark.timeout(300)
def test_pip_install_into_a_fresh_venv_gives_a_working_command(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    result = subprocess.run([*pip, str(ROOT)], capture_output=True, text=True, timeout=280,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command = env_dir / "bin" / "sockserv"
    out = subprocess.run([str(command), "--version"], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert out.stdout.startswith("sockserv "), out
    assert (env_dir / "share" / "man" / "man1" / "sockserv.1").exists()
    typed = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                            "import importlib.resources as r; "
                            "print(r.files('sockserv').joinpath('py.typed').is_file())"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert typed.stdout.strip() == "True"


def test_package_imports_only_the_standard_library():
    import ast

    std = set(sys.stdlib_module_names) | {"sockserv"}
    for path in (ROOT / "sockserv").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in std, f"{path}: imports {name}"


def test_public_names_are_exported():
    import sockserv

    for name in ["Handler", "LineHandler", "EchoHandler", "Config", "TCPServer", "UDPServer",
                 "ThreadingTCPServer", "ThreadingUDPServer", "ForkingTCPServer",
                 "ForkingUDPServer"]:
        assert name in sockserv.__all__
        assert getattr(sockserv, name)
