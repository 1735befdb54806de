"""Every kernel compiles to sm_90 PTX with the launchers' exact signatures; imports stay lazy.

``compile_ptx`` is unavailable under the CUDA simulator, so these run in a subprocess with
``NUMBA_ENABLE_CUDASIM`` removed (NVRTC/NVVM from the wheels; no GPU or driver needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

MODULES = ("crop_resize_normalize", "logmel", "mixup", "pack_tokens")

EXPECTED = {
    *(f"crop_resize_normalize[{d}]" for d in ("float16", "float32", "bfloat16", "uint8")),
    "crop_resize_normalize.params",
    *(f"{op}[{d}]" for op in ("mixup", "cutmix") for d in ("float16", "float32")),
    "logmel.power",
    "logmel.mel",
    "pack_tokens",
}

_COMPILE = textwrap.dedent(
    """
    import importlib, json, sys
    import numba.cuda

    def refuse(*args, **kwargs):
        raise AssertionError("cuda.jit called while importing a kernel module")

    jit = numba.cuda.jit
    numba.cuda.jit = refuse  # importing must not compile (or even decorate) anything
    modules = [importlib.import_module(f"mmload.kernels.{m}") for m in sys.argv[1:]]
    numba.cuda.jit = jit
    result = {}
    for module in modules:
        for name, fn, sig in module.kernel_signatures():
            ptx, _ = numba.cuda.compile_ptx(fn, sig, cc=(9, 0))
            f64 = [l.strip() for l in ptx.splitlines() if ".f64" in l and not l.strip().startswith("//")]
            result[name] = {"sm_90": ".target sm_90" in ptx, "f64": f64[:3]}
    print(json.dumps(result))
    """
)


# Without a GPU the launchers cannot launch, so this swaps in a recorder for each compiled kernel
# and checks that every launcher passes Numba types equal to its compiled signature (a mismatch
# would be a TypeError at the first launch on a GPU, which the simulator cannot see).
_SIGNATURE_CHECK = textwrap.dedent(
    """
    import json
    from types import SimpleNamespace
    import numba, numpy as np
    from numba import cuda
    from numba.core import sigutils
    import mmload.kernels._device as device
    from mmload.kernels import crop_resize_normalize as crn, logmel as lm, mixup as mx
    from mmload.kernels import pack_tokens as pt

    device.SIMULATOR = True  # NumPy arrays stand in for device arrays; no kernel runs
    cuda.to_device = lambda a, stream=0: np.ascontiguousarray(a)
    cuda.device_array = lambda shape, dtype, stream=0: np.zeros(shape, dtype)
    device.upload_params = lambda hosts, stream=0: [np.ascontiguousarray(h) for h in hosts]
    crn.upload_params = device.upload_params
    crn.scratch = lm.scratch = lambda arrays, stream=0: [np.zeros(s, d) for s, d in arrays]
    seen = set()

    class Recorder:
        def __init__(self, name, sig):
            self.name, self.sig = name, sig

        def __getitem__(self, launch_config):
            return self

        def __call__(self, *args):
            got = tuple(numba.typeof(a) for a in args)
            want = tuple(sigutils.normalize_signature(self.sig)[0])
            assert got == want, f"{self.name}: launched with {got}, compiled for {want}"
            seen.add(self.name)

    for m in (crn, lm, mx, pt):
        m._compiled = lambda name, m=m: Recorder(name, m._VARIANTS[name][1])

    crop = SimpleNamespace(y0=[0], x0=[0], h=[2], w=[2], flip=[True])
    for d in ("float16", "float32", "bfloat16", "uint8"):
        out = np.zeros((1, 3, 2, 2), np.uint16 if d == "bfloat16" else d)
        norm = {} if d == "uint8" else {"mean": (1, 2, 3), "std": (1, 2, 3)}
        crn.crop_resize_normalize(
            np.zeros(12, np.uint8), [0], [2], [2], crop, out, dtype=d, **norm
        )

    class Dev:  # device-resident metadata: the launcher then runs the params kernel
        def __init__(self, a):
            self.a = np.ascontiguousarray(a)
            self.__cuda_array_interface__ = {
                "shape": self.a.shape, "typestr": self.a.dtype.str,
                "data": (self.a.ctypes.data, False), "strides": None, "version": 3,
            }

    crn.crop_resize_normalize(
        np.zeros(12, np.uint8), Dev(np.array([0], np.int64)), [2], [2], crop,
        np.zeros((1, 3, 2, 2), np.float32), dtype="float32",
    )
    for d in ("float16", "float32"):
        x = np.zeros((2, 1, 2, 2), d)
        mx.mixup(x, [1, 0], [0.5, 0.5], np.zeros_like(x))
        mx.cutmix(x, [1, 0], [[0, 0, 1, 1]] * 2, np.zeros_like(x))
    spec = lm.LogMelSpec(sample_rate=8000, n_fft=8, hop_length=4, n_mels=2)
    lm.logmel(np.zeros((1, 9), np.float32), np.zeros(spec.output_shape(1, 9), np.float32), spec)
    lm.mel_from_power(
        np.zeros((1, spec.n_freqs, 3), np.float32),
        np.zeros((1, spec.n_mels, 3), np.float32),
        spec,
        tables=lm.logmel_tables(spec),
    )
    plan = pt.plan_packing(np.array([2, 1]), 4)
    outs = [np.zeros((1, 4), np.int64) for _ in range(4)]
    pt.pack_tokens(np.arange(3), np.array([0, 2]), plan, *outs)
    print(json.dumps(sorted(seen)))
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_every_kernel_compiles_to_sm90_ptx() -> None:
    proc = _run(_COMPILE, *MODULES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == EXPECTED
    for name, info in result.items():
        assert info["sm_90"], name
        assert not info["f64"], f"{name}: float64 arithmetic crept in: {info['f64']}"


def test_import_mmload_kernels_does_not_import_numba() -> None:
    code = (
        "import sys, mmload.kernels\n"
        "heavy = [m for m in sys.modules if m == 'numba' or m.startswith('numba.')]\n"
        "assert not heavy, heavy\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_launchers_pass_exactly_the_compiled_signatures() -> None:
    proc = _run(_SIGNATURE_CHECK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == EXPECTED
