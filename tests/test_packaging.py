"""Packaging: the configs ship inside the package (`-c demo` from any folder, `adapmtl configs`), the sdist
holds every source a wheel is built from, the metadata users see, and (in CI, ADAPMTL_TEST_INSTALLED=1)
that the tests really import the installed wheel, not the checkout beside them."""
import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest

import adapmtl
from adapmtl.cli import main
from adapmtl.train.config import bundled_configs, resolve_config
from helpers import tiny_demo_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_configs_live_in_the_package():
    configs = bundled_configs()
    assert {"demo", "nyuv2_resnet34", "nyuv2_mobilenetv2", "taskonomy_resnet34"} <= set(configs)
    package = os.path.dirname(os.path.abspath(adapmtl.__file__))
    assert all(os.path.dirname(p) == os.path.join(package, "configs") for p in configs.values())
    assert resolve_config("demo") == resolve_config("demo.yaml") == resolve_config("configs/demo.yaml") == configs["demo"]


def test_a_file_wins_over_a_bundled_name_and_unknown_names_are_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("seed: 5\n")
    assert resolve_config("demo") == "demo"
    with pytest.raises(FileNotFoundError, match="bundled: compare_synthetic, demo, "):
        resolve_config("no_such_config")
    with pytest.raises(FileNotFoundError, match="neither a file"):
        resolve_config(str(tmp_path / "sub" / "demo.yaml"))  # a path is never taken for a name


def test_configs_command_lists_prints_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in bundled_configs())
    assert main(["configs", "demo"]) == 0
    with open(bundled_configs()["demo"]) as fh:
        assert capsys.readouterr().out == fh.read()
    assert main(["configs", "demo", "--out", "mine.yaml"]) == 0
    assert (tmp_path / "mine.yaml").read_text() == open(bundled_configs()["demo"]).read()
    assert main(["configs", "demo", "--out", "mine.yaml"]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["configs", "demo", "--out", "mine.yaml", "--force"]) == 0
    assert main(["configs", "nope"]) == 2


def test_train_with_a_bundled_name_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "-c", "demo", *tiny_demo_overrides(tmp_path / "data")])
    assert rc == 0
    assert json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())["method"] == "adapmtl"
    assert sorted(os.listdir(tmp_path)) == ["data", "runs"]  # nothing else written into the working folder


def test_package_metadata():
    meta = importlib.metadata.metadata("adapmtl")
    assert meta["Name"] == "adapmtl" and meta["Requires-Python"] == ">=3.10"
    assert any(c.startswith("License :: OSI Approved") for c in meta.get_all("Classifier"))
    assert "AdapMTL" in (meta.get_payload() or meta["Description"] or "")  # the README as long description
    assert not meta.get_all("Project-URL")  # none invented
    extras = set(meta.get_all("Provides-Extra"))
    assert {"triton", "test"} <= extras


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the `build` package (CI installs it)")
def test_sdist_holds_every_source_the_wheel_needs(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), REPO],
                   check=True, capture_output=True)
    (sdist,) = glob.glob(str(tmp_path / "adapmtl-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = [os.path.relpath(p, REPO) for pattern in ("csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh",
                                                      "triton_kernels/*.py", "adapmtl/configs/*.yaml", "adapmtl/**/*.py")
              for p in glob.glob(os.path.join(REPO, pattern), recursive=True)]
    assert wanted and not [w for w in wanted if w not in names]
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"} <= names
    assert not [n for n in names if n.endswith(".so")]


@pytest.mark.skipif(os.environ.get("ADAPMTL_TEST_INSTALLED") != "1", reason="CI: tests against the installed wheel")
def test_the_tests_import_the_installed_package():
    package = os.path.dirname(os.path.abspath(adapmtl.__file__))
    assert not package.startswith(REPO + os.sep), f"imported the checkout at {package}, not the installed wheel"
    assert os.path.isfile(os.path.join(package, "configs", "demo.yaml"))
    assert glob.glob(os.path.join(package, "_C*.so")) and glob.glob(os.path.join(package, "triton_kernels", "*.py"))
    assert "site-packages" in package or "dist-packages" in package
    from adapmtl.ops import available_backends
    assert "cpp" in available_backends("cpu")



def test_import_from_the_parent_folder_of_a_clone(tmp_path):
    # the folder of a clone named adapmtl, seen from its parent: a directory without __init__.py, which the path
    # finder takes for a namespace package unless the installed package is found first (editable or wheel)
    clone = tmp_path / "adapmtl"
    (clone / "adapmtl").mkdir(parents=True)
    (clone / "setup.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}  # '' on sys.path
    probe = ("import sys, importlib.util, adapmtl, adapmtl.models; assert sys.path[0] == '', sys.path[:2]; "
             "print(adapmtl.__file__); assert importlib.util.find_spec('adapmtl.triton_kernels') is not None")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(r.stdout.strip()) and not r.stdout.strip().startswith(str(clone))


def test_install_script_reads_the_extras_as_pip_does():
    spec = importlib.util.spec_from_file_location("up", os.path.join(REPO, "scripts", "editable_up_to_date.py"))
    up = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(up)
    declared = importlib.metadata.requires("adapmtl")
    for extra in ("test", "triton"):
        want = sorted(r.split(";")[0].strip() for r in declared if f'extra == "{extra}"' in r)
        assert sorted(up.extras_requirements(f"[{extra}]")) == want
    assert up.extras_requirements("") == []
