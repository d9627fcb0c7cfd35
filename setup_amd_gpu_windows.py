"""Check the ROCm route for CRBL on AMD GPUs and print the exact next steps.

Windows: AMD's ROCm PyTorch wheels (Python 3.12; RDNA3 / RDNA4 / Strix Halo GPUs), in a venv of
their own. Linux: a ROCm build of PyTorch (torch.version.hip), /dev/kfd access, the card's gfx
target against the build's targets, and whether HSA_OVERRIDE_GFX_VERSION helps or hurts.
Installs nothing; what it cannot detect it says so. For DirectML use setup_amd_gpu_directml.py.

    python setup_amd_gpu_windows.py                 # report + next steps
    python setup_amd_gpu_windows.py --gfx gfx1031   # state the GPU target where it cannot be read
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import setup_amd_gpu_directml as common
from setup_amd_gpu_directml import Problem, SetupError, Step

# AMD's per-family indexes of ROCm + PyTorch wheels for Windows and Linux (TheRock builds).
# AMD's ROCm-on-Radeon guide names the release indexes; --index-url takes either.
AMD_INDEX = "https://rocm.nightlies.amd.com/v2/{family}/"
WINDOWS_PYTHON = (3, 12)  # AMD's Windows wheels are built for CPython 3.12 only

# Marketing name -> (architecture, AMD wheel family, supported by ROCm PyTorch on Windows).
AMD_NAME_TABLE = (
    (r"RX\s*90[67]0", "RDNA4", "gfx120X-all", True),
    (r"RX\s*7[6-9]00", "RDNA3", "gfx110X-all", True),
    (r"Ryzen AI Max|Radeon\s*80[56]0S", "RDNA3.5 (Strix Halo, gfx1151)", "gfx1151", True),
    (r"Radeon\s*7[4-8]0M|Radeon\s*8[48]0M", "RDNA3/3.5 integrated", "", False),
    (r"RX\s*6[4-9][05]0", "RDNA2", "", False),
    (r"RX\s*5[5-7]00|Vega|RX\s*[45][6-9]0", "RDNA1 / GCN", "", False),
)
# gfx targets of PyTorch's own ROCm wheels, used only while no ROCm torch is installed to ask.
ASSUMED_TORCH_TARGETS = ("gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100")


# --------------------------------------------------------------------------------------------
# gfx targets and HSA_OVERRIDE_GFX_VERSION
# --------------------------------------------------------------------------------------------

def gfx_version(gfx: str) -> tuple[int, int, int] | None:
    """'gfx1031' -> (10, 3, 1), 'gfx90a' -> (9, 0, 10): major digits, then minor and stepping in hex."""
    m = re.fullmatch(r"gfx(\d+)([0-9a-f])([0-9a-f])", gfx.split(":")[0].strip().lower())
    return (int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)) if m else None


def override_value(gfx: str) -> str:
    return ".".join(map(str, gfx_version(gfx)))


def hsa_override_advice(gfx: str, targets: list[str], current: str | None,
                        assumed: bool = False) -> Problem:
    """Whether HSA_OVERRIDE_GFX_VERSION helps (an unsupported card of a supported family, e.g.
    RDNA2 gfx1031 -> 10.3.0 runs gfx1030 kernels) or hurts (set on a supported card, or to
    another family's ISA: the GPU then runs kernels built for a different chip, which can
    crash the process or hang the GPU)."""
    basis = " (assumed PyTorch ROCm targets; re-run once a ROCm torch is installed)" if assumed else ""
    version = gfx_version(gfx)
    if version is None:
        return Problem("info", f"cannot judge HSA_OVERRIDE_GFX_VERSION: unknown gfx target {gfx!r}",
                       "pass --gfx gfxNNNN (rocminfo or rocm-smi --showproductname shows it)")
    gfx = gfx.split(":")[0].lower()
    if gfx in targets:
        if current:
            return Problem("error", f"HSA_OVERRIDE_GFX_VERSION={current} is set, but {gfx} is "
                           f"supported natively{basis}; the override loads another ISA's kernels "
                           "and can crash or hang", "unset HSA_OVERRIDE_GFX_VERSION (shell profile, "
                           "service file, IDE run configuration)")
        return Problem("info", f"{gfx} is a target of the torch build{basis}: no override needed")
    family = sorted((t for t in targets if (gfx_version(t) or ())[:2] == version[:2]),
                    key=lambda t: gfx_version(t)[2])
    if not family:
        what = (f"HSA_OVERRIDE_GFX_VERSION={current} is set, but" if current else "no override can help:")
        return Problem("error", f"{what} the torch build has no target of {gfx}'s family "
                       f"{version[0]}.{version[1]}.x{basis}; an override to another family crashes "
                       "or hangs", "use DirectML on Windows (setup_amd_gpu_directml.py) or the CPU"
                       + ("; unset HSA_OVERRIDE_GFX_VERSION" if current else ""))
    value = override_value(family[0])
    if current == value:
        return Problem("info", f"HSA_OVERRIDE_GFX_VERSION={value} is set: {gfx} runs {family[0]} "
                       f"kernels{basis}, the usual workaround for this card")
    if current:
        return Problem("error", f"HSA_OVERRIDE_GFX_VERSION={current} is wrong for {gfx}{basis}",
                       f"export HSA_OVERRIDE_GFX_VERSION={value}")
    return Problem("warning", f"{gfx} is not a target of the torch build{basis}; its family member "
                   f"{family[0]} is, so kernels load only with an override",
                   f"export HSA_OVERRIDE_GFX_VERSION={value}  (Linux only; set it only for this card)")


def amd_family_from_name(name: str) -> tuple[str, str, bool] | None:
    for pattern, arch, family, windows_ok in AMD_NAME_TABLE:
        if re.search(pattern, name, flags=re.I):
            return arch, family, windows_ok
    return None


# --------------------------------------------------------------------------------------------
# torch as ROCm sees it
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RocmTorch:
    hip: str | None = None
    targets: list[str] = dataclasses.field(default_factory=list)  # torch.cuda.get_arch_list()
    device_gfx: str = ""     # gcnArchName of device 0 (reflects HSA_OVERRIDE_GFX_VERSION)
    error: str = ""


def probe_rocm_torch() -> RocmTorch:
    try:
        import torch
    except Exception as exc:  # not installed, or a DLL / shared library that does not load
        return RocmTorch(error=f"{type(exc).__name__}: {exc}")
    info = RocmTorch(hip=getattr(torch.version, "hip", None))
    if info.hip:
        info.targets = sorted({a.split(":")[0] for a in torch.cuda.get_arch_list()})
        if torch.cuda.is_available():
            info.device_gfx = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
    return info


def can_open(path: str) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


# --------------------------------------------------------------------------------------------
# Checks per OS
# --------------------------------------------------------------------------------------------

def card_gfx(system: common.SystemInfo, gfx_arg: str | None) -> str:
    if gfx_arg:
        return gfx_arg.lower()
    return next((g.gfx for g in system.gpus_of("amd") if g.gfx), "")


def windows_checks(system: common.SystemInfo, versions: dict) -> tuple[list[Problem], str]:
    """Problems, and the AMD wheel family for the index URL ('' when unknown)."""
    problems, family = [], ""
    if system.python[:2] != WINDOWS_PYTHON:
        problems.append(Problem("warning", f"Python {system.python_str}: AMD's Windows ROCm wheels "
                                "are built for Python 3.12 only", "the steps below make a Python 3.12 "
                                "venv (install Python 3.12 first: `winget install Python.Python.3.12`)"))
    amd = system.gpus_of("amd")
    if not amd:
        problems.append(Problem("error", "no AMD GPU found among the video controllers",
                                "ROCm needs an AMD GPU; other GPUs: setup_amd_gpu_directml.py"))
    for gpu in amd:
        known = amd_family_from_name(gpu.name)
        if known is None:
            system.unknown.append(f"architecture of {gpu.name!r}: not in this script's name table")
        elif not known[2]:
            problems.append(Problem("error", f"{gpu.name} ({known[0]}) is not supported by ROCm "
                                    "PyTorch on Windows (RDNA3, RDNA4 and Strix Halo only, as far as "
                                    "this script knows)", "use DirectML: python setup_amd_gpu_directml.py"))
        else:
            family = family or known[1]
    if os.environ.get("HSA_OVERRIDE_GFX_VERSION"):
        problems.append(Problem("warning", "HSA_OVERRIDE_GFX_VERSION is set; it is read by Linux's "
                                "ROCm runtime only and does nothing on Windows", "remove it"))
    if versions.get("torch-directml"):
        problems.append(Problem("info", "this interpreter has torch-directml (torch 2.4.1 CPU build)",
                                "keep ROCm torch in its own venv, as the steps below do"))
    system.unknown.append("driver: whether the installed AMD Software (Adrenalin) release is one "
                          "AMD's Windows ROCm wheels accept: compare its version with AMD's "
                          "compatibility matrix")
    return problems, family


def linux_checks(system: common.SystemInfo, rocm: RocmTorch, versions: dict,
                 gfx: str) -> list[Problem]:
    if not system.gpus_of("amd") and not gfx:
        return [Problem("error", "no AMD GPU detected", "ROCm needs an AMD GPU (pass --gfx if lspci "
                        "and rocm-smi are missing but the card is there); otherwise use "
                        "setup_amd_gpu_directml.py, which picks CUDA or the CPU")]
    problems = []
    if not common.path_exists("/dev/kfd"):
        problems.append(Problem("error", "/dev/kfd is missing: the amdgpu kernel driver with ROCm "
                                "compute (KFD) is not loaded" + (" (WSL2 has no KFD)" if system.wsl else ""),
                                "install the amdgpu driver per AMD's ROCm install guide for your "
                                "distribution, reboot; in WSL2 use DirectML instead"))
    elif not can_open("/dev/kfd"):
        problems.append(Problem("error", "/dev/kfd exists but this user cannot open it",
                                "ask an administrator once: `sudo usermod -aG render,video $USER`, "
                                "then log out and in"))
    if versions.get("torch") and not rocm.hip:
        problems.append(Problem("error", f"torch {versions['torch']} is not a ROCm build "
                                f"(torch.version.hip is None{'; ' + rocm.error if rocm.error else ''})",
                                "run the next steps above (they replace it with a ROCm build)"))
    current = os.environ.get("HSA_OVERRIDE_GFX_VERSION") or None
    if gfx:
        targets = rocm.targets or list(ASSUMED_TORCH_TARGETS)
        problems.append(hsa_override_advice(gfx, targets, current, assumed=not rocm.targets))
    else:
        system.unknown.append("the card's gfx target (no rocm-smi / rocminfo answer): pass --gfx to "
                              "get HSA_OVERRIDE_GFX_VERSION advice")
    return problems


def next_steps(system: common.SystemInfo, versions: dict, reqs, family: str,
               index_url: str | None) -> list[Step]:
    if system.os == "windows":
        # A fresh Python 3.12 venv: DirectML's torch 2.4.1 and ROCm's torch cannot share one.
        venv_python = r".venv-rocm\Scripts\python.exe"
        index = index_url or AMD_INDEX.format(family=family or "<family: gfx110X-all | gfx120X-all | gfx1151>")
        fresh = dataclasses.replace(system, executable=venv_python, in_venv=True,
                                    python=WINDOWS_PYTHON + (0,))
        steps = common.plan_install(fresh, {}, "rocm", reqs, index)
        steps[0].argv.insert(steps[0].argv.index("--index-url"), "--pre")  # AMD tags builds as pre-releases
        return [Step("make a Python 3.12 venv for ROCm", ["py", "-3.12", "-m", "venv", ".venv-rocm"]),
                *steps, Step("check it", [venv_python, os.path.abspath(__file__)])]
    steps = common.plan_install(system, versions, "rocm", reqs, index_url)
    return steps + [Step("check again", [system.executable, os.path.abspath(__file__)])]


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gpu = parser.add_argument_group("GPU")
    gpu.add_argument("--gfx", default="auto",
                     help="the card's gfx target, e.g. gfx1031; auto: read it from rocm-smi/rocminfo")
    source = parser.add_argument_group("install source (printed, never run)")
    source.add_argument("--index-url", default="auto",
                        help=f"torch wheel index; auto: Linux {common.TORCH_INDEX['rocm']}, "
                             f"Windows {AMD_INDEX.format(family='<family>')}")
    check = parser.add_argument_group("verification")
    check.add_argument("--image-size", type=int, default=64, help="image size of the test forward pass")
    check.add_argument("--no-verify", action="store_true", help="skip the device and forward test")
    args = parser.parse_args(argv)
    args.gfx = None if args.gfx == "auto" else args.gfx
    args.index_url = None if args.index_url == "auto" else args.index_url
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        system, versions, reqs = common.detect_system(), common.installed_versions(), common.read_requirements()
        rocm = probe_rocm_torch()
        gfx = card_gfx(system, args.gfx)
        if system.os == "windows":
            problems, family = windows_checks(system, versions)
        elif system.os == "linux":
            problems, family = linux_checks(system, rocm, versions, gfx), ""
        else:
            raise SetupError("ROCm does not run on macOS; PyTorch uses Metal (mps) there")
        common.print_system(system, versions, "rocm")
        print(f"ROCm   : torch.version.hip {rocm.hip or '-'}; targets {' '.join(rocm.targets) or '-'}; "
              f"card {gfx or 'unknown'}; device reports {rocm.device_gfx or '-'}; "
              f"HSA_OVERRIDE_GFX_VERSION={os.environ.get('HSA_OVERRIDE_GFX_VERSION', '(unset)')}")
        if rocm.hip and not args.no_verify:
            problems += common.verify_and_print("rocm", args.image_size)
        if not rocm.hip and (gfx or system.gpus_of("amd")):
            common.print_plan(next_steps(system, versions, reqs, family, args.index_url),
                              "Next steps (run them yourself; this script installs nothing)")
        return common.finish(problems)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
