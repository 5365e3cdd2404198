"""Exit 0 when adapmtl is installed editable from this checkout and its compiled extensions are newer than
every C++/CUDA source and the build files (so scripts/install.sh can skip a rebuild); else exit 1.
With --requirements "[extra]", print the requirements of those extras (one per line) instead."""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extras_requirements(spec: str) -> list[str]:
    names = [n.strip() for n in spec.strip("[]").split(",") if n.strip()]
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    out = []
    for name in names:
        match = re.search(rf"^{re.escape(name)}\s*=\s*\[(.*?)\]", section, re.M | re.S)
        if match is None:
            sys.exit(f"editable_up_to_date: no extra {name!r} in pyproject.toml")
        out += re.findall(r'"([^"]+)"', match.group(1))
    return out


def up_to_date() -> bool:
    probe = "import adapmtl, os; print(os.path.dirname(os.path.abspath(adapmtl.__file__)))"
    # from another folder: only an installed (here: editable) adapmtl can answer
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=os.path.expanduser("~"))
    if found.returncode != 0 or os.path.realpath(found.stdout.strip()) != os.path.realpath(os.path.join(ROOT, "adapmtl")):
        return False
    built = glob.glob(os.path.join(ROOT, "adapmtl", "_C*.so"))
    if not any(os.path.basename(p).startswith("_C.") for p in built):
        return False
    if os.environ.get("ADAPMTL_FORCE_CUDA", "0") == "1" and not any("_C_cuda" in p for p in built):
        return False
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True) + [
        os.path.join(ROOT, "setup.py"), os.path.join(ROOT, "pyproject.toml")]
    newest_source = max(os.path.getmtime(p) for p in sources if os.path.isfile(p))
    return min(os.path.getmtime(p) for p in built) > newest_source


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--requirements":
        print("\n".join(extras_requirements(sys.argv[2])))
        sys.exit(0)
    sys.exit(0 if up_to_date() else 1)
