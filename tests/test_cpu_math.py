"""The MKL code-path setting (ppvilg_deploy/cpu.py): who gets MKL_DEBUG_CPU_TYPE=5 and who is left alone."""
import os
import subprocess
import sys

from ppvilg_deploy import cpu

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n\nprocessor\t: 1\n"
AMD_NO_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx\n"
INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vendor_and_flags_of_the_first_processor():
    vendor, flags = cpu.cpu_vendor_and_flags(AMD + INTEL)
    assert vendor == "AuthenticAMD" and {"avx2", "fma"} <= flags and "avx" in flags
    assert cpu.cpu_vendor_and_flags("") == ("", set())


def test_only_amd_with_avx2_and_no_choice_of_the_user_gets_the_avx2_path():
    assert cpu.mkl_setting({}, AMD) == "5"
    assert cpu.mkl_setting({}, INTEL) is None            # MKL already picks its best path on Intel
    assert cpu.mkl_setting({}, AMD_NO_AVX2) is None      # path 5 would run instructions this CPU lacks
    assert cpu.mkl_setting({}, "") is None               # unknown CPU (no /proc/cpuinfo)
    assert cpu.mkl_setting({"MKL_DEBUG_CPU_TYPE": "4"}, AMD) is None
    assert cpu.mkl_setting({"PPVILG_KEEP_MKL_DISPATCH": "1"}, AMD) is None
    assert cpu.mkl_setting({"PPVILG_KEEP_MKL_DISPATCH": "0"}, AMD) == "5"
    env = {"PATH": "/bin"}
    assert cpu.apply_mkl_setting(env, AMD) == "5" and env == {"PATH": "/bin", "MKL_DEBUG_CPU_TYPE": "5"}
    assert "AVX2" in cpu.describe(env) and "not set" in cpu.describe({})


def test_importing_ppvilg_applies_it_before_paddle_runs():
    """A fresh interpreter: importing ppvilg sets what mkl_setting decides for this machine, and a user's own
    value survives."""
    code = "import os, ppvilg; print(os.environ.get('MKL_DEBUG_CPU_TYPE'))"
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "PPVILG_KEEP_MKL_DISPATCH")}
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert got == str(cpu.mkl_setting({}, cpu.read_cpuinfo()))
    env["MKL_DEBUG_CPU_TYPE"] = "3"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.split()[-1] == "3"
