"""Where and how the Keras stages run: device, backend, precision and distribution, decided here only.

The plan (stdlib only, so `make` can ask it before any package is installed, with any python3):
    IMGCLS_DEVICE=auto (default): by the NVIDIA driver and the GPUs that `nvidia-smi` reports,
        gpu-cuda13 (driver 580.65.06+, compute capability 7.5+): requirements-gpu-cuda13.txt, constraints-cuda13.txt;
        gpu-cuda12 (driver 525.60.13+, compute capability 5.2+): requirements-gpu-cuda12.txt, constraints-cuda12.txt;
        cpu (older, or no working nvidia-smi): requirements.txt, and the plan says why.
    IMGCLS_DEVICE=cpu or gpu forces one (`make run DEVICE=cpu` sets it).
    GPU: JAX with CUDA from pip (the constraints pin every CUDA library) and KERAS_BACKEND=jax.
    CPU: KERAS_BACKEND=tensorflow, measured faster than JAX for both trainers on the CPUs
         tried (README, "Choosing the backend").
A user's own KERAS_BACKEND always wins, and so does a JAX_PLATFORMS without the GPU.

    PYTHONPATH=scripts python3 -m imgcls.device                  # prints the plan and why (`make env`)
    PYTHONPATH=scripts python3 -m imgcls.device --stack          # cpu, gpu-cuda12 or gpu-cuda13
    PYTHONPATH=scripts python3 -m imgcls.device --pip-arguments  # what `make setup` installs

Each Keras stage calls `choose_backend()` before Keras is imported; the
trainers then call `distribute` (which first checks that JAX really runs on
the GPU the plan chose), `resolve_precision` and `describe` (which need Keras
and the backend's view of the devices).
"""

from __future__ import annotations  # the plan runs on whatever python3 a machine has, 3.8 included

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from imgcls.errors import UserError

DEVICE_VARIABLE = "IMGCLS_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "gpu")
# What each CUDA major version's wheels need, newest CUDA first: (stack, oldest NVIDIA driver on
# Linux, oldest compute capability). Drivers: NVIDIA's CUDA Toolkit release notes ("CUDA Toolkit and
# Corresponding Driver Versions": 580.65.06 for CUDA 13.0 GA, 525.60.13 for CUDA 12.0 GA, the floor
# of CUDA 12.x's minor version compatibility) and JAX's installation guide ("the driver version must
# be >= 525 for CUDA 12 on Linux, and >= 580 for CUDA 13"); the same guide gives the GPUs: SM 7.5
# or newer on CUDA 13 (NVIDIA dropped the older ones), 5.2 on CUDA 12.
CUDA_STACKS = (("gpu-cuda13", "580.65.06", 7.5), ("gpu-cuda12", "525.60.13", 5.2))
REQUIREMENTS = {"cpu": "requirements.txt", "gpu-cuda12": "requirements-gpu-cuda12.txt",
                "gpu-cuda13": "requirements-gpu-cuda13.txt"}
CONSTRAINTS = {"gpu-cuda12": "constraints-cuda12.txt", "gpu-cuda13": "constraints-cuda13.txt"}
BACKENDS = {"cpu": "tensorflow", "gpu": "jax"}
NVIDIA_SMI_SECONDS = 30  # a hung driver makes nvidia-smi wait forever
# JAX keeps compiled programs here, so a second run of a stage does not compile its steps again.
COMPILATION_CACHE = Path(".cache/jax")
# The most of an accelerator's free memory a training set may keep for itself (fits_on_device):
# the gear photos at 160 px (100 MB) or CIFAR-10 at 32 px (150 MB) take a thousandth of an H200's.
RESIDENT_SHARE = 0.1
# Keras' own multi-host settings (keras.distribution.initialize reads them).
MULTI_HOST_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                        "KERAS_DISTRIBUTION_PROCESS_ID")


class DeviceError(UserError):
    """A device setting that cannot work here; the message says what to do."""


def nvidia_smi() -> tuple[list[dict], str]:
    """The GPUs a working `nvidia-smi` lists, [{"name", "compute_capability": 9.0, "driver": "580.82.07"}],
    and, when it lists none, why: no nvidia-smi, a failure, a timeout, or output that is not a listing."""
    if shutil.which("nvidia-smi") is None:
        return [], "no nvidia-smi on PATH"
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=NVIDIA_SMI_SECONDS)
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi did not answer within {NVIDIA_SMI_SECONDS} s"
    except OSError as error:
        return [], f"nvidia-smi could not run ({error})"
    said = (listing.stdout.strip() or listing.stderr.strip() or "no output").splitlines()[0][:200]
    if listing.returncode != 0:  # installed but no driver or no device: not a usable GPU
        return [], f"nvidia-smi failed (exit {listing.returncode}: {said})"
    gpus = []
    for line in listing.stdout.strip().splitlines():
        fields = [field.strip() for field in line.rsplit(",", 2)]  # a name may hold a comma, the numbers do not
        if len(fields) == 3 and fields[1].replace(".", "", 1).isdigit() and driver_version(fields[2]):
            gpus.append({"name": fields[0], "compute_capability": float(fields[1]), "driver": fields[2]})
    return gpus, "" if gpus else f"nvidia-smi lists no GPU that can be read ({said})"


def nvidia_gpus() -> list[dict]:
    """The GPUs a working `nvidia-smi` lists (nvidia_smi), or []."""
    return nvidia_smi()[0]


def driver_version(text: str) -> tuple[int, ...] | None:
    """(580, 82, 7) for "580.82.07"; None for anything that is not a version."""
    parts = text.strip().split(".")
    return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else None


def _needs(stack: str, driver: str, capability: float) -> str:
    return f"CUDA {stack[-2:]} needs driver {driver} and compute capability {capability:g} or newer"


def cuda_stack(driver: str, capability: float) -> tuple[str, str]:
    """The stack for a driver version and the GPUs' (lowest) compute capability, and why: the newest CUDA both run."""
    found = f"driver {driver}, compute capability {capability:g}"
    for stack, oldest_driver, oldest_capability in CUDA_STACKS:
        if driver_version(driver) >= driver_version(oldest_driver) and capability >= oldest_capability:
            why = f"{found}: CUDA {stack[-2:]}"
            return stack, why if stack == CUDA_STACKS[0][0] else f"{why}, as {_needs(*CUDA_STACKS[0])}"
    advice = "; update the NVIDIA driver to train on the GPU" if capability >= CUDA_STACKS[-1][2] else ""
    return "cpu", f"{found}: too old for JAX's CUDA wheels ({', '.join(_needs(*s) for s in CUDA_STACKS)}){advice}"


def plan() -> dict:
    """Which stack this machine gets and why:
    {"device", "stack", "gpus", "driver", "requirements", "constraints", "keras_backend", "reason"}."""
    requested = os.environ.get(DEVICE_VARIABLE, "auto") or "auto"
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"{DEVICE_VARIABLE}={requested!r}: must be one of {', '.join(DEVICE_CHOICES)}"
                          " (e.g. `make run DEVICE=cpu`)")
    gpus, problem = nvidia_smi()
    driver = gpus[0]["driver"] if gpus else None
    capability = min((gpu["compute_capability"] for gpu in gpus), default=0.0)
    stack, found = cuda_stack(driver, capability) if gpus else ("cpu", problem)
    if gpus:
        found = f"nvidia-smi lists {len(gpus)} GPU(s); {found}"
    if requested == "auto":
        reason = f"{found}; {DEVICE_VARIABLE}=auto"
    else:
        reason = f"{DEVICE_VARIABLE}={requested}; {found}"
        if requested == "cpu":
            stack = "cpu"
        elif stack == "cpu":  # GPU forced: CUDA 12 for a driver too old for either (JAX will say so), else the newest
            stack = "gpu-cuda12" if driver else CUDA_STACKS[0][0]
    device = "cpu" if stack == "cpu" else "gpu"
    backend = os.environ.get("KERAS_BACKEND") or BACKENDS[device]
    if os.environ.get("KERAS_BACKEND"):
        reason += f"; KERAS_BACKEND={backend} set by the user"
    return {"device": device, "stack": stack, "gpus": gpus, "driver": driver, "requirements": REQUIREMENTS[stack],
            "constraints": CONSTRAINTS.get(stack), "keras_backend": backend, "reason": reason}


def pip_arguments(chosen: dict) -> str:
    """What `make setup` hands `pip install` for a plan: "-r requirements-gpu-cuda13.txt -c constraints-cuda13.txt"."""
    return f"-r {chosen['requirements']}" + (f" -c {chosen['constraints']}" if chosen["constraints"] else "")


def choose_backend(required: str | None = None) -> str:
    """Set KERAS_BACKEND for this stage (before Keras is imported) and return it.

    `required` pins a backend a stage cannot do without (export: TensorFlow for
    TFLite). On the GPU plan, JAX must have its CUDA plugin installed: without it
    JAX would quietly train on the CPU.
    """
    if required:
        os.environ["KERAS_BACKEND"] = required
        return required
    chosen = plan()
    backend = chosen["keras_backend"]
    if chosen["device"] == "gpu" and backend == "jax" and not _jax_cuda_plugins():
        raise DeviceError("this machine has a GPU but JAX's CUDA plugin is not installed: run `make setup` (it"
                          f" installs {chosen['requirements']} here), or set IMGCLS_DEVICE=cpu to train on the CPU.")
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        COMPILATION_CACHE.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE.resolve()))
        # Cache every compiled step, however quick it was to compile.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return backend


def _jax_cuda_plugins() -> list[str]:
    """The CUDA major versions of JAX's CUDA plugins installed here: ["13"], ["12"] or []."""
    return [major for major in ("13", "12") if importlib.util.find_spec(f"jax_cuda{major}_plugin") is not None]


# ----- From here on Keras is imported: the trainers call these once the backend is chosen. -----

def accelerators() -> list:
    """The backend's devices this process can use: GPUs if any, else the CPU device(s)."""
    import keras

    if keras.backend.backend() != "jax":
        return []  # Keras distributes only on JAX; other backends run on their default device
    import jax

    return jax.local_devices()


def compile_on_jax(model):
    """Let Keras XLA-compile `model`'s steps on JAX although it holds random rotations, zooms or shifts; returns it.

    Keras marks those layers as not compilable (supports_jit False) because
    TensorFlow's image-transform op has no XLA kernel. On JAX they are plain
    jax.numpy and compile like any other layer, but the mark alone makes Keras
    run every training and prediction step of the whole model eagerly, op by op:
    on a GPU, most of the step time. Call it wherever such a layer is made: when
    a model is built, copied from its config, or loaded.
    """
    import keras

    from imgcls import keras_internals

    if keras.backend.backend() == "jax":
        pending = [model]
        while pending:
            layer = pending.pop()
            if isinstance(layer, (keras.layers.RandomRotation, keras.layers.RandomZoom, keras.layers.RandomTranslation)):
                keras_internals.allow_jit(layer)
            pending.extend(getattr(layer, "layers", []))
        if isinstance(model, keras.Model):
            # Loading reads every attribute, so a loaded model has already settled on False: ask again.
            model.jit_compile = True
    return model


def _multi_host() -> bool:
    return all(os.environ.get(name) for name in MULTI_HOST_VARIABLES)


def resolve_precision(setting: str, devices: list | None = None) -> str:
    """The mixed-precision policy for `setting`: `auto` is bfloat16 when every device is a GPU of compute
    capability 8.0 or higher (Ampere and later: fast bfloat16 matrix units), float32 ("none") anywhere
    else, the CPU included; any other setting is kept as it is. `devices` defaults to accelerators()."""
    if setting != "auto":
        return setting
    devices = accelerators() if devices is None else devices
    capable = [device for device in devices if device.platform == "gpu"
               and float(getattr(device, "compute_capability", 0) or 0) >= 8.0]
    return "bfloat16" if devices and len(capable) == len(devices) else "none"


def distribute(setting: str, batch_sizes: dict[str, int]) -> int:
    """Spread training over every local accelerator (`auto`, when there are several) or not (`none`).

    Returns the number of replicas each batch is split across. Data-parallel
    training needs every global batch size to divide by it: each one that does
    not stops the stage here, named by its params key (`batch_sizes` maps keys to
    values), rather than as a sharding error inside the first step. With Keras'
    multi-host variables set, keras.distribution.initialize() first joins the
    processes of every host, and each process feeds its own slice of each batch.
    On the GPU plan it then checks that JAX runs on the GPU (check_accelerator).
    """
    if setting not in ("auto", "none"):
        raise DeviceError(f"distribution must be auto or none, got {setting!r}")
    import keras

    if keras.backend.backend() != "jax":
        return 1
    if setting == "auto" and _multi_host():
        keras.distribution.initialize()
    check_accelerator()  # after joining the other hosts: that must come before anything touches the devices
    if setting == "none":
        return 1
    import jax

    devices = jax.devices()  # every process's devices: the global mesh
    if len(devices) < 2:
        return 1
    problems = [f"{key} = {size}" for key, size in batch_sizes.items() if size % len(devices)]
    if problems:
        raise DeviceError(f"{', '.join(problems)}: data-parallel training splits each batch across"
                          f" {len(devices)} devices, so a batch size must be a multiple of {len(devices)}"
                          " (or set distribution: none in params.yaml to train on one device).")
    # auto_shard_dataset=False: each process's batches already hold only its own slice (ImageBatches).
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    return len(devices)


def check_accelerator() -> None:
    """On the GPU plan, stop the stage unless JAX runs on the GPU.

    When its CUDA plugin cannot start (a driver too old for its CUDA, a library
    missing), JAX warns "falling back to cpu" and trains on the CPU, many times
    slower, or raises "Unable to initialize backend 'cuda'" with a traceback:
    both become one message that says what to do. A JAX_PLATFORMS without the
    GPU is the user's choice, and is kept.
    """
    chosen = plan()
    platforms = set(filter(None, os.environ.get("JAX_PLATFORMS", "").split(",")))
    if chosen["device"] != "gpu" or chosen["keras_backend"] != "jax" or platforms and not platforms & {"cuda", "gpu"}:
        return
    import jax

    try:
        backend, cause = jax.default_backend(), ""
    except Exception as error:  # RuntimeError "Unable to initialize backend 'cuda'", or worse
        backend, cause = "", _first_line(error)
    if backend in ("gpu", "cuda"):
        return
    if not cause:
        try:
            jax.devices("cuda")
            cause = "JAX lists no CUDA device"
        except Exception as error:  # why the CUDA backend did not start, as JAX recorded it
            cause = _first_line(error)
    driver = f"NVIDIA driver {chosen['driver']}" if chosen["driver"] else "no driver version from nvidia-smi"
    outcome = f"JAX fell back to the {backend.upper()}" if backend else "JAX could not start"
    installed, planned = _jax_cuda_plugins(), chosen["stack"][-2:]
    if installed and planned not in installed:  # e.g. the CUDA 13 image on a machine whose driver runs CUDA 12
        cause += (f"; JAX's CUDA {' and '.join(installed)} plugin is installed here, the driver needs CUDA {planned}"
                  f" ({chosen['requirements']} with {chosen['constraints']})")
    raise DeviceError(f"this machine is planned to train on the GPU ({chosen['stack']}, {driver}), but {outcome}:"
                      f" {cause}. Check `nvidia-smi` and `make env`, and run `make setup` again after a driver"
                      " update; or train on the CPU on purpose: `make run DEVICE=cpu` (IMGCLS_DEVICE=cpu for one"
                      " script).")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [f"{type(error).__name__} in JAX"])[0][:300]


def process_slice() -> tuple[int, int]:
    """(index, count) of this process among the hosts training together; (0, 1) on one host."""
    import keras

    if keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def fits_on_device(nbytes: int, devices: list | None = None) -> bool:
    """Whether an array of `nbytes` (a stage's training images) should stay on the accelerator all stage.

    Then each batch is gathered on the device from the resident copy, and only
    its indices cross from the host (ImageBatches). Worth it on a GPU, where
    the host-to-device copy is what the step would wait for; on a CPU the
    "device" is host memory already. Only in one process: several hosts each
    hand Keras their own slice of a batch as host memory. The array may take
    at most RESIDENT_SHARE of the first device's free memory, leaving the rest
    to the model, its activations and the other split.
    """
    devices = accelerators() if devices is None else devices
    if not devices or devices[0].platform == "cpu" or process_slice()[1] > 1:
        return False
    stats = devices[0].memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return nbytes <= RESIDENT_SHARE * free


def describe(precision: str, replicas: int, global_batch: int) -> dict:
    """What a training stage ran on, for its printout, train.json and the model card."""
    import keras

    devices = accelerators()
    if devices and devices[0].platform == "gpu":
        names = sorted({device.device_kind for device in devices})
        hardware = f"{len(devices)} × {' + '.join(names)}"
    else:
        hardware = cpu_model()
        if len(devices) > 1:
            hardware += f" ({len(devices)} devices)"
    index, processes = process_slice()
    return {
        "backend": keras.backend.backend(),
        "devices": hardware,
        "precision": "float32" if precision == "none" else precision,
        "distribution": "data-parallel" if replicas > 1 else "none",
        "replicas": replicas,
        "processes": processes,
        "global_batch": global_batch,
    }


def summary(report: dict) -> str:
    """One line: "backend jax, 4 × NVIDIA H200, bfloat16, data-parallel, global batch 512"."""
    text = f"backend {report['backend']}, {report['devices']}, {report['precision']}"
    if report["replicas"] > 1:
        text += f", data-parallel over {report['replicas']} devices"
        if report["processes"] > 1:
            text += f" on {report['processes']} hosts"
    return text + f", global batch {report['global_batch']}"


def cpu_model() -> str:
    """The CPU's model name as `lscpu` gives it, its widest vector unit and its cores.

    Timings mean little without it: the same epoch ran 10x slower on a 2-core AVX2
    machine than on a 2-core AVX-512 BF16 one.
    """
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if not name:
        name = platform.processor() or platform.machine()
    vector = next((label for flag, label in (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                             ("avx2", "AVX2")) if flag in flags), "")
    return f"{name}, {vector + ', ' if vector else ''}{os.cpu_count()} cores"


def main(arguments: list[str]) -> int:
    try:
        chosen = plan()
    except DeviceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments == ["--pip-arguments"]:
        print(pip_arguments(chosen))
    elif arguments == ["--stack"]:
        print(chosen["stack"])
    elif not arguments:
        gpus = ", ".join(f"{gpu['name']} (compute capability {gpu['compute_capability']:g})" for gpu in chosen["gpus"])
        install = chosen["requirements"] + (f" with {chosen['constraints']}" if chosen["constraints"] else "")
        print(f"device:        {chosen['device']} ({chosen['reason']})")
        print(f"stack:         {chosen['stack']}")
        print(f"GPUs:          {gpus or 'none'}")
        print(f"driver:        {chosen['driver'] or 'none'}")
        print(f"CPU:           {cpu_model()}")
        print(f"install:       {install}")
        print(f"KERAS_BACKEND: {chosen['keras_backend']} (export always uses tensorflow, for TFLite)")
        print(f"multi-host:    {'yes: ' + os.environ['KERAS_DISTRIBUTION_JOB_ADDRESSES'] if _multi_host() else 'no'}")
    else:
        print("usage: device.py [--stack | --pip-arguments]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
