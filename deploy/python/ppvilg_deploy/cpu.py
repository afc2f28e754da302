"""Process-wide CPU math setting, applied when ppvilg or ppvilg_deploy is imported (before Paddle runs a kernel).

Paddle's CPU wheels do their matrix products (linear layers, the im2col GEMMs of convolutions) in the Intel MKL
they bundle. On AMD processors that MKL picks its generic code path, not its AVX2 one: on the 2-core AMD EPYC
machines of this project a [64, 256] x [256, 768] product ran at 42 GFLOP/s instead of 114, a stage-2 demo
training step took 487 ms instead of 254 and a stage-1 one ran 14 instead of 66 images/s
(benchmarks/bench_train.py, docs/demo.md). MKL_DEBUG_CPU_TYPE=5 selects the AVX2 path; this bundled MKL
reads it at its first call. So on an AMD CPU that has AVX2, with MKL_DEBUG_CPU_TYPE not set, it is set here.
A user who sets MKL_DEBUG_CPU_TYPE (to anything) is left alone, and PPVILG_KEEP_MKL_DISPATCH=1 keeps MKL's own
choice (benchmarks/bench_cpu_math.py measures both); on other processors nothing changes.
"""
import os

VARIABLE = "MKL_DEBUG_CPU_TYPE"
AVX2_PATH = "5"
KEEP = "PPVILG_KEEP_MKL_DISPATCH"


def cpu_vendor_and_flags(cpuinfo_text):
    """(vendor_id, set of flags) of the first processor listed in /proc/cpuinfo text; ('', set()) if none."""
    vendor, flags = "", set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor, flags


def mkl_setting(environ, cpuinfo_text):
    """The value MKL_DEBUG_CPU_TYPE should get, or None to leave the environment as it is."""
    if VARIABLE in environ or environ.get(KEEP, "") not in ("", "0"):
        return None
    vendor, flags = cpu_vendor_and_flags(cpuinfo_text)
    return AVX2_PATH if vendor == "AuthenticAMD" and "avx2" in flags else None


def read_cpuinfo(path="/proc/cpuinfo"):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:   # not Linux: no vendor known, nothing is set
        return ""


def apply_mkl_setting(environ=None, cpuinfo_text=None):
    """Set MKL_DEBUG_CPU_TYPE in `environ` (default os.environ) when mkl_setting says so; returns the value set
    or None."""
    environ = os.environ if environ is None else environ
    value = mkl_setting(environ, read_cpuinfo() if cpuinfo_text is None else cpuinfo_text)
    if value is not None:
        environ[VARIABLE] = value
    return value


def describe(environ=None):
    """One line for the logs: which MKL code path the environment asks for."""
    environ = os.environ if environ is None else environ
    if VARIABLE not in environ:
        return f"MKL: its own CPU dispatch (MKL_DEBUG_CPU_TYPE not set{', ' + KEEP if environ.get(KEEP) else ''})"
    return f"MKL: MKL_DEBUG_CPU_TYPE={environ[VARIABLE]}" + (
        " (its AVX2 code path, set by ppvilg on this AMD CPU; set the variable yourself to choose)"
        if environ[VARIABLE] == AVX2_PATH else "")
