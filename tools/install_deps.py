"""Install what requirements.txt lists and this Python lacks; never replace a paddle build that imports
(a paddlepaddle-gpu install stays as it is); install a Java runtime for METEOR where missing (apt, as root).
Fast when nothing is missing (a stamp file per requirements)."""
import hashlib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_java():
    """METEOR 1.5 (pycocoevalcap) runs on Java: install a headless JRE with apt where we can."""
    if shutil.which("java"):
        return
    if os.name == "posix" and shutil.which("apt-get") and os.geteuid() == 0:
        print("install_deps: installing a Java runtime for METEOR (apt-get install default-jre-headless)", flush=True)
        subprocess.check_call(["apt-get", "update", "-qq"])
        subprocess.check_call(["apt-get", "install", "-y", "-qq", "default-jre-headless"],
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    else:
        print("install_deps: no Java found and cannot install one here; METEOR will be reported as unavailable "
              "until a Java runtime is installed")


def main():
    req = os.path.join(ROOT, "requirements.txt")
    with open(req, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    stamp = os.path.join(sys.prefix, f".ppvilg-deps-{digest}")
    if os.path.exists(stamp):
        return
    ensure_java()
    lines = [ln.strip() for ln in open(req, encoding="utf-8") if ln.strip() and not ln.startswith("#")]
    has_paddle = subprocess.run([sys.executable, "-c", "import paddle"], capture_output=True).returncode == 0
    if has_paddle:
        lines = [ln for ln in lines if not ln.lower().startswith("paddlepaddle")]
        print("install_deps: a paddle build is already installed; leaving it as it is")
    print(f"install_deps: pip install {' '.join(lines)}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *lines])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "-e", ROOT])
    open(stamp, "w").close()


if __name__ == "__main__":
    main()
