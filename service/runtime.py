"""One ONNX model version in onnxruntime: its tensor specs, whether it batches, and a run function.

Names, datatypes and shapes come from the session, so any ONNX model is served generically. A
model *batches* when every input and output has a leading dimension of unknown size: then the
rows of several requests can be concatenated along axis 0 and split apart afterwards (whether
that is *safe*, i.e. the rows do not interact, is decided by :mod:`service.independence`).

``threads`` must lie between 1 and the usable CPUs: onnxruntime starts every intra-op thread when
the session is created, and a huge count crashes the whole process (100000 segfaults it).

Execution providers (``BNFOLD_PROVIDERS``, :func:`parse_providers`): onnxruntime's names, in order of
preference, each one this onnxruntime has (``CUDAExecutionProvider`` needs the ``onnxruntime-gpu``
package); nodes a provider cannot run go to the next. onnxruntime silently falls back to the CPU
when a GPU provider cannot start (no driver, a CUDA or cuDNN library missing); a session whose
first choice did not start is refused instead, so a model never passes for GPU-served while it
runs on the CPU. The CUDA provider runs with ``use_tf32=0``: in IEEE float32, not TF32 (10-bit
mantissa, about 1e-3 relative error on Ampere and newer GPUs), so the certificate's self-test
(:mod:`service.selftest`) holds its float32 tolerance ``atol + rtol * max|reference|`` (1e-5 +
1e-4 of the output scale by default) on the GPU too: the same tolerance on every provider.

A CPU-only session fed numpy arrays is run through onnxruntime's binding (``session._sess.run``), past the
Python ``run``'s per-call checks (WebGPU graph capture, OrtValues of another session, provider fallback:
none applies), with its missing-input check made here; anything else takes the public ``run``. The checks
cost 2-3 us a call in a hot loop; in one live A/B at one connection (``benchmarks/serving_ab.py``, digits
CNN) the server CPU per request went to 0.82x.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.codec import ORT_TYPES, Decoder, Limits, TensorSpec
from service.cpu import usable_cpus

SHRINK_INPUT_BYTES = 1024 * 1024  # runs with more input than this shrink the arena after they finish
DECODERS_BY_ID = 16  # limits objects whose decoder is found by identity (cleared when full)
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

CPU = "CPUExecutionProvider"
# Options bnfold sets per provider (see the module docstring); other providers get onnxruntime's defaults.
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}
_HINTS = {"CUDAExecutionProvider": "; install onnxruntime-gpu in place of onnxruntime (one of the two, not both)",
          "TensorrtExecutionProvider": "; install onnxruntime-gpu with TensorRT"}


def parse_providers(text: str, available: Sequence[str] | None = None) -> tuple[str, ...]:
    """The comma-separated provider names of ``text``, in order; raises ``ValueError`` naming any that
    ``available`` (default: ``onnxruntime.get_available_providers()``) lacks, or a repeated one."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    have = list(ort.get_available_providers() if available is None else available)
    if not names:
        raise ValueError(f"must name at least one execution provider, e.g. {CPU}; available: {', '.join(have)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"names {', '.join(repeated)} more than once")
    for name in names:
        if name not in have:
            raise ValueError(f"names {name}, which this onnxruntime {ort.__version__} does not have (available: "
                             f"{', '.join(have)}){_HINTS.get(name, '')}")
    return names



def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(name=arg.name, datatype=ORT_TYPES.get(arg.type, arg.type), shape=shape)


class ModelRuntime:
    """An onnxruntime session for one ``model.onnx`` with ``threads`` intra-op threads.

    ``model`` (the file's bytes) is what the session loads when given, so that a file checked by
    its digest is the file served; else the session reads ``path``. ``providers``: execution
    providers in order of preference (default: the CPU's; the service passes ``BNFOLD_PROVIDERS``). Raises
    ``ValueError`` for a thread count outside ``1..usable CPUs`` or a first provider that did not
    start, and whatever onnxruntime raises for a bad model.
    """

    def __init__(self, path: Path, threads: int, spinning: bool = False, model: bytes | None = None,
                 providers: Sequence[str] | None = None) -> None:
        cpus = usable_cpus()
        if type(threads) is not int or not 1 <= threads <= cpus:
            raise ValueError(f"intra-op threads must be an integer from 1 to the {cpus} usable CPUs, got {threads!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers burn a core between runs, starving the event loop on small machines.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        self.path = path
        self.threads = threads
        wanted = tuple(providers) if providers is not None else (CPU,)
        self.session = ort.InferenceSession(str(path) if model is None else model, sess_options=options,
                                            providers=[(name, PROVIDER_OPTIONS.get(name, {})) for name in wanted])
        self.providers: tuple[str, ...] = tuple(self.session.get_providers())  # those that started, in order
        if wanted and wanted[0] not in self.providers:
            raise ValueError(f"execution provider {wanted[0]} did not start (onnxruntime fell back to "
                             f"{', '.join(self.providers)}); check the GPU driver and the CUDA and cuDNN libraries, "
                             f"or set BNFOLD_PROVIDERS={CPU}")
        self.inputs = [_spec(arg) for arg in self.session.get_inputs()]
        self.outputs = [_spec(arg) for arg in self.session.get_outputs()]
        self.output_names = [spec.name for spec in self.outputs]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.batches = all(len(s.shape) >= 1 and s.shape[0] == -1 for s in (*self.inputs, *self.outputs))
        # onnxruntime's binding, for :meth:`run` (see the module docstring), and the inputs it must be given.
        binding = getattr(self.session, "_sess", None)
        self._direct_run = binding.run if self.providers == (CPU,) and binding is not None else None
        self._required = frozenset(arg.name for arg in self.session.get_inputs() if not arg.type.startswith("optional"))
        self._decoders: dict[Limits, Decoder] = {}
        self._decoders_by_id: dict[int, tuple[Limits, Decoder]] = {}

    def decoder(self, limits: Limits) -> Decoder:
        """The request decoder of this model under ``limits`` (built once per limits, then kept with its plans)."""
        # Found by identity first: hashing the frozen dataclass costs a call per request. The entry holds
        # ``limits``, so its id is not reused while the entry lives; equal limits share one decoder.
        seen = self._decoders_by_id.get(id(limits))
        if seen is not None and seen[0] is limits:
            return seen[1]
        found = self._decoders.get(limits)
        if found is None:
            found = self._decoders[limits] = Decoder(self.inputs, self.outputs, limits)
        if len(self._decoders_by_id) >= DECODERS_BY_ID:
            self._decoders_by_id.clear()
        self._decoders_by_id[id(limits)] = (limits, found)
        return found

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs, in :attr:`outputs` order. Blocking: call it from a worker thread.

        A run whose inputs pass :data:`SHRINK_INPUT_BYTES` hands the onnxruntime arena's free regions back
        afterwards: the arena otherwise keeps the peak of the largest run for the life of the session
        (4.3 GiB RSS after one 480,000-row request, measured). Only then: the arena is what makes small
        runs fast (turning it off cost 10-20% CPU per request under load, measured).
        """
        direct = self._direct_run
        nbytes = 0
        for array in feeds.values():
            if type(array) is np.ndarray:
                nbytes += array.nbytes
            else:  # an OrtValue, say: the public run checks it
                direct = None
        options = _SHRINK if nbytes > SHRINK_INPUT_BYTES else None
        if direct is None or not feeds.keys() >= self._required:  # (a missing input: the public run's message)
            return self.session.run(self.output_names, feeds, options)
        return direct(self.output_names, feeds, options)  # type: ignore[no-any-return]
