"""ctypes access to an emulation library (build.py): kernels launched by name with numpy
buffers, arguments converted by the kernel's own parameter types (its ABI signature)."""

from __future__ import annotations

import ctypes

import numpy as np

FORWARD, REVERSE, SHUFFLED = 0, 1, 2  # runtime.h's Schedule
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "q": ctypes.c_longlong, "f": ctypes.c_float}


class EmulationError(RuntimeError):
    """A launch the emulator refused or stopped: divergence, a barrier not reached, bad config."""


class Emulator:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_signature.restype = ctypes.c_char_p
        self.lib.emu_signature.argtypes = [ctypes.c_char_p]
        self.lib.emu_max_threads.restype = ctypes.c_int
        self.lib.emu_max_threads.argtypes = [ctypes.c_char_p]
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = (
            [ctypes.c_char_p]
            + [ctypes.c_uint] * 6
            + [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.c_uint]
        )

    def signature(self, name: str) -> str:
        sig = self.lib.emu_signature(name.encode())
        if sig is None:
            raise EmulationError(f"no kernel named {name}")
        return sig.decode()

    def max_threads(self, name: str) -> int:
        return self.lib.emu_max_threads(name.encode())

    def launch(self, name: str, grid, block, args, schedule: int = FORWARD, seed: int = 0) -> None:
        """Like cuLaunchKernel: `args` in the kernel's parameter order; arrays (or None for a
        null pointer) for pointers, Python numbers for scalars."""
        sig = self.signature(name)
        if len(args) != len(sig):
            raise EmulationError(f"{name} takes {len(sig)} arguments ({sig}), got {len(args)}")
        values = []
        for i, (code, a) in enumerate(zip(sig, args)):
            if code == "p":
                if a is not None and not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                    raise EmulationError(f"{name} argument {i}: a C-contiguous array or None, got {type(a).__name__}")
                values.append(ctypes.c_void_p(None if a is None else a.ctypes.data))
            else:
                if isinstance(a, (np.ndarray, type(None))):
                    raise EmulationError(f"{name} argument {i}: a scalar ({code}), got {type(a).__name__}")
                values.append(_CTYPES[code](a))
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        rc = self.lib.emu_launch(name.encode(), *grid, *block, params, len(values), schedule, seed)
        if rc != 0:
            raise EmulationError(f"{name}: {self.lib.emu_last_error().decode()}")
