"""Set up and check PyTorch for CRBL on this machine: DirectML on Windows (any DX12 GPU, AMD
included), CUDA, ROCm or CPU elsewhere.

Detects the OS, Python and GPUs, picks the requirement set, shows (default) or runs (--install)
the pip commands into the *current* interpreter, then verifies the device with a real op and one
small CRBL forward pass. Never needs admin rights: outside a venv it installs with --user.

    python setup_amd_gpu_directml.py --check        # report only, installs nothing
    python setup_amd_gpu_directml.py                # report + the exact pip commands (dry run)
    python setup_amd_gpu_directml.py --install      # run them, then verify in a fresh process

The default is a dry run on purpose: replacing torch in someone's environment is not a side
effect a check should have. setup_amd_gpu_windows.py (the ROCm route) reuses the detection here.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REQUIREMENTS = ROOT / "requirements_directml.txt"

# Index URLs for torch builds PyPI does not carry. They change with each PyTorch release:
# https://pytorch.org/get-started/locally/ names the current ones; --index-url overrides.
TORCH_INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "cuda": "https://download.pytorch.org/whl/cu126",
    "rocm": "https://download.pytorch.org/whl/rocm6.4",
}
TORCH_PACKAGES = ("torch", "torchvision", "torch-directml")
DIRECTML_MAX_PYTHON = (3, 12)     # torch-directml 0.2.5 ships wheels for CPython 3.8-3.12 only
DIRECTML_MIN_WINDOWS_BUILD = 16299  # Windows 10 1709: Microsoft's minimum for native torch-directml
PCI_VENDORS = {"1002": "amd", "1022": "amd", "10de": "nvidia", "8086": "intel", "1414": "microsoft"}
DRIVER_ADVICE = {
    "amd": "install the current AMD Software: Adrenalin Edition driver (amd.com/support)",
    "nvidia": "install the current NVIDIA Game Ready or Studio driver (nvidia.com/drivers)",
    "intel": "install the current Intel Arc & Iris Xe / UHD graphics driver (intel.com)",
}


class SetupError(Exception):
    """The user asked for something this machine cannot do; main prints it and exits 2.

    Stands in for model_pytorch_directml.CRBLError: this script runs before torch is installed
    and must not load torch's DLLs before pip replaces them (Windows keeps loaded DLLs locked),
    so it cannot import the model module at start-up.
    """


def exit_missing_module(exc: ModuleNotFoundError) -> None:
    """For the other scripts, started by a Python that lacks their requirements (a bare
    `python` outside the project's venv): one line saying which interpreter and what to do,
    instead of a ModuleNotFoundError traceback; exit status 2 like every user error."""
    python = sys.executable or "this Python"
    print(f"error: {python} (Python {platform.python_version()}) has no module "
          f"'{exc.name}': run the scripts with the project's venv (.venv/bin/python, Windows "
          f".venv\\Scripts\\python, or activate it first) or install the requirements into "
          f"this Python: {python} -m pip install -r requirements_directml.txt "
          "(setup_amd_gpu_directml.py shows the right torch build)", file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------------------------
# System queries: every outside answer goes through run_command / path_exists / package_version,
# which the tests replace.
# --------------------------------------------------------------------------------------------

@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str = ""


def run_command(argv: list[str], timeout: float = 30, env: dict | None = None) -> CommandResult | None:
    """Run a query tool; None when the tool does not exist or does not answer in time."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              errors="replace")
    except (FileNotFoundError, PermissionError, subprocess.TimeoutExpired, OSError):
        return None
    return CommandResult(done.returncode, done.stdout, done.stderr)


def run_streaming(argv: list[str]) -> int:
    """Run pip with its output on our terminal; returns the exit code."""
    return subprocess.call(argv)


def path_exists(path: str) -> bool:
    return os.path.exists(path)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

@dataclass
class GPU:
    name: str
    vendor: str            # amd | nvidia | intel | microsoft | unknown
    source: str            # the tool that reported it
    driver: str = ""
    gfx: str = ""          # AMD ISA target (gfx1031) where rocm-smi / rocminfo told us


@dataclass
class SystemInfo:
    os: str                # windows | linux | darwin
    os_version: str        # Windows: "10.0.22631"; Linux: kernel release
    machine: str
    python: tuple[int, int, int]
    executable: str
    in_venv: bool
    site_writable: bool
    wsl: bool = False
    dxg: bool = False      # /dev/dxg: WSL2's GPU paravirtualisation (DirectML inside WSL)
    gpus: list[GPU] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # what could not be detected, and why

    @property
    def python_str(self) -> str:
        return ".".join(map(str, self.python))

    def gpus_of(self, vendor: str) -> list[GPU]:
        return [g for g in self.gpus if g.vendor == vendor]


def vendor_of(text: str) -> str:
    text = text.lower()
    ids = re.search(r"ven_([0-9a-f]{4})|\[([0-9a-f]{4}):[0-9a-f]{4}\]", text)
    if ids:
        return PCI_VENDORS.get(ids.group(1) or ids.group(2), "unknown")
    for word, vendor in (("nvidia", "nvidia"), ("radeon", "amd"), ("advanced micro devices", "amd"),
                         ("amd", "amd"), ("intel", "intel"), ("microsoft", "microsoft")):
        if word in text:
            return vendor
    return "unknown"


WINDOWS_GPU_QUERY = ("Get-CimInstance Win32_VideoController | Select-Object Name, "
                     "AdapterCompatibility, DriverVersion, PNPDeviceID | ConvertTo-Json -Compress")


def detect_gpus_windows(unknown: list[str]) -> list[GPU]:
    res = run_command(["powershell", "-NoProfile", "-NonInteractive", "-Command", WINDOWS_GPU_QUERY])
    if res is None or res.returncode != 0:
        unknown.append("GPUs: PowerShell's Get-CimInstance Win32_VideoController gave no answer; "
                       "look in Device Manager > Display adapters")
        return []
    try:
        rows = json.loads(res.stdout or "[]")
    except json.JSONDecodeError:
        unknown.append("GPUs: could not parse Win32_VideoController output")
        return []
    rows = [rows] if isinstance(rows, dict) else rows
    return [GPU(name=r.get("Name") or "?", driver=r.get("DriverVersion") or "",
                vendor=vendor_of(f"{r.get('PNPDeviceID') or ''} {r.get('AdapterCompatibility') or ''} "
                                 f"{r.get('Name') or ''}"), source="Win32_VideoController")
            for r in rows]


def _lspci_gpus(unknown: list[str]) -> list[GPU] | None:
    res = run_command(["lspci", "-nn"])
    if res is None or res.returncode != 0:
        unknown.append("GPUs: lspci not available (install pciutils to list PCI display devices)")
        return None
    gpus = []
    for line in res.stdout.splitlines():
        # "03:00.0 VGA compatible controller [0300]: Advanced Micro ... [1002:73df] (rev c1)"
        m = re.match(r"\S+\s+(?:VGA compatible|3D|Display) controller \[03\d\d\]:\s*(.*)", line)
        if m:
            name = re.sub(r"\s*\[[0-9a-f]{4}:[0-9a-f]{4}\].*$", "", m.group(1))
            gpus.append(GPU(name=name, vendor=vendor_of(m.group(1)), source="lspci"))
    return gpus


def rocm_smi_gpus() -> list[GPU] | None:
    """AMD GPUs as ROCm's kernel driver sees them; the GFX Version comes from sysfs, so it is the
    card's real ISA even when HSA_OVERRIDE_GFX_VERSION is set."""
    res = run_command(["rocm-smi", "--showproductname"])
    if res is None or res.returncode != 0:
        return None
    by_index: dict[str, GPU] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"GPU\[(\d+)\]\s*:\s*([^:]+):\s*(.*)", line.strip())
        if not m:
            continue
        gpu = by_index.setdefault(m.group(1), GPU(name="AMD GPU", vendor="amd", source="rocm-smi"))
        key, value = m.group(2).strip().lower(), m.group(3).strip()
        if key == "card series":
            gpu.name = value
        elif key == "gfx version":
            gpu.gfx = value.lower()
    return list(by_index.values())


def rocminfo_targets() -> list[str]:
    """gfx targets from rocminfo, run without HSA_OVERRIDE_GFX_VERSION so it reports real ones."""
    env = {k: v for k, v in os.environ.items() if k != "HSA_OVERRIDE_GFX_VERSION"}
    res = run_command(["rocminfo"], env=env)
    if res is None or res.returncode != 0:
        return []
    return re.findall(r"^\s*Name:\s+(gfx[0-9a-f]+)\s*$", res.stdout, flags=re.M)


def nvidia_smi_gpus() -> list[GPU] | None:
    res = run_command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    if res is None or res.returncode != 0:
        return None
    rows = [line.rsplit(",", 1) for line in res.stdout.splitlines() if line.strip()]
    return [GPU(name=r[0].strip(), vendor="nvidia", source="nvidia-smi",
                driver=r[1].strip() if len(r) > 1 else "") for r in rows]


def detect_gpus_linux(unknown: list[str]) -> list[GPU]:
    """lspci lists the devices; rocm-smi / rocminfo add AMD gfx targets, nvidia-smi drivers."""
    pci = _lspci_gpus(unknown)
    amd = rocm_smi_gpus()
    if amd is not None and not any(g.gfx for g in amd):
        for gpu, gfx in zip(amd, rocminfo_targets()):
            gpu.gfx = gfx
    nvidia = nvidia_smi_gpus()
    if pci is None:  # no lspci: the vendor tools are all we have
        return (amd or []) + (nvidia or [])
    for vendor, found in (("amd", amd), ("nvidia", nvidia)):
        listed = [g for g in pci if g.vendor == vendor]
        for gpu, extra in zip(listed, found or []):
            gpu.gfx, gpu.driver = extra.gfx or gpu.gfx, extra.driver or gpu.driver
            gpu.source += f" + {extra.source}"
        if listed and found is None:
            tool = "rocm-smi" if vendor == "amd" else "nvidia-smi"
            unknown.append(f"{vendor.upper()} driver state: {tool} not found, so this script cannot "
                           "tell whether the compute driver is installed")
    return pci


def detect_system() -> SystemInfo:
    os_name = {"win32": "windows", "darwin": "darwin"}.get(sys.platform, "linux")
    release = platform.release()
    info = SystemInfo(
        os=os_name, os_version=platform.version() if os_name == "windows" else release,
        machine=platform.machine(), python=tuple(sys.version_info[:3]), executable=sys.executable,
        in_venv=sys.prefix != sys.base_prefix,
        site_writable=os.access(sysconfig.get_paths()["purelib"], os.W_OK),
        wsl=os_name == "linux" and "microsoft" in release.lower(),
        dxg=os_name == "linux" and path_exists("/dev/dxg"))
    if os_name == "windows":
        info.gpus = detect_gpus_windows(info.unknown)
    elif os_name == "linux":
        info.gpus = detect_gpus_linux(info.unknown)
    else:
        info.unknown.append("GPUs: not queried on macOS (PyTorch uses Metal there, not DirectML or ROCm)")
    return info


def installed_versions() -> dict[str, str | None]:
    """Versions of the torch packages from their metadata: no import, so nothing gets loaded."""
    return {name: package_version(name) for name in TORCH_PACKAGES}


# --------------------------------------------------------------------------------------------
# Requirements file: the one place that pins the DirectML stack and the torch range
# --------------------------------------------------------------------------------------------

@dataclass
class Requirement:
    name: str
    spec: str       # "torch==2.4.1"
    marker: str     # 'sys_platform == "win32" and python_version < "3.13"', or ""


def read_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    if not path.is_file():
        raise SetupError(f"{path} not found: run this script from a CRBL-PyTorch checkout")
    reqs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        spec, _, marker = (part.strip() for part in line.partition(";"))
        name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0).lower()
        reqs.append(Requirement(name, spec, marker))
    return reqs


def torch_specs(reqs: list[Requirement], windows_directml: bool) -> list[str]:
    """The torch lines of the file for the DirectML-on-Windows branch, or for everywhere else."""
    want = 'sys_platform == "win32"' if windows_directml else 'sys_platform != "win32"'
    return [r.spec for r in reqs if r.name in TORCH_PACKAGES and want in r.marker]


def pinned_version(specs: list[str], name: str) -> str | None:
    for spec in specs:
        m = re.fullmatch(rf"{re.escape(name)}\s*==\s*(\S+)", spec, flags=re.I)
        if m:
            return m.group(1)
    return None


# --------------------------------------------------------------------------------------------
# Target, problems, plan
# --------------------------------------------------------------------------------------------

TARGETS = ("auto", "directml", "cuda", "rocm", "cpu")


@dataclass
class Problem:
    severity: str   # error (blocks the chosen route) | warning | info
    what: str
    fix: str = ""
    install_fixes: bool = False  # --install's plan repairs it, so it does not block --install


def choose_target(system: SystemInfo, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if system.os == "windows" or (system.wsl and system.dxg):
        return "directml"
    if system.os == "linux" and system.gpus_of("amd"):
        return "rocm"
    if system.os == "linux" and system.gpus_of("nvidia"):
        return "cuda"
    return "cpu"


def directml_problems(system: SystemInfo, versions: dict, reqs: list[Requirement]) -> list[Problem]:
    problems = []
    torch_pin = pinned_version(torch_specs(reqs, True), "torch")
    dml_pin = pinned_version(torch_specs(reqs, True), "torch-directml")
    if system.python[:2] > DIRECTML_MAX_PYTHON:
        problems.append(Problem(
            "error", f"Python {system.python_str}: torch-directml {dml_pin} has wheels for Python "
            "3.8-3.12 only, so DirectML cannot be installed into this interpreter",
            "install Python 3.12 (python.org, or `winget install Python.Python.3.12`) and use a venv "
            "made with it (the install plan shows the commands); or stay on this Python with "
            "--target cpu"))
    if system.os == "linux" and not (system.wsl and system.dxg):
        problems.append(Problem(
            "error", "DirectML runs on Windows, or inside WSL2 with /dev/dxg; this is plain Linux",
            "use the ROCm route for AMD GPUs (python setup_amd_gpu_windows.py) or --target cuda/cpu"))
    if system.os == "windows":
        build = _windows_build(system.os_version)
        if build is not None and build < DIRECTML_MIN_WINDOWS_BUILD:
            problems.append(Problem("error", f"Windows build {build} is older than 10.0.16299 "
                                    "(Windows 10 1709), the oldest torch-directml supports",
                                    "update Windows (Settings > Windows Update)"))
        problems += _adapter_problems(system)
    if versions.get("torch-directml") and versions.get("torch") and torch_pin and \
            versions["torch"].split("+")[0] != torch_pin:
        problems.append(Problem(
            "error", f"torch {versions['torch']} is installed beside torch-directml "
            f"{versions['torch-directml']}, which is built against torch=={torch_pin} only; "
            "import torch_directml fails or crashes with any other torch",
            f"python -m pip install {' '.join(torch_specs(reqs, True))}  (or run this script with "
            "--install); keep CUDA/ROCm torch in a separate venv", install_fixes=True))
    return problems


def _windows_build(version: str) -> int | None:
    parts = version.split(".")
    return int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None


def _adapter_problems(system: SystemInfo) -> list[Problem]:
    real = [g for g in system.gpus if g.vendor not in ("microsoft", "unknown")]
    if system.gpus and not real:
        return [Problem(
            "error", "only Microsoft's Basic Display/Render adapter is present: no DirectX 12 GPU "
            "driver is installed (or this is a VM / Remote Desktop session without GPU access)",
            "install the GPU vendor's driver (AMD Adrenalin, Intel Arc/Iris, NVIDIA), then re-run --check")]
    return []


def environment_problems(system: SystemInfo, versions: dict, target: str,
                         reqs: list[Requirement]) -> list[Problem]:
    problems = []
    if system.python[:2] < (3, 9):
        problems.append(Problem("error", f"Python {system.python_str} is too old for CRBL-PyTorch",
                                "use Python 3.9-3.12 (3.12 for DirectML)"))
    if target == "directml":
        problems += directml_problems(system, versions, reqs)
    elif versions.get("torch-directml"):
        problems.append(Problem(
            "warning", f"torch-directml is installed but the target is {target}: it pins torch "
            f"{pinned_version(torch_specs(reqs, True), 'torch')} and fights any other torch build",
            "use a separate venv per route, or `python -m pip uninstall torch-directml`"))
    if target == "cpu" and (system.gpus_of("amd") or system.gpus_of("nvidia")):
        problems.append(Problem("info", "a GPU is present but the target is the CPU",
                                "see --target directml (Windows), rocm (Linux AMD) or cuda (NVIDIA)"))
    if not system.in_venv:
        problems.append(Problem("info", "not running inside a virtual environment",
                                "recommended: python -m venv .venv, then run this script with "
                                ".venv's python (installs then stay out of the system Python)"))
    return problems


@dataclass
class Step:
    what: str
    argv: list[str]
    manual: bool = False   # a command for the user to run (another interpreter, a new venv)


def pip_install(system: SystemInfo, *args: str) -> list[str]:
    argv = [system.executable, "-m", "pip", "install"]
    if not system.in_venv and not system.site_writable:
        argv.append("--user")  # never needs admin rights
    return argv + list(args)


def plan_install(system: SystemInfo, versions: dict, target: str, reqs: list[Requirement],
                 index_url: str | None = None) -> list[Step]:
    """The pip commands that set up `target` in this interpreter (or, where this interpreter
    cannot, the commands that make one that can)."""
    req_file = str(REQUIREMENTS)
    windows_directml_branch = system.os == "windows" and system.python[:2] <= DIRECTML_MAX_PYTHON
    if target == "directml" and system.python[:2] > DIRECTML_MAX_PYTHON:
        return _python312_venv_steps(system, req_file)
    if target == "directml" and system.os == "windows":
        return [Step("DirectML stack + CRBL requirements (markers pick torch-directml)",
                     pip_install(system, "-r", req_file))]
    if target == "directml":  # WSL2: the file's markers only pick DirectML on win32
        return [Step("DirectML stack (WSL2)", pip_install(system, *torch_specs(reqs, True))),
                Step("CRBL requirements", pip_install(system, "-r", req_file))]
    steps = []
    if versions.get("torch") and not _torch_fits(system, versions, target):
        # pip keeps an installed torch that satisfies the range whatever its build: remove it first.
        steps.append(Step(f"remove torch {versions['torch']} (not a {target} build)",
                          [system.executable, "-m", "pip", "uninstall", "-y",
                           *[n for n in TORCH_PACKAGES if versions.get(n)]]))
    if not _torch_fits(system, versions, target):
        index = index_url or _default_index(system, target)
        extra = ["--index-url", index] if index else []
        steps.append(Step(f"PyTorch ({target} build)",
                          pip_install(system, *extra, *torch_specs(reqs, False))))
    if windows_directml_branch:  # the file would pull torch 2.4.1 + torch-directml here
        common = [r.spec for r in reqs if r.name not in TORCH_PACKAGES]
        steps.append(Step("CRBL requirements without the DirectML stack", pip_install(system, *common)))
    else:
        steps.append(Step("CRBL requirements", pip_install(system, "-r", req_file)))
    return steps


def _default_index(system: SystemInfo, target: str) -> str | None:
    # PyPI's torch is the CUDA build on Linux and the CPU build on macOS: no extra index there.
    if system.os == "darwin" or (target == "cuda" and system.os == "linux"):
        return None
    return TORCH_INDEX.get(target)


def _torch_fits(system: SystemInfo, versions: dict, target: str) -> bool:
    """Whether the installed torch already is a build for target (any build runs on the CPU)."""
    torch_version = versions.get("torch")
    if not torch_version or versions.get("torch-directml"):
        return False
    local = torch_version.partition("+")[2]  # "rocm6.4", "cu126", "cpu", or "" (PyPI)
    pypi_is_cuda = system.os == "linux" and local == ""
    return {"rocm": local.startswith("rocm"), "cuda": local.startswith("cu") or pypi_is_cuda,
            "cpu": True}.get(target, False)


def _python312_venv_steps(system: SystemInfo, req_file: str) -> list[Step]:
    if system.os == "windows":
        make, venv_python = ["py", "-3.12", "-m", "venv", ".venv"], r".venv\Scripts\python.exe"
    else:
        make, venv_python = ["python3.12", "-m", "venv", ".venv"], ".venv/bin/python"
    return [Step("make a Python 3.12 venv (Python 3.12 must be installed)", make, manual=True),
            Step("install into it", [venv_python, "-m", "pip", "install", "-r", req_file], manual=True),
            Step("check it", [venv_python, str(Path(__file__).resolve()), "--check"], manual=True)]


# --------------------------------------------------------------------------------------------
# Verification: device, a real op, one small CRBL forward pass
# --------------------------------------------------------------------------------------------

@dataclass
class Verification:
    device: str = ""
    notes: list[str] = field(default_factory=list)
    forward_ms: float | None = None
    step_ms: float | None = None
    prob: list[float] = field(default_factory=list)
    fallback_ops: list[str] | None = None  # ops DirectML ran on the CPU; None = not a DML check
    problems: list[Problem] = field(default_factory=list)


def verify(preference: str = "auto", image_size: int = 64, auto_order=("dml", "cuda", "cpu")
           ) -> Verification:
    """get_device + a matmul checked against the CPU + one CRBL training step and one forward
    (random init, no downloads), recording every op DirectML sent to the CPU."""
    result = Verification()
    try:
        import torch
        from model_pytorch_directml import CRBLError, get_device
    except Exception as exc:  # ImportError, or OSError from a torch DLL that does not load
        result.problems.append(Problem("error", f"cannot import torch / the CRBL model module "
                                       f"with {sys.executable} ({type(exc).__name__}: {exc})",
                                       f"`{Path(sys.executable).name} {Path(__file__).name}` prints "
                                       "the install plan for this Python, --install runs it; or "
                                       "run this script with the project's venv"))
        return result
    try:
        info = get_device(preference, auto_order=auto_order)
    except CRBLError as exc:
        result.problems.append(Problem("error", str(exc), _device_fix(preference)))
        return result
    result.device, result.notes = str(info), list(info.notes)
    try:
        a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        got = (a.to(info.device) @ a.to(info.device)).cpu()
        if not torch.allclose(got, a @ a, rtol=1e-3, atol=1e-3):
            raise RuntimeError("64x64 matmul differs from the CPU result")
        run_crbl(result, info, image_size)
        if result.fallback_ops:
            result.problems.append(Problem(
                "warning", "this torch-directml runs " + ", ".join(result.fallback_ops) + " on the "
                "CPU: CRBL works, more slowly", "send the 'DirectML CPU fallbacks' line above to "
                "the CRBL-PyTorch maintainers"))
    except Exception as exc:
        result.problems.append(Problem("error", f"{info.kind} device failed a test "
                                       f"({type(exc).__name__}: {str(exc)[:300]})",
                                       _device_fix(info.kind)))
    return result


def run_crbl(result: Verification, info, image_size: int) -> None:
    """One training step of the crop model, as the training script takes it (its loss and
    optimiser), then a forward of the trained model; torch-directml's CPU-fallback warnings
    during both go to result.fallback_ops."""
    import torch
    from model_pytorch_directml import CRBLConfig, CRBLModel, freeze_backbones
    from train_CRBL_pytorch_directml import (CpuFallbackNotice, make_optimizer,
                                             prepare_for_training, train_step)
    torch.manual_seed(0)
    model = CRBLModel(CRBLConfig(image_size=image_size))
    freeze_backbones(model, "crop")
    model = prepare_for_training(model, info).train()
    x = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x, labels = x.to(info.device), torch.tensor([0.0, 1.0]).to(info.device)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4, 1e-6,
                               info.kind)
    fallbacks = CpuFallbackNotice(info.kind, say=lambda _: None)
    with fallbacks():
        start = time.perf_counter()
        train_step(model, x, labels, optimizer, torch.amp.GradScaler("cuda", enabled=False), info,
                   amp=False, smoothing=0.125, class_weights=None)
        model.head.bias.detach().cpu()  # wait for the step to finish (a sync)
        result.step_ms = (time.perf_counter() - start) * 1000
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            probs = torch.sigmoid(model(x)).cpu()
        result.forward_ms = (time.perf_counter() - start) * 1000
    if info.kind == "dml":
        result.fallback_ops = fallbacks.seen
    if probs.shape != (2, 1) or not torch.isfinite(probs).all():
        raise RuntimeError(f"forward pass gave {tuple(probs.shape)} / non-finite values")
    result.prob = [round(float(p), 4) for p in probs.flatten()]


def _device_fix(kind: str) -> str:
    if kind.startswith(("dml", "directml")):
        return ("update the GPU driver; check that `dxdiag` shows DirectX 12 / Feature Level 12_x; "
                "reinstall with --install; meanwhile use --device cpu")
    if kind.startswith(("cuda", "rocm")):
        return "check the driver (nvidia-smi / rocm-smi), or run setup_amd_gpu_windows.py for ROCm"
    return "use --device auto or cpu"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def print_system(system: SystemInfo, versions: dict, target: str) -> None:
    print(f"System : {system.os} {system.os_version} ({system.machine})"
          + (" [WSL2" + (", /dev/dxg]" if system.dxg else ", no /dev/dxg]") if system.wsl else ""))
    print(f"Python : {system.python_str} at {system.executable}"
          f" ({'venv' if system.in_venv else 'not a venv'})")
    for gpu in system.gpus:
        details = ", ".join(x for x in (gpu.gfx, f"driver {gpu.driver}" if gpu.driver else "") if x)
        print(f"GPU    : {gpu.name} [{gpu.vendor}{', ' + details if details else ''}] via {gpu.source}")
    if not system.gpus:
        print("GPU    : none detected")
    for item in system.unknown:
        print(f"Unknown: {item}")
    print("Torch  : " + ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))
    print(f"Target : {target}")


def print_plan(steps: list[Step], title: str | None = None) -> None:
    if title is None:
        title = "Install plan" + (" (commands for you to run)" if any(s.manual for s in steps)
                                  else " (dry run; --install runs these)")
    print(f"\n{title}:")
    for step in steps:
        print(f"  # {step.what}\n  {quote_command(step.argv)}")


def quote_command(argv: list[str]) -> str:
    return " ".join(a if re.fullmatch(r"[\w./:=\\+-]+", a) else f'"{a}"' for a in argv)


def print_verification(v: Verification) -> None:
    print("\nVerification:")
    if not v.device:
        print("  not run: no usable device (see the problems below)")
    else:
        print(f"  device : {v.device}")
    for note in v.notes:
        print(f"  skipped: {note}")
    if v.step_ms is not None:
        print(f"  CRBL training step (crop model, random init, 2 images): {v.step_ms:.0f} ms")
    if v.forward_ms is not None:
        print(f"  CRBL forward (2 images): {v.forward_ms:.0f} ms, probs {v.prob}")
    if v.fallback_ops is not None:
        # One line a user can send us: the ops this torch-directml release lacks.
        print("  DirectML CPU fallbacks (training step + forward): "
              + (", ".join(v.fallback_ops) or "none"))


def verify_and_print(preference: str, image_size: int) -> list[Problem]:
    verification = verify(preference, image_size)
    print_verification(verification)
    return verification.problems


def finish(problems: list[Problem]) -> int:
    """Print the problems with their fixes; exit code 1 when any blocks the chosen route."""
    print_problems(problems)
    return 1 if any(p.severity == "error" for p in problems) else 0


def print_problems(problems: list[Problem]) -> None:
    if not problems:
        print("\nNo problems found.")
        return
    print("\nProblems and fixes:")
    for p in problems:
        print(f"  [{p.severity}] {p.what}")
        if p.fix:
            print(f"      fix: {p.fix}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = parser.add_argument_group("mode (pick one; default: --dry-run)")
    only = mode.add_mutually_exclusive_group()
    for flag, text in (("--check", "report and verify only; print no install commands, install nothing"),
                       ("--dry-run", "report, print the exact pip commands, verify what is installed now"),
                       ("--install", "run the pip commands into this interpreter, then re-check")):
        only.add_argument(flag, dest="mode", action="store_const", const=flag[2:], help=text,
                          default=argparse.SUPPRESS)
    choice = parser.add_argument_group("what to set up")
    choice.add_argument("--target", choices=TARGETS, default="auto",
                        help="requirement set; auto: DirectML on Windows/WSL2, ROCm on Linux with "
                             "an AMD GPU, CUDA with an NVIDIA GPU, else CPU")
    choice.add_argument("--index-url", default="auto",
                        help="package index for the torch build; auto: PyPI, or per target "
                             + ", ".join(f"{k} {v}" for k, v in TORCH_INDEX.items()))
    check = parser.add_argument_group("verification")
    check.add_argument("--device", default="auto",
                       help="device to verify: auto, dml, dml:N, cuda, cuda:N, rocm or cpu")
    check.add_argument("--image-size", type=int, default=64,
                       help="image size of the test forward pass")
    check.add_argument("--no-verify", action="store_true", help="skip the device and forward test")
    args = parser.parse_args(argv)
    args.mode = getattr(args, "mode", "dry-run")
    args.index_url = None if args.index_url == "auto" else args.index_url
    return args


def run_plan(steps: list[Step]) -> None:
    manual = [s for s in steps if s.manual]
    if manual:
        raise SetupError("this interpreter cannot take that setup (see the problems above); "
                         "run the printed commands yourself: " + "; ".join(quote_command(s.argv) for s in manual))
    for step in steps:
        print(f"\n>>> {step.what}: {quote_command(step.argv)}", flush=True)
        code = run_streaming(step.argv)
        if code != 0:
            raise SetupError(f"pip failed (exit {code}) at: {quote_command(step.argv)}; read pip's message "
                             "above, fix it, and run --install again")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        system, versions, reqs = detect_system(), installed_versions(), read_requirements()
        target = choose_target(system, args.target)
        problems = environment_problems(system, versions, target, reqs)
        steps = plan_install(system, versions, target, reqs, args.index_url)
        print_system(system, versions, target)
        if args.mode == "install":
            blocking = [p for p in problems if p.severity == "error" and not p.install_fixes]
            if blocking:
                print_problems(blocking)
                raise SetupError("not installing: fix the errors above first")
            run_plan(steps)
            # Verify in a fresh interpreter: this one may hold stale module state.
            return run_streaming([sys.executable, str(Path(__file__).resolve()), "--check",
                                  "--target", target, "--device", args.device])
        if args.mode == "dry-run":
            print_plan(steps)
        if not args.no_verify:
            problems += verify_and_print(args.device, args.image_size)
        return finish(problems)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
