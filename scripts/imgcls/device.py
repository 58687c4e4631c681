"""Where and how the Keras stages run: device, backend, precision and distribution, decided here only.

The plan (stdlib only, so `make` can ask it before any package is installed):
    IMGCLS_DEVICE=auto (default): the GPU stack when `nvidia-smi` lists a GPU, else the CPU.
    IMGCLS_DEVICE=cpu or gpu forces one (`make run DEVICE=cpu` sets it).
    GPU: requirements-gpu.txt (JAX with CUDA from pip) and KERAS_BACKEND=jax.
    CPU: requirements.txt and KERAS_BACKEND=tensorflow, measured faster than JAX
         for both trainers on the CPUs tried (README, "Choosing the backend").
A user's own KERAS_BACKEND always wins.

    PYTHONPATH=scripts python3 -m imgcls.device                 # prints the plan (`make env`)
    PYTHONPATH=scripts python3 -m imgcls.device --requirements  # the file `make setup` installs

Each Keras stage calls `choose_backend()` before Keras is imported; the
trainers then call `resolve_precision`, `distribute` and `describe` (which
need Keras and the backend's view of the devices).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from imgcls.errors import UserError

DEVICE_VARIABLE = "IMGCLS_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "gpu")
REQUIREMENTS = {"cpu": "requirements.txt", "gpu": "requirements-gpu.txt"}
BACKENDS = {"cpu": "tensorflow", "gpu": "jax"}
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


def nvidia_gpus() -> list[dict]:
    """The GPUs a working `nvidia-smi` lists: [{"name": ..., "compute_capability": 9.0}], or []."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:  # installed but no driver or no device: not a usable GPU
        return []
    gpus = []
    for line in listing.stdout.strip().splitlines():
        name, _, capability = line.rpartition(",")
        try:
            gpus.append({"name": name.strip(), "compute_capability": float(capability)})
        except ValueError:
            continue
    return gpus


def plan() -> dict:
    """Which stack this machine gets: {"device", "gpus", "requirements", "keras_backend", "reason"}."""
    requested = os.environ.get(DEVICE_VARIABLE, "auto") or "auto"
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"{DEVICE_VARIABLE}={requested!r}: must be one of {', '.join(DEVICE_CHOICES)}"
                          " (e.g. `make run DEVICE=cpu`)")
    gpus = nvidia_gpus()
    if requested == "auto":
        device = "gpu" if gpus else "cpu"
        reason = (f"nvidia-smi lists {len(gpus)} GPU(s)" if gpus else "no working nvidia-smi") + f"; {DEVICE_VARIABLE}=auto"
    else:
        device, reason = requested, f"{DEVICE_VARIABLE}={requested}"
    backend = os.environ.get("KERAS_BACKEND") or BACKENDS[device]
    if os.environ.get("KERAS_BACKEND"):
        reason += f"; KERAS_BACKEND={backend} set by the user"
    return {"device": device, "gpus": gpus, "requirements": REQUIREMENTS[device], "keras_backend": backend,
            "reason": reason}


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
    if chosen["device"] == "gpu" and backend == "jax" and not _jax_cuda_installed():
        raise DeviceError("this machine has a GPU but JAX's CUDA plugin is not installed: run `make setup`"
                          " (it installs requirements-gpu.txt here), or set IMGCLS_DEVICE=cpu to train on the CPU.")
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        COMPILATION_CACHE.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE.resolve()))
        # Cache every compiled step, however quick it was to compile.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return backend


def _jax_cuda_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


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
    """
    if setting not in ("auto", "none"):
        raise DeviceError(f"distribution must be auto or none, got {setting!r}")
    import keras

    if setting == "none" or keras.backend.backend() != "jax":
        return 1
    if _multi_host():
        keras.distribution.initialize()
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
        import platform

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
    if arguments == ["--requirements"]:
        print(chosen["requirements"])
    elif arguments == ["--device"]:
        print(chosen["device"])
    elif not arguments:
        gpus = ", ".join(f"{gpu['name']} (compute capability {gpu['compute_capability']:g})" for gpu in chosen["gpus"])
        print(f"device:        {chosen['device']} ({chosen['reason']})")
        print(f"GPUs:          {gpus or 'none'}")
        print(f"CPU:           {cpu_model()}")
        print(f"install:       {chosen['requirements']}")
        print(f"KERAS_BACKEND: {chosen['keras_backend']} (export always uses tensorflow, for TFLite)")
        print(f"multi-host:    {'yes: ' + os.environ['KERAS_DISTRIBUTION_JOB_ADDRESSES'] if _multi_host() else 'no'}")
    else:
        print("usage: device.py [--requirements | --device]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
