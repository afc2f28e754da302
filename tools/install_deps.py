"""Install what requirements.txt lists and this Python lacks; never replace a paddle build that imports
(a paddlepaddle-gpu install stays as it is); install a Java runtime for METEOR and Chromium + chromedriver for
the web page's browser test where missing (apt, as root). Fast when nothing is missing (a stamp file per
requirements)."""
import hashlib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def apt_packages():
    """Debian packages the project uses that are missing: a Java runtime (METEOR 1.5 in pycocoevalcap runs on
    Java) and Chromium with its driver (tests/test_serve.py drives the web page in a real browser)."""
    want = []
    if not shutil.which("java"):
        want.append("default-jre-headless")
    if not shutil.which("chromium"):
        want.append("chromium")
    if not shutil.which("chromedriver"):
        want.append("chromium-driver")
    if not want:
        return
    if os.name == "posix" and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"install_deps: apt-get install {' '.join(want)} (METEOR's Java, the browser test's Chromium)",
              flush=True)
        subprocess.check_call(["apt-get", "update", "-qq"])
        subprocess.check_call(["apt-get", "install", "-y", "-qq", *want],
                              env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    else:
        print(f"install_deps: missing {', '.join(want)} and cannot install them here (needs apt as root): without "
              "Java METEOR is reported unavailable; without Chromium the browser test is skipped")


def main():
    req = os.path.join(ROOT, "requirements.txt")
    with open(req, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    stamp = os.path.join(sys.prefix, f".ppvilg-deps-{digest}")
    if os.path.exists(stamp):
        return
    apt_packages()
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
