"""Setup scripts: detection, problems, install plans and verification with faked system answers.

Nothing here installs anything or needs a GPU: subprocess answers, package versions, paths and
the torch_directml module are all fakes. DirectML itself cannot run on Linux CI; these tests are
how its code paths are exercised.
"""
import dataclasses
import json
import sys
import types

import pytest
import torch

import setup_amd_gpu_directml as dml
import setup_amd_gpu_windows as rocm_setup
from setup_amd_gpu_directml import CommandResult, GPU, SystemInfo

REQS = dml.read_requirements()


class FakeRunner:
    """Answers run_command by program name; records every call (argv, env)."""

    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []

    def __call__(self, argv, timeout=30, env=None):
        self.calls.append((list(argv), env))
        answer = self.answers.get(argv[0])
        return CommandResult(0, answer) if isinstance(answer, str) else answer


def make_system(os="windows", python=(3, 12, 4), gpus=(), **kw) -> SystemInfo:
    defaults = dict(os_version="10.0.22631" if os == "windows" else "6.8.0", machine="AMD64",
                    executable=r"C:\crbl\.venv\Scripts\python.exe" if os == "windows" else "/crbl/.venv/bin/python",
                    in_venv=True, site_writable=True)
    defaults.update(kw)
    return SystemInfo(os=os, python=python, gpus=list(gpus), **defaults)


RX6700 = GPU("AMD Radeon RX 6700 XT", "amd", "Win32_VideoController", driver="31.0.24027.1012")
RX7900 = GPU("AMD Radeon RX 7900 XTX", "amd", "Win32_VideoController")
BASIC = GPU("Microsoft Basic Display Adapter", "microsoft", "Win32_VideoController")


@pytest.fixture
def no_install(monkeypatch):
    """Fails the test if anything would be run with pip; records what was asked instead."""
    asked = []
    monkeypatch.setattr(dml, "run_streaming", lambda argv: asked.append(list(argv)) or 0)
    return asked


def run_main(monkeypatch, capsys, system, versions, argv, module=dml):
    monkeypatch.setattr(dml, "detect_system", lambda: system)
    monkeypatch.setattr(dml, "installed_versions", lambda: dict(versions))
    code = module.main(argv)
    return code, capsys.readouterr()


# ------------------------------------------------------------------------------------------
# Detection from faked tool output
# ------------------------------------------------------------------------------------------

WIN_JSON = json.dumps([
    {"Name": "AMD Radeon RX 6700 XT", "AdapterCompatibility": "Advanced Micro Devices, Inc.",
     "DriverVersion": "31.0.24027.1012", "PNPDeviceID": "PCI\\VEN_1002&DEV_73DF&SUBSYS_E4451DA2"},
    {"Name": "Microsoft Basic Render Driver", "AdapterCompatibility": "(Standard display types)",
     "DriverVersion": "10.0.22621.1", "PNPDeviceID": "ROOT\\BasicRender\\0000"}])

LSPCI = """\
00:02.0 VGA compatible controller [0300]: Intel Corporation UHD Graphics 630 [8086:3e92]
03:00.0 VGA compatible controller [0300]: Advanced Micro Devices, Inc. [AMD/ATI] Navi 22 [Radeon RX 6700/6700 XT/6750 XT / 6800M/6850M XT] [1002:73df] (rev c1)
04:00.0 3D controller [0302]: NVIDIA Corporation GA102 [GeForce RTX 3090] [10de:2204] (rev a1)
05:00.0 Audio device [0403]: Advanced Micro Devices, Inc. [AMD/ATI] Navi 21/23 HDMI/DP Audio [1002:ab28]
"""
ROCM_SMI = """\
============================ ROCm System Management Interface ============================
====================================== Product Info ======================================
GPU[0]\t\t: Card series: \t\tNavi 22 [Radeon RX 6700/6700 XT/6750 XT / 6800M/6850M XT]
GPU[0]\t\t: Card vendor: \t\tAdvanced Micro Devices, Inc. [AMD/ATI]
GPU[0]\t\t: GFX Version: \t\tgfx1031
==========================================================================================
"""
ROCM_SMI_OLD = ROCM_SMI.replace("GPU[0]\t\t: GFX Version: \t\tgfx1031\n", "")
ROCMINFO = "Agent 1\n  Name:                    AMD Ryzen 7\nAgent 2\n  Name:                    gfx1031\n"


def test_vendor_of_reads_pci_ids_before_words():
    assert dml.vendor_of("PCI\\VEN_1002&DEV_73DF") == "amd"
    assert dml.vendor_of("Foo [10de:2204]") == "nvidia"
    assert dml.vendor_of("ROOT\\BasicRender Microsoft Basic Render Driver") == "microsoft"
    assert dml.vendor_of("Intel(R) Arc(TM) A770") == "intel"
    assert dml.vendor_of("Some Display") == "unknown"


def test_windows_gpus_from_powershell(monkeypatch):
    runner = FakeRunner({"powershell": WIN_JSON})
    monkeypatch.setattr(dml, "run_command", runner)
    unknown = []
    gpus = dml.detect_gpus_windows(unknown)
    assert [(g.name, g.vendor, g.driver) for g in gpus] == [
        ("AMD Radeon RX 6700 XT", "amd", "31.0.24027.1012"),
        ("Microsoft Basic Render Driver", "microsoft", "10.0.22621.1")]
    assert "Win32_VideoController" in " ".join(runner.calls[0][0]) and unknown == []


def test_windows_single_adapter_json_object_and_missing_powershell(monkeypatch):
    one = json.dumps({"Name": "AMD Radeon RX 7900 XTX", "PNPDeviceID": "PCI\\VEN_1002&DEV_744C"})
    monkeypatch.setattr(dml, "run_command", FakeRunner({"powershell": one}))
    assert [g.vendor for g in dml.detect_gpus_windows([])] == ["amd"]
    monkeypatch.setattr(dml, "run_command", FakeRunner({}))
    unknown = []
    assert dml.detect_gpus_windows(unknown) == [] and "Device Manager" in unknown[0]


def test_linux_gpus_merge_lspci_rocm_smi_nvidia_smi(monkeypatch):
    monkeypatch.setattr(dml, "run_command", FakeRunner({
        "lspci": LSPCI, "rocm-smi": ROCM_SMI, "nvidia-smi": "NVIDIA GeForce RTX 3090, 550.54.14\n"}))
    unknown = []
    gpus = dml.detect_gpus_linux(unknown)
    assert [(g.vendor, g.gfx, g.driver) for g in gpus] == [
        ("intel", "", ""), ("amd", "gfx1031", ""), ("nvidia", "", "550.54.14")]
    assert gpus[1].name.startswith("Advanced Micro Devices") and "[1002" not in gpus[1].name
    assert "rocm-smi" in gpus[1].source and unknown == []


def test_linux_gfx_from_rocminfo_without_the_override(monkeypatch):
    runner = FakeRunner({"rocm-smi": ROCM_SMI_OLD, "rocminfo": ROCMINFO})
    monkeypatch.setattr(dml, "run_command", runner)
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "10.3.0")
    unknown = []
    gpus = dml.detect_gpus_linux(unknown)  # no lspci: vendor tools only
    assert [(g.name.split()[0], g.gfx) for g in gpus] == [("Navi", "gfx1031")]
    env = next(env for argv, env in runner.calls if argv[0] == "rocminfo")
    assert "HSA_OVERRIDE_GFX_VERSION" not in env  # so rocminfo reports the real ISA
    assert any("lspci" in u for u in unknown)


def test_linux_says_when_driver_tools_are_missing(monkeypatch):
    monkeypatch.setattr(dml, "run_command", FakeRunner({"lspci": LSPCI}))
    unknown = []
    dml.detect_gpus_linux(unknown)
    assert any("rocm-smi not found" in u for u in unknown)
    assert any("nvidia-smi not found" in u for u in unknown)


def test_detect_system_on_faked_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(dml.platform, "version", lambda: "10.0.19045")
    monkeypatch.setattr(dml, "run_command", FakeRunner({"powershell": WIN_JSON}))
    system = dml.detect_system()
    assert system.os == "windows" and system.os_version == "10.0.19045"
    assert [g.vendor for g in system.gpus] == ["amd", "microsoft"]
    assert dml.choose_target(system) == "directml"


def test_this_machine_runs_cleanly(capsys):
    assert dml.main(["--check", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "Python : 3." in out and "Target : " in out and "Install plan" not in out


# ------------------------------------------------------------------------------------------
# Requirements file and targets
# ------------------------------------------------------------------------------------------

def test_requirements_file_pins_the_directml_stack():
    assert dml.torch_specs(REQS, windows_directml=True) == [
        "torch==2.4.1", "torchvision==0.19.1", "torch-directml==0.2.5.dev240914"]
    generic = dml.torch_specs(REQS, windows_directml=False)
    assert generic == ["torch>=2.4,<=2.14.1", "torchvision>=0.19,<=0.29.1"]
    names = {r.name for r in REQS}
    assert {"timm", "safetensors", "h5py", "numpy", "pillow", "scikit-learn"} <= names


@pytest.mark.parametrize("system, target", [
    (make_system("windows", gpus=[RX6700]), "directml"),
    (make_system("linux", gpus=[GPU("Navi 22", "amd", "lspci")]), "rocm"),
    (make_system("linux", gpus=[GPU("GA102", "nvidia", "lspci")]), "cuda"),
    (make_system("linux", wsl=True, dxg=True), "directml"),
    (make_system("linux"), "cpu"),
    (make_system("darwin"), "cpu"),
])
def test_auto_target(system, target):
    assert dml.choose_target(system) == target


# ------------------------------------------------------------------------------------------
# Problems: Python 3.13, torch clash, adapters
# ------------------------------------------------------------------------------------------

def test_python_313_with_directml_is_an_error_with_a_312_venv_fix():
    system = make_system("windows", python=(3, 13, 1), gpus=[RX6700])
    problems = dml.environment_problems(system, {}, "directml", REQS)
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1 and "3.13.1" in errors[0].what and "3.8-3.12" in errors[0].what
    assert "Python 3.12" in errors[0].fix
    steps = dml.plan_install(system, {}, "directml", REQS)
    assert all(s.manual for s in steps)
    assert steps[0].argv == ["py", "-3.12", "-m", "venv", ".venv"]
    assert steps[1].argv[-2:] == ["-r", str(dml.REQUIREMENTS)]


def test_python_313_install_is_refused_without_running_pip(monkeypatch, capsys, no_install):
    system = make_system("windows", python=(3, 13, 0), gpus=[RX6700])
    code, out = run_main(monkeypatch, capsys, system, {}, ["--install", "--no-verify"])
    assert code == 2 and no_install == []
    assert "not installing" in out.err and "3.13.0" in out.out


def test_torch_clash_with_torch_directml():
    system = make_system("windows", gpus=[RX6700])
    versions = {"torch": "2.5.1+cpu", "torchvision": "0.20.1", "torch-directml": "0.2.5.dev240914"}
    problems = dml.environment_problems(system, versions, "directml", REQS)
    clash = [p for p in problems if "2.5.1" in p.what]
    assert len(clash) == 1 and clash[0].severity == "error" and clash[0].install_fixes
    assert "torch==2.4.1" in clash[0].fix and "torch-directml==0.2.5.dev240914" in clash[0].fix
    for fine in ("2.4.1", "2.4.1+cpu"):  # a local build label still satisfies torch==2.4.1
        ok = dict(versions, torch=fine)
        assert not [p for p in dml.environment_problems(system, ok, "directml", REQS) if p.severity == "error"]


def test_torch_clash_is_repaired_by_install(monkeypatch, capsys, no_install):
    system = make_system("windows", gpus=[RX6700])
    versions = {"torch": "2.5.1", "torch-directml": "0.2.5.dev240914"}
    code, out = run_main(monkeypatch, capsys, system, versions, ["--install"])
    assert code == 0
    assert no_install[0] == [system.executable, "-m", "pip", "install", "-r", str(dml.REQUIREMENTS)]
    assert no_install[1][1:] == [str(dml.REQUIREMENTS.parent / "setup_amd_gpu_directml.py"), "--check",
                                 "--target", "directml", "--device", "auto"]


def test_only_basic_display_adapter_and_old_windows():
    system = make_system("windows", gpus=[BASIC], os_version="10.0.15063")
    whats = " | ".join(p.what for p in dml.environment_problems(system, {}, "directml", REQS))
    assert "Basic Display" in whats and "15063" in whats


def test_directml_on_plain_linux_points_to_rocm():
    problems = dml.environment_problems(make_system("linux"), {}, "directml", REQS)
    assert any("setup_amd_gpu_windows.py" in p.fix for p in problems if p.severity == "error")


# ------------------------------------------------------------------------------------------
# --dry-run command generation
# ------------------------------------------------------------------------------------------

def test_dry_run_windows_directml(monkeypatch, capsys, no_install):
    system = make_system("windows", gpus=[RX6700])
    code, out = run_main(monkeypatch, capsys, system, {}, ["--no-verify"])
    assert no_install == [] and code == 0
    assert f'{system.executable} -m pip install -r {dml.REQUIREMENTS}' in out.out.replace('"', "")


def test_dry_run_linux_rocm_replaces_a_cuda_torch(monkeypatch, capsys, no_install):
    system = make_system("linux", gpus=[GPU("Navi 22", "amd", "lspci", gfx="gfx1031")])
    code, out = run_main(monkeypatch, capsys, system, {"torch": "2.14.1", "torchvision": "0.29.1"},
                         ["--dry-run", "--no-verify"])
    assert no_install == [] and code == 0
    lines = [l.strip() for l in out.out.splitlines() if l.strip().startswith(system.executable)]
    assert lines == [
        f"{system.executable} -m pip uninstall -y torch torchvision",
        f'{system.executable} -m pip install --index-url {dml.TORCH_INDEX["rocm"]} '
        f'"torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"',
        f"{system.executable} -m pip install -r {dml.REQUIREMENTS}"]


def test_plan_keeps_a_fitting_torch_and_uses_user_outside_a_venv():
    system = make_system("linux", gpus=[GPU("GA102", "nvidia", "lspci")], in_venv=False, site_writable=False)
    steps = dml.plan_install(system, {"torch": "2.14.1"}, "cuda", REQS)
    assert [s.argv[3:] for s in steps] == [["install", "--user", "-r", str(dml.REQUIREMENTS)]]


def test_plan_windows_cuda_leaves_the_directml_pins_out():
    steps = dml.plan_install(make_system("windows"), {}, "cuda", REQS)
    assert steps[0].argv[4:] == ["--index-url", dml.TORCH_INDEX["cuda"],
                                 "torch>=2.4,<=2.14.1", "torchvision>=0.19,<=0.29.1"]
    assert "-r" not in steps[1].argv and not any("torch" in a for a in steps[1].argv[4:])
    assert "timm>=1.0.9" in steps[1].argv


def test_plan_wsl_directml_installs_pins_then_file():
    steps = dml.plan_install(make_system("linux", wsl=True, dxg=True), {}, "directml", REQS)
    assert steps[0].argv[4:] == ["torch==2.4.1", "torchvision==0.19.1", "torch-directml==0.2.5.dev240914"]
    assert steps[1].argv[4:] == ["-r", str(dml.REQUIREMENTS)]


# ------------------------------------------------------------------------------------------
# Verification with an injected fake torch_directml
# ------------------------------------------------------------------------------------------

def fake_torch_directml(count=1, name="AMD Radeon RX 6700 XT"):
    module = types.ModuleType("torch_directml")
    module.device_count = lambda: count
    module.device = lambda index=0: torch.device("cpu")  # tensors really live on the CPU
    module.device_name = lambda index=0: name
    return module


def test_verify_picks_directml_and_runs_a_forward_pass(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_directml", fake_torch_directml())
    result = dml.verify("auto", image_size=32)
    assert result.problems == []
    assert result.device.startswith("dml") and "RX 6700 XT" in result.device
    assert len(result.prob) == 2 and all(0.0 < p < 1.0 for p in result.prob)
    assert result.forward_ms is not None and result.forward_ms > 0


def test_verify_reports_no_dx12_adapter(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_directml", fake_torch_directml(count=0))
    result = dml.verify("dml", image_size=32)
    assert result.device == "" and len(result.problems) == 1
    assert "0 available" in result.problems[0].what and "dxdiag" in result.problems[0].fix


def test_verify_falls_back_to_cpu_with_notes_when_directml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_directml", None)  # import torch_directml -> ImportError
    result = dml.verify("auto", image_size=32, auto_order=("dml", "cpu"))
    assert result.device.startswith("cpu") and result.problems == []
    assert result.notes and result.notes[0].startswith("dml:")


# ------------------------------------------------------------------------------------------
# ROCm script
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gfx, version, value", [
    ("gfx1031", (10, 3, 1), "10.3.1"), ("gfx1100", (11, 0, 0), "11.0.0"),
    ("gfx90a", (9, 0, 10), "9.0.10"), ("gfx942:sramecc+:xnack-", (9, 4, 2), "9.4.2")])
def test_gfx_version(gfx, version, value):
    assert rocm_setup.gfx_version(gfx) == version and rocm_setup.override_value(gfx) == value


TARGETS = ["gfx1030", "gfx1100", "gfx90a"]


@pytest.mark.parametrize("gfx, current, severity, needle", [
    ("gfx1031", None, "warning", "export HSA_OVERRIDE_GFX_VERSION=10.3.0"),   # helps
    ("gfx1031", "10.3.0", "info", "usual workaround"),
    ("gfx1031", "11.0.0", "error", "export HSA_OVERRIDE_GFX_VERSION=10.3.0"),  # wrong value
    ("gfx1100", None, "info", "no override needed"),
    ("gfx1100", "10.3.0", "error", "unset HSA_OVERRIDE_GFX_VERSION"),          # hurts a supported card
    ("gfx1151", None, "error", "DirectML"),                                    # no family member
    ("gfx1151", "11.0.0", "error", "unset HSA_OVERRIDE_GFX_VERSION"),
])
def test_hsa_override_advice(gfx, current, severity, needle):
    advice = rocm_setup.hsa_override_advice(gfx, TARGETS, current)
    assert advice.severity == severity
    assert needle in advice.what + " " + advice.fix


def test_hsa_override_advice_says_when_targets_are_assumed():
    advice = rocm_setup.hsa_override_advice("gfx1031", list(rocm_setup.ASSUMED_TORCH_TARGETS), None,
                                            assumed=True)
    assert "assumed" in advice.what and "10.3.0" in advice.fix


@pytest.mark.parametrize("name, arch, windows_ok", [
    ("AMD Radeon RX 7900 XTX", "RDNA3", True), ("AMD Radeon RX 9070 XT", "RDNA4", True),
    ("AMD Radeon RX 6700 XT", "RDNA2", False)])
def test_amd_family_from_name(name, arch, windows_ok):
    found = rocm_setup.amd_family_from_name(name)
    assert found[0] == arch and found[2] is windows_ok
    assert rocm_setup.amd_family_from_name("AMD Radeon Pro WX 9100 X") is None


def test_rocm_windows_next_steps(monkeypatch, capsys):
    monkeypatch.setattr(rocm_setup, "probe_rocm_torch", lambda: rocm_setup.RocmTorch())
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION", raising=False)
    system = make_system("windows", python=(3, 11, 9), gpus=[RX7900], in_venv=False)
    code, out = run_main(monkeypatch, capsys, system, {}, [], module=rocm_setup)
    assert code == 0  # only warnings: wrong Python is fixed by the new venv
    text = out.out.replace('"', "")
    assert "py -3.12 -m venv .venv-rocm" in text
    assert ("-m pip install --pre --index-url https://rocm.nightlies.amd.com/v2/gfx110X-all/ "
            "torch>=2.4,<=2.14.1") in text
    assert "torch-directml" not in text.split("Next steps")[1].split("Problems")[0]
    assert "Unknown: driver" in text and "compatibility matrix" in text  # says what it cannot detect


def test_rocm_windows_rdna2_points_to_directml(monkeypatch, capsys):
    monkeypatch.setattr(rocm_setup, "probe_rocm_torch", lambda: rocm_setup.RocmTorch())
    code, out = run_main(monkeypatch, capsys, make_system("windows", gpus=[RX6700]), {}, [],
                         module=rocm_setup)
    assert code == 1 and "setup_amd_gpu_directml.py" in out.out and "RDNA2" in out.out


def test_rocm_linux_gfx1031_with_rocm_torch(monkeypatch, capsys):
    monkeypatch.setattr(rocm_setup, "probe_rocm_torch",
                        lambda: rocm_setup.RocmTorch(hip="6.4.1", targets=TARGETS, device_gfx="gfx1031"))
    monkeypatch.setattr(dml, "path_exists", lambda path: path == "/dev/kfd")
    monkeypatch.setattr(rocm_setup, "can_open", lambda path: True)
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION", raising=False)
    system = make_system("linux", gpus=[GPU("Navi 22", "amd", "lspci + rocm-smi", gfx="gfx1031")])
    code, out = run_main(monkeypatch, capsys, system, {"torch": "2.9.1+rocm6.4"}, ["--no-verify"],
                         module=rocm_setup)
    assert code == 0 and "export HSA_OVERRIDE_GFX_VERSION=10.3.0" in out.out
    assert "Next steps" not in out.out  # a ROCm torch is there already


def test_rocm_linux_cuda_torch_and_no_kfd_access(monkeypatch, capsys):
    monkeypatch.setattr(rocm_setup, "probe_rocm_torch", lambda: rocm_setup.RocmTorch())
    monkeypatch.setattr(dml, "path_exists", lambda path: True)
    monkeypatch.setattr(rocm_setup, "can_open", lambda path: False)
    system = make_system("linux", gpus=[GPU("Navi 31", "amd", "rocm-smi", gfx="gfx1100")])
    code, out = run_main(monkeypatch, capsys, system, {"torch": "2.14.1"}, [], module=rocm_setup)
    assert code == 1
    assert "usermod -aG render,video" in out.out and "not a ROCm build" in out.out
    assert f"--index-url {dml.TORCH_INDEX['rocm']}" in out.out


def test_rocm_windows_uses_the_shared_plan():
    steps = rocm_setup.next_steps(make_system("windows", gpus=[RX7900]), {}, REQS, "gfx110X-all", None)
    expected = dml.plan_install(dataclasses.replace(make_system("windows"), executable=r".venv-rocm\Scripts\python.exe"),
                                {}, "rocm", REQS, "X")
    assert steps[-2].argv[3:] == expected[-1].argv[3:]
